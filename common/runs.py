"""A run's identity: where runs live, how they are named, which file is what, and loading one.

Every run of method ``m`` writes ``results/m/<run>_{statistics.csv,checkpoint.pth,model.pth,data_base.pth}``
(:class:`RunFiles`); ``<run>`` is the original's name of the run (``MethodSpec.run_name``). Training writes these
files; test, inference, ablation, export and the server find and load them here, this toolkit's files and the
original projects' (through ``MethodSpec.import_original`` / ``original_database``) alike, so a data-loss check
on a run's files (:func:`check_database_target`) has one home.
"""

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from common.cli import add_flag
from common.database import Database, load_database
from common.errors import UserError
from common.runio import load_model_file, safe_load
from common.spec import MethodSpec

__all__ = [
    "results_root",
    "results_dir",
    "run_name",
    "RunFiles",
    "DB_SUFFIX",
    "database_path",
    "run_prefix",
    "model_path",
    "open_database",
    "open_run_database",
    "open_run_model",
    "load_run",
    "model_file_of",
    "model_of_database",
    "is_toolkit_file",
    "SAVED_BY",
    "check_database_target",
    "add_run_flags",
]

DB_SUFFIX = "_data_base.pth"  # RunFiles.database of run <run>
SAVED_BY = "saved_by"  # config key of a database written by --gallery / test.py --save_data_base (replaceable)
_RUN_FILES = ("_model.pth", "_checkpoint.pth")
_DISPLAY_NAMES = {"fastretri": "FastRetri"}  # how error messages name a method; default: upper case


# ---------------------------------------------------------------- names and places


def results_root() -> Path:
    """``results/`` by default; the ``RETRIEVAL_RESULTS`` environment variable moves it (tests use a tmp dir)."""
    return Path(os.environ.get("RETRIEVAL_RESULTS", "results"))


def results_dir(method: str) -> Path:
    path = results_root() / method
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_name(*parts: Any) -> str:
    """Join the values with '_' as the originals did (``car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128``); ':' and
    path separators become '-' so the name stays one file name (``timm:convnext_tiny`` -> ``timm-convnext_tiny``)."""
    return "_".join(re.sub(r"[:/\\]", "-", str(p)) for p in parts)


@dataclass
class RunFiles:
    """Where one run writes: ``<dir>/<name>_{statistics.csv,statistics.png,checkpoint.pth,model.pth,data_base.pth}``."""

    directory: Path
    name: str

    def path(self, suffix: str) -> Path:
        return Path(self.directory) / f"{self.name}_{suffix}"

    @property
    def statistics(self) -> Path:
        return self.path("statistics.csv")

    @property
    def checkpoint(self) -> Path:
        return self.path("checkpoint.pth")

    @property
    def model(self) -> Path:
        return self.path("model.pth")

    @property
    def database(self) -> Path:
        return self.path("data_base.pth")


def database_path(name: str, method: str) -> Path:
    """A database given as a path, or as a bare file name under ``results/<method>/`` (the originals' convention)."""
    path = Path(name)
    return path if path.is_file() or path.parent != Path(".") else results_dir(method) / name


def run_prefix(db_path: Path) -> str:
    """``<run>`` of ``<run>_data_base.pth``, which names the run's other files (the stem for any other name)."""
    name = Path(db_path).name
    return name[: -len(DB_SUFFIX)] if name.endswith(DB_SUFFIX) else Path(name).stem


def model_path(db_path: Path) -> Path:
    """``<run>_model.pth`` next to ``<run>_data_base.pth``: the model that wrote the database's features."""
    db_path = Path(db_path)
    if not db_path.name.endswith(DB_SUFFIX):
        raise UserError(f"{db_path} is not named <run>{DB_SUFFIX}; cannot find its <run>_model.pth")
    return RunFiles(db_path.parent, run_prefix(db_path)).model


def add_run_flags(parser: argparse.ArgumentParser, spec: MethodSpec, verb: str) -> None:
    """``--data_base`` / ``--model_file``: which trained run a script works on (test.py, export.py)."""
    g = parser.add_argument_group("run")
    add_flag(
        g,
        "data_base",
        default=spec.default_data_base,
        type=str,
        help=f"the run's database, a path or a name under results/{spec.name}/; its model is the "
        f"<run>_model.pth beside it (default: {spec.default_data_base})",
    )
    g.add_argument(
        "--model_file",
        "--model-file",
        "--checkpoint",
        dest="model_file",
        default=None,
        type=str,
        help=f"a <run>_model.pth to {verb} instead of --data_base's model (or an original project's file)",
    )


# ---------------------------------------------------------------- loading a run


def open_database(name: str, method: str, requested: Optional[Mapping[str, Any]] = None) -> Tuple[Path, Database]:
    """Load a database of ``method``; flags the user gave explicitly (``requested``, None = not given) must match
    its stored config, so a query never runs against features of another model."""
    path = database_path(name, method)
    requested = {k: v for k, v in (requested or {}).items() if v is not None}
    db = load_database(path, requested, list(requested))
    if db.method != method:
        raise UserError(
            f"database {path} was written by {db.method!r}, not by {_DISPLAY_NAMES.get(method, method.upper())}"
        )
    return path, db


def open_run_database(spec: MethodSpec, name: str) -> Tuple[Path, Database]:
    """This toolkit's database of ``spec``'s method, or the original project's (``spec.original_database``)."""
    path = database_path(name, spec.name)
    if spec.original_database is not None and path.is_file() and not is_toolkit_file(path):
        return path, spec.original_database(path)
    return open_database(name, spec.name)


def open_run_model(spec: MethodSpec, path: Path, expected: Dict[str, Any], device: torch.device) -> nn.Module:
    """A trained ``<run>_model.pth`` in eval mode, refused in one line if its model-defining configuration differs
    from ``expected`` (the database's)."""
    keys = [k for k in spec.model_keys if k in expected]
    model = load_model_file(path, expected, keys, lambda state: spec.build_model(state["config"]), "model")
    return model.to(device).eval()


def load_run(
    spec: MethodSpec,
    device: torch.device,
    *,
    model_file: Optional[str] = None,
    data_base: Optional[str] = None,
    expected_config: Optional[Dict[str, Any]] = None,
    original_args: Any = None,
) -> Tuple[str, Dict[str, Any], nn.Module, Path]:
    """(run name, configuration, model, the model file read) from ``model_file``, else from the model of the
    ``data_base`` database (a database embedded with a model records the file).

    ``model_file`` may also be a file of the original project (no stored configuration): the method's
    ``import_original(path, original_args)`` then rebuilds configuration and model from the file name or flags.
    ``expected_config`` (set by fast-reid's ``--eval-only``) must match the file's model-defining keys."""
    if model_file:
        path = Path(model_file)
        run = path.name[: -len("_model.pth")] if path.name.endswith("_model.pth") else path.stem
        if spec.import_original is not None and not is_toolkit_file(path):
            config, model = spec.import_original(path, original_args)
            return run, config, model.to(device).eval(), path
        config = safe_load(path, "model")["config"]
        if config.get("method", spec.name) != spec.name:
            raise UserError(f"model {path} was trained by {config.get('method')!r}, not by {spec.display}")
        expected = expected_config or spec.model_config(config)
        return run, config, open_run_model(spec, path, expected, device), path
    db_path, db = open_run_database(spec, data_base)
    return run_prefix(db_path), db.config, model_of_database(spec, db_path, db, device), model_file_of(db_path, db)


def model_file_of(db_path: Path, db: Database) -> Path:
    """The model a database was embedded with: its recorded ``model_file`` (databases written by test.py
    ``--save_data_base`` and inference.py ``--gallery``), else ``<run>_model.pth`` beside it."""
    stored = db.config.get("model_file")
    path = Path(stored) if stored else model_path(db_path)
    if stored and not path.is_file():
        raise UserError(f"database {db_path} was embedded with {path}, which no longer exists")
    return path


def model_of_database(spec: MethodSpec, db_path: Path, db: Database, device: torch.device) -> nn.Module:
    """The database's model (:func:`model_file_of`), checked against the database's configuration. A file of the
    original project is read by ``spec.import_original`` with the database's configuration as
    ``args.stored_config`` (what was recovered from the file when the database was written)."""
    path = model_file_of(db_path, db)
    if spec.import_original is not None and not is_toolkit_file(path):
        config, model = spec.import_original(path, argparse.Namespace(stored_config=dict(db.config)))
        mismatch = {
            k: (config.get(k), db.config.get(k))
            for k in spec.model_keys
            if k in db.config and k != "num_classes" and config.get(k) != db.config.get(k)
        }
        if mismatch:
            raise UserError(f"model {path} does not match database {db_path}: {mismatch}")
        return model.to(device).eval()
    return open_run_model(spec, path, spec.model_config(db.config), device)


def is_toolkit_file(path: Path, what: str = "model") -> bool:
    """True for a file this toolkit wrote (a dict with a stored ``config``); originals' files have none.

    Only peeks: a memory-mapped load reads the pickled structure, not the tensors, so the file is read once, by the
    loader that follows (a 2 GB database is not loaded twice). Files that cannot be mapped (the legacy format) or
    read at all count as foreign; the original-file readers then report them in one line."""
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")
    return _peek(path) is not None


def _peek(path: Path) -> Optional[Dict[str, Any]]:
    """The memory-mapped top-level dict of a file this toolkit wrote (tensors not read), else None."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) or unreadable: not this toolkit's
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None


def check_database_target(target: Path, in_use: Sequence[Optional[Path]]) -> None:
    """Refuse a ``--save_data_base`` that would overwrite a run: the database or model in use, any run's model or
    checkpoint name, a run's training database (its model or checkpoint beside it), or any existing file that is
    not a database written earlier by ``--gallery`` / ``--save_data_base``."""
    target = Path(target)
    real = target.resolve()
    if any(real == Path(p).resolve() for p in in_use if p):
        raise UserError(f"--save_data_base {target} is the database or model in use; choose a new file name")
    for name in (target.name, real.name):
        if name.endswith(_RUN_FILES):
            raise UserError(f"--save_data_base {target} is named like a run's model or checkpoint; choose a new name")
    if not os.path.lexists(target) or (target.is_symlink() and not real.exists()):
        return
    if not real.is_file():
        raise UserError(f"--save_data_base {target} exists and is not a file")
    if real.name.endswith(DB_SUFFIX):
        run = real.name[: -len(DB_SUFFIX)]
        if any((real.parent / f"{run}{suffix}").exists() for suffix in _RUN_FILES):
            raise UserError(f"--save_data_base {target} is the training database of run {run}; choose a new name")
    obj = _peek(real)
    if obj is None or "splits" not in obj:
        raise UserError(f"--save_data_base {target} exists and is no database of this toolkit; not overwritten")
    if SAVED_BY not in obj["config"] and "gallery_source" not in obj["config"]:
        raise UserError(
            f"--save_data_base {target} is a database that --gallery / --save_data_base did not write (a run's?); "
            "not overwritten"
        )
