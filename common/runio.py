"""Run I/O: statistics CSV + plot, atomic checkpoints, databases, seeds.

Checkpoints and databases are plain dicts of tensors, numbers, strings and lists, loaded with
``torch.load(..., weights_only=True)``; the run's configuration is stored inside as a dict and compared with the
model asked for before anything is loaded.

Every file is written by :func:`atomic_write`: into ``.<name>.<pid>.<random>.tmp`` beside the target, flushed to
disk, then renamed over it, so a kill or a full disk leaves the previous file whole. The file gets the mode a
plain ``open()`` would give it (0666 minus the umask), and a write removes the temporary files of the same target
left by killed writers (see :func:`remove_stale_temps`).
"""

import errno
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from common.errors import UserError

__all__ = [
    "set_seed",
    "rng_state",
    "set_rng_state",
    "atomic_write",
    "atomic_save",
    "remove_stale_temps",
    "saved_rng_states",
    "safe_load",
    "check_config",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_file",
    "Statistics",
    "plain_config",
]


def plain_config(args: Any, keys: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """The run's configuration as a plain dict (safe under ``weights_only``; never a pickled Namespace)."""
    items = vars(args).items() if not isinstance(args, Mapping) else args.items()
    out = {}
    for k, v in items:
        if keys is not None and k not in keys:
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": list(map(lambda x: list(x) if isinstance(x, tuple) else x, random.getstate())),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        (
            "MT19937",
            state["numpy"]["keys"].numpy().astype(np.uint32),
            state["numpy"]["pos"],
            state["numpy"]["has_gauss"],
            state["numpy"]["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


STALE_TEMP_SECONDS = 24 * 3600  # a temporary file untouched this long is stale whoever wrote it


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` sets it process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live process on this machine (POSIX); elsewhere assume it is."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temps(path: os.PathLike) -> List[Path]:
    """Remove the temporary files of ``path`` that killed writers left behind; returns the ones removed.

    A temporary file is this toolkit's when it is named ``.<name>.<pid>.<8 random chars>.tmp`` beside ``path``
    (or ``.<name>.<8 random chars>.tmp``, the form without a PID). It is stale, and removed, when its PID is not a
    running process on this machine, or when it has not been modified for :data:`STALE_TEMP_SECONDS`. A live
    writer's file is therefore never touched (one machine writing a run's files at a time, as training does)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp\Z")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            dead = match.group(1) is not None and not _pid_running(int(match.group(1)))
            if old or dead:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass  # removed meanwhile, or not ours to remove
    return removed


def atomic_write(path: os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """``write(f)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path``.

    A kill or a failed write never leaves a truncated ``path``; a full disk (or any OS error) is one ``error:`` line
    with the previous file intact. The new file has the permissions ``open()`` would give it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    remove_stale_temps(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {path}: {_reason(e)}; the previous file, if any, is unchanged") from None
    except RuntimeError as e:  # torch's zip writer reports a failed write as a RuntimeError
        if "writ" not in str(e):
            raise
        raise UserError(f"cannot write {path}: {str(e).splitlines()[0]}; the previous file is unchanged") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def _reason(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{error.strerror} (free some space and run again)"
    return error.strerror or str(error)


def atomic_save(obj: Any, path: os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`: a kill never leaves a truncated file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_load(path: os.PathLike, what: str = "file", mmap: bool = False) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors for a missing or foreign file; ``mmap`` maps the
    tensors from the file instead of reading them (processes that map one file share its pages)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {what} {path}: not a checkpoint of this toolkit ({type(e).__name__})") from None
    if not isinstance(obj, dict) or "config" not in obj:
        raise UserError(f"{what} {path} has no stored configuration; it was not written by this toolkit")
    return obj


def check_config(stored: Mapping[str, Any], expected: Mapping[str, Any], what: str, keys: Sequence[str]) -> None:
    """Refuse, in one line, a file whose configuration differs from the model asked for on ``keys``."""
    diffs = [f"{k}={stored.get(k)!r} (expected {expected.get(k)!r})" for k in keys if stored.get(k) != expected.get(k)]
    if diffs:
        raise UserError(f"{what} was written for a different model: " + ", ".join(diffs))


def save_checkpoint(
    path: os.PathLike,
    *,
    model: torch.nn.Module,
    config: Mapping[str, Any],
    epoch: int,
    optimizer=None,
    scheduler=None,
    scaler=None,
    rng: Optional[Sequence[Mapping[str, Any]]] = None,
    **extra: Any,
) -> None:
    """Everything ``--resume`` needs: model, optimizer, scheduler, scaler, RNG states, epoch, configuration.

    ``rng`` holds the random states of every process in rank order (default: this process's alone); they are
    stored as ``rng_ranks``, rank 0's also as ``rng``."""
    states = list(rng) if rng is not None else [rng_state()]
    state = {
        "model": model.state_dict(),
        "config": dict(config),
        "epoch": epoch,
        "rng": states[0],
        "rng_ranks": states,
    }
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            state[name] = obj.state_dict()
    state.update(extra)
    atomic_save(state, path)


def saved_rng_states(state: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The random states a checkpoint holds, in rank order (one for checkpoints written before ``rng_ranks``)."""
    if "rng_ranks" in state:
        return list(state["rng_ranks"])
    return [state["rng"]] if "rng" in state else []


def load_checkpoint(
    path: os.PathLike,
    config: Mapping[str, Any],
    keys: Sequence[str],
    *,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    scaler=None,
    restore_rng: bool = True,
    rank: int = 0,
) -> Dict[str, Any]:
    """Load a checkpoint into the given objects after checking its configuration; returns the raw dict.

    ``restore_rng``: process ``rank`` takes the random state that rank saved; a rank the checkpoint has no state
    for (it was written by fewer processes) keeps its own."""
    state = _checked_state(path, "checkpoint", config, keys)
    _load_weights(model, state, f"checkpoint {path} does not fit this model")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and name in state:
            obj.load_state_dict(state[name])
    states = saved_rng_states(state)
    if restore_rng and rank < len(states):
        set_rng_state(states[rank])
    return state


def load_model_file(
    path: os.PathLike,
    expected: Mapping[str, Any],
    keys: Sequence[str],
    build: Callable[[Dict[str, Any]], torch.nn.Module],
    what: str = "model file",
) -> torch.nn.Module:
    """A trained ``<run>_model.pth``: refused in one line when its configuration differs from ``expected`` on
    ``keys``, then loaded (strictly) into ``build(state)``, the method's own untrained model for that file."""
    state = _checked_state(path, what, expected, keys)
    model = build(state)
    _load_weights(model, state, f"{what} {path} does not fit its configuration")
    return model


def _checked_state(path: os.PathLike, what: str, expected: Mapping[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    """A toolkit file whose stored configuration matches ``expected`` on ``keys`` (else one-line refusal)."""
    state = safe_load(path, what)
    check_config(state["config"], expected, f"{what} {path}", keys)
    return state


def _load_weights(model: torch.nn.Module, state: Mapping[str, Any], refusal: str) -> None:
    """Strict state-dict load; a shape/key mismatch becomes ``refusal: <first line of torch's message>``."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise UserError(f"{refusal}: {str(e).splitlines()[0]}") from None


class Statistics:
    """Per-epoch metrics rewritten as CSV (index label ``epoch``) and PNG curves after every epoch."""

    def __init__(self, csv_path: os.PathLike, rows: Optional[List[Dict[str, float]]] = None):
        self.csv_path = Path(csv_path)
        self.rows: Dict[int, Dict[str, float]] = {}
        if rows:
            for row in rows:
                self.rows[int(row["epoch"])] = {k: v for k, v in row.items() if k != "epoch"}

    @classmethod
    def resume(cls, csv_path: os.PathLike, up_to_epoch: int) -> "Statistics":
        """Reload the rows of an interrupted run up to the checkpoint's epoch."""
        import pandas as pd

        stats = cls(csv_path)
        if Path(csv_path).is_file():
            frame = pd.read_csv(csv_path, index_col="epoch")
            for epoch, row in frame.iterrows():
                if int(epoch) <= up_to_epoch:
                    stats.rows[int(epoch)] = {k: float(v) for k, v in row.items() if not pd.isna(v)}
        return stats

    def log(self, epoch: int, **metrics: float) -> None:
        self.rows.setdefault(epoch, {}).update({k: float(v) for k, v in metrics.items()})
        self.write()

    def frame(self):
        import pandas as pd

        frame = pd.DataFrame.from_dict(self.rows, orient="index").sort_index()
        frame.index.name = "epoch"
        return frame

    def write(self) -> None:
        frame = self.frame()
        text = frame.to_csv(index_label="epoch")
        atomic_write(self.csv_path, lambda f: f.write(text.encode("utf-8")))
        self.plot(frame)

    def plot(self, frame) -> None:
        """Loss/accuracy and recall curves side by side."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = [
            [c for c in frame.columns if not c.startswith("test_")],
            [c for c in frame.columns if c.startswith("test_")],
        ]
        groups = [g for g in groups if g]
        fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
        for ax, cols in zip(axes[0], groups):
            for c in cols:
                ax.plot(frame.index, frame[c], marker="o", label=c)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0][-1].set_ylabel("%" if any(c.startswith("test_") for c in groups[-1]) else "")
        fig.tight_layout()
        try:
            atomic_write(self.csv_path.with_suffix(".png"), lambda f: fig.savefig(f, format="png", dpi=80))
        finally:
            plt.close(fig)
