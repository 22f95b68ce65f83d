"""Shared loop pieces: feature extraction (sharded over ranks), Recall@K and MAP@R of the eval splits, and
:class:`Run`, the bookkeeping of an epoch loop that every method writes out in its own ``main``: an epoch-0
evaluation, per-epoch CSV + plot, TensorBoard scalars (per epoch and per iteration), an atomic checkpoint every
epoch for ``--resume``, and the kept model and database — on rank 0 only.
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from common.database import Split, save_database
from common.device import unwrap
from common.distributed import (
    all_gather_by_index,
    barrier,
    broadcast_object,
    gather_object,
    get_rank,
    get_world_size,
    is_main_process,
)
from common.errors import UserError
from common.metrics import retrieval_metrics
from common.runio import Statistics, atomic_save, load_checkpoint, rng_state, save_checkpoint, saved_rng_states
from common.runs import RunFiles

__all__ = [
    "extract_features",
    "embed_dataset",
    "eval_recalls",
    "embed_splits",
    "evaluate",
    "LazySplit",
    "RunFiles",
    "Evaluation",
    "Run",
    "check_finite",
    "tensorboard_available",
]


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = False,
    embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
    desc: str = "features",
) -> torch.Tensor:
    """Embeddings of ``loader``'s dataset in dataset order (loader must not shuffle), on CPU: float32, or float64
    for a float64 model.

    Always computed in the model's precision, never under autocast (``amp`` is accepted and not used): features
    computed during AMP training then equal test.py's, as in the originals' evaluation."""
    model.eval()
    dtype = next(model.parameters()).dtype  # float64 models (equivalence checks) get float64 images
    chunks = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main_process()):
        images = batch[0].to(device, dtype, non_blocking=True)
        with torch.autocast(device.type, enabled=False):  # float32 even inside a caller's autocast region
            out = embed(model, images) if embed is not None else model(images)
        chunks.append(out.cpu() if out.dtype == torch.float64 else out.float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
    amp: bool = False,
    desc: str = "features",
) -> torch.Tensor:
    """Embeddings of a whole split in dataset order, on every rank: under DDP rank r embeds samples r, r+N, ...
    and the rows are gathered by index (no padding, no duplicates); one process embeds everything."""
    rank, world = get_rank(), get_world_size()
    indices = list(range(rank, len(dataset), world))
    subset = dataset if world == 1 else Subset(dataset, indices)
    loader = DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    features = extract_features(unwrap(model), loader, device, amp, embed=embed, desc=desc)
    if world == 1:
        return features
    return all_gather_by_index(features.reshape(len(indices), -1), torch.tensor(indices), len(dataset))


def eval_recalls(query: Split, gallery: Split, ranks: Sequence[int], same_set: bool) -> Dict[str, float]:
    """``test_recall@K`` (the originals' CSV columns) and ``test_map@r``, in %; self excluded by index when query is
    gallery. One pass over the scores (``retrieval_metrics``), as test.py computes them.

    Computed once on rank 0 and broadcast, so every rank takes the same best-model decision."""
    values: Optional[Dict[str, float]] = None
    if is_main_process():
        if same_set:
            metrics = retrieval_metrics(query.features, query.labels, ranks)
        else:
            metrics = retrieval_metrics(query.features, query.labels, ranks, gallery.features, gallery.labels)
        values = {f"test_recall@{k}": 100.0 * float(metrics[f"recall@{k}"]) for k in ranks}
        values["test_map@r"] = 100.0 * float(metrics["map@r"])
    return broadcast_object(values)


def check_finite(loss: torch.Tensor) -> None:
    """Stop with exit code 1 on a non-finite loss (DeiT/DINO practice) instead of training on NaNs."""
    if not math.isfinite(loss.item()):
        print(f"error: loss is {loss.item()}, stopping training", file=sys.stderr)
        sys.exit(1)


@dataclass
class Evaluation:
    """What a method's evaluate() returns: CSV metrics and the database splits to save if this is the best epoch."""

    metrics: Dict[str, float]
    splits: Dict[str, Split] = field(default_factory=dict)


class LazySplit:
    """A database split whose features are computed only when the database is saved (the kept epoch).

    ``compute`` must be collective-safe (``embed_dataset``): ``Run.log`` reads ``features`` on every rank."""

    def __init__(self, dataset: Dataset, compute: Callable[[], torch.Tensor]):
        self.images, self.labels, self._compute, self._features = dataset.images, dataset.labels, compute, None

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            self._features = self._compute()
        return self._features


def embed_splits(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    names: Sequence[str],
    *,
    embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp: bool = False,
) -> Dict[str, Split]:
    """The named splits as database :class:`Split` s (images, labels, features), each split embedded once."""
    splits = {}
    for name in dict.fromkeys(names):
        features = embed_dataset(
            model,
            datasets[name],
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            embed=embed,
            amp=amp,
            desc=f"{name} features",
        )
        splits[name] = Split(datasets[name].images, datasets[name].labels, features)
    return splits


def evaluate(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    query: str,
    gallery: str,
    ranks: Sequence[int],
    device: torch.device,
    *,
    embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]],
    batch_size: int,
    num_workers: int,
    amp: bool = False,
    lazy: Sequence[str] = (),
) -> Evaluation:
    """Recall@K and MAP@R of ``query`` against ``gallery`` (self excluded by index when they are one split), the
    evaluation of every method's training loop; every rank embeds its share of the images, in float32.

    ``lazy`` names further splits the saved database holds (REIR's train split), embedded only if it is saved."""
    kwargs = dict(embed=embed, batch_size=batch_size, num_workers=num_workers, device=device, amp=amp)
    splits: Dict[str, Any] = embed_splits(model, datasets, (query, gallery), **kwargs)
    metrics = eval_recalls(splits[query], splits[gallery], ranks, same_set=query == gallery)
    for name in lazy:
        splits[name] = LazySplit(
            datasets[name], lambda name=name: embed_splits(model, datasets, [name], **kwargs)[name].features
        )
    return Evaluation(metrics, splits)


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` imports (the ``[tensorboard]`` extra); one note when it does not."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        print(
            "note: tensorboard is not installed (pip install '.[tensorboard]'): no TensorBoard events for this run; "
            "the statistics CSV and PNG are written as always",
            flush=True,
        )
        return False
    return True


def _scalars_up_to(log_dir: Path, epoch: int, iteration: int) -> List[Tuple[str, int, float, float]]:
    """(tag, step, value, wall time) of the ``epoch/`` scalars up to ``epoch`` and the ``step/`` ones up to
    ``iteration`` in ``log_dir``'s events files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = []
    for tag in events.Tags()["scalars"]:
        last = epoch if tag.startswith("epoch/") else iteration
        out += [(tag, e.step, e.value, e.wall_time) for e in events.Scalars(tag) if e.step <= last]
    return out


def _print_row(epoch: int, num_epochs: int, row: Mapping[str, float]) -> None:
    text = " ".join(
        f"{k}:{v:.3g}"
        if k == "lr"
        else f"{k.replace('test_recall', 'R').replace('test_map@r', 'MAP@R')}:{v:.2f}"
        f"{'%' if k.startswith('test_') or 'acc' in k else ''}"
        for k, v in row.items()
    )
    print(f"Epoch {epoch}/{num_epochs} - {text}", flush=True)


class Run:
    """The bookkeeping of one training run, used the same way on every rank; only rank 0 writes or prints.

    A method's ``main`` keeps its epoch loop visible (torchvision references style)::

        run = Run(files, config, RESUME_KEYS, "cgd", num_epochs, recalls=args.recalls)
        start = run.resume(args.resume, model, optimizer, scheduler)
        if start == 1:
            run.log(0, {}, evaluate(...), model)
        for epoch in range(start, num_epochs + 1):
            train_stats = train_one_epoch(...)
            scheduler.step()
            run.log(epoch, train_stats, evaluate(...), model)
            run.checkpoint(epoch, model, optimizer, scheduler)

    The model (and database) kept is the best on the first requested rank (``--recalls 2,4`` keeps the best R@2)
    among the trained epochs (``selection="best"``, CGD/REIR/SREML's originals) or the last one
    (``selection="last"``, IRT's and FastRetri's). Epoch 0, the untrained model, is always a CSV row but becomes
    the model only for an evaluation-only run (no training epochs).

    TensorBoard (when installed): every CSV row as ``epoch/<column>`` at step = epoch, and what ``train_one_epoch``
    passes to :meth:`log_step` as ``step/<name>`` at step = optimizer steps so far, in ``log_dir`` (default:
    ``<run>_tensorboard/`` beside the CSV). Like the CSV, a resumed run keeps the events up to its checkpoint and a
    new run starts the folder afresh.
    """

    def __init__(
        self,
        files: RunFiles,
        config: Mapping[str, Any],
        resume_keys: Sequence[str],
        method: str,
        num_epochs: int,
        *,
        recalls: Sequence[int],
        selection: str = "best",
        database: Optional[Mapping[str, Any]] = None,
        log_dir: Optional[os.PathLike] = None,
    ):
        if selection not in ("best", "last"):
            raise UserError(f"model selection must be 'best' or 'last', got {selection!r}")
        self.files, self.config, self.resume_keys, self.method = files, dict(config), list(resume_keys), method
        self.num_epochs, self.selection = num_epochs, selection
        self.key_metric = f"test_recall@{recalls[0]}"
        self.database = dict(database or {})
        self.main = is_main_process()
        self.stats = Statistics(files.statistics)
        self.best = float("-inf")
        self.saved_epoch: Optional[int] = None
        self.started = time.time()
        self.log_dir = Path(log_dir) if log_dir else files.path("tensorboard")
        self.iteration = 0  # optimizer steps so far (log_step), saved in checkpoints
        self._tensorboard = self.main and tensorboard_available()
        self._writer: Any = None
        self._resumed: Optional[Tuple[int, int]] = None  # (epoch, iteration) of the checkpoint resumed from

    def resume(
        self, resume: Optional[str], model: nn.Module, optimizer=None, scheduler=None, scaler=None
    ) -> Tuple[int, Dict[str, Any]]:
        """``(first epoch to train, checkpoint dict)``: 1 and {} for a new run, else after the checkpoint's epoch
        (weights, optimizer, scheduler and scaler restored on every rank, and each rank's own random state, so a
        resumed N-process run repeats the uninterrupted one)."""
        if not resume:
            return 1, {}
        path = self.files.checkpoint if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            raise UserError(f"--resume: no checkpoint of this run at {path}")
        state = load_checkpoint(
            path,
            self.config,
            self.resume_keys,
            model=unwrap(model),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            rank=get_rank(),
        )
        saved, world = len(saved_rng_states(state)), get_world_size()
        if saved != world and self.main:
            print(
                f"note: {path} holds the random state of {saved} process(es), this run has {world}: random "
                "augmentation will not repeat the uninterrupted run exactly",
                flush=True,
            )
        self.stats = Statistics.resume(self.files.statistics, state["epoch"])
        self.iteration = int(state.get("iteration", 0))
        self._resumed = (int(state["epoch"]), self.iteration)
        trained = [r.get(self.key_metric) for e, r in self.stats.rows.items() if e > 0 and self.key_metric in r]
        self.best = max(trained, default=float("-inf"))
        if self.main:
            print(f"resumed from {path} at epoch {state['epoch']}", flush=True)
        return state["epoch"] + 1, state

    def _keep(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        if epoch == 0:
            return self.num_epochs == 0
        if self.selection == "last":
            return True
        if self.key_metric not in metrics:
            return False
        if metrics[self.key_metric] > self.best:
            self.best = metrics[self.key_metric]
            return True
        return False

    def _events(self):
        """The SummaryWriter, opened at first use; None without TensorBoard. The run's earlier events files are
        replaced by one holding what a resumed run keeps (epochs and steps up to its checkpoint; nothing for a new
        run), as the CSV is: every reader then shows each step once."""
        if not self._tensorboard:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            old = sorted(self.log_dir.glob("events.out.tfevents.*"))
            kept = _scalars_up_to(self.log_dir, *self._resumed) if old and self._resumed else []
            self._writer = SummaryWriter(str(self.log_dir))
            for tag, step, value, wall_time in kept:
                self._writer.add_scalar(tag, value, step, walltime=wall_time)
            self._writer.flush()
            for path in old:
                path.unlink()
        return self._writer

    def _add_row(self, epoch: int, row: Mapping[str, float]) -> None:
        for name, value in row.items():
            self._writer.add_scalar(f"epoch/{name}", float(value), epoch)

    def log_step(self, loss: Any, lr: float, **scalars: Any) -> None:
        """One optimizer step done (call it on every rank): its loss, learning rate and any other scalars (floats
        or 0-d tensors, read on rank 0 only and only when TensorBoard is on)."""
        self.iteration += 1
        writer = self._events()
        if writer is None:
            return
        for name, value in {"loss": loss, "lr": lr, **scalars}.items():
            writer.add_scalar(f"step/{name}", float(value), self.iteration)

    def log(self, epoch: int, train_stats: Mapping[str, float], evaluation: "Evaluation", model: nn.Module) -> None:
        """One CSV row, TensorBoard scalars and printout; the model and database when this epoch is the one to
        keep."""
        row = {**train_stats, **evaluation.metrics}
        if self.main:
            self.stats.log(epoch, **row)
            if self._events() is not None:
                self._add_row(epoch, row)
                self._writer.flush()
            _print_row(epoch, self.num_epochs, row)
        if not evaluation.metrics or not self._keep(epoch, evaluation.metrics):
            return
        splits = {name: Split(s.images, s.labels, s.features) for name, s in evaluation.splits.items()}  # all ranks
        if self.main:
            atomic_save({"model": unwrap(model).state_dict(), "config": self.config, "epoch": epoch}, self.files.model)
            if splits:
                save_database(
                    self.files.database, config=self.config, method=self.method, splits=splits, **self.database
                )
        self.saved_epoch = epoch

    def checkpoint(
        self, epoch: int, model: nn.Module, optimizer=None, scheduler=None, scaler=None, **extra: Any
    ) -> None:
        """Everything ``--resume`` needs, written atomically by rank 0 after every epoch, with every rank's random
        state."""
        states = gather_object(rng_state())
        if self.main:
            save_checkpoint(
                self.files.checkpoint,
                model=unwrap(model),
                config=self.config,
                epoch=epoch,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                rng=states,
                iteration=self.iteration,
                **extra,
            )
            print(f"epoch {epoch} done, {time.time() - self.started:.1f}s since start", flush=True)
        barrier()

    def finish(self) -> Statistics:
        """Close the TensorBoard events; fail loudly when the run promised a model file and none exists (nothing
        was ever evaluated)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.main and not self.files.model.is_file():
            raise UserError(f"no evaluation produced {self.key_metric}; {self.files.model} was not written")
        return self.stats
