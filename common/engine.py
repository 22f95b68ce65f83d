"""Shared loop pieces: feature extraction (sharded over ranks), Recall@K of the eval splits, and :class:`Run`, the
bookkeeping of an epoch loop that every method writes out in its own ``main``: an epoch-0 evaluation, per-epoch CSV
+ plot, an atomic checkpoint every epoch for ``--resume``, and the kept model and database — on rank 0 only.
"""

import math
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
from common.metrics import recall_at_k
from common.runio import Statistics, atomic_save, load_checkpoint, rng_state, save_checkpoint, saved_rng_states
from common.runs import RunFiles

__all__ = ["extract_features", "embed_dataset", "eval_recalls", "RunFiles", "Evaluation", "Run", "check_finite"]


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
    """``test_recall@K`` in % (the originals' CSV columns); self excluded by index when query is gallery.

    Computed once on rank 0 and broadcast, so every rank takes the same best-model decision."""
    values: Optional[List[float]] = None
    if is_main_process():
        if same_set:
            values = recall_at_k(query.features, query.labels, ranks)
        else:
            values = recall_at_k(query.features, query.labels, ranks, gallery.features, gallery.labels)
        values = [float(v) for v in values]
    values = broadcast_object(values)
    return {f"test_recall@{k}": 100.0 * v for k, v in zip(ranks, values)}


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


def _print_row(epoch: int, num_epochs: int, row: Mapping[str, float]) -> None:
    text = " ".join(
        f"{k.replace('test_recall', 'R')}:{v:.2f}{'%' if 'recall' in k or 'acc' in k else ''}" for k, v in row.items()
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

    def log(self, epoch: int, train_stats: Mapping[str, float], evaluation: "Evaluation", model: nn.Module) -> None:
        """One CSV row and printout; the model and database when this epoch is the one to keep."""
        row = {**train_stats, **evaluation.metrics}
        if self.main:
            self.stats.log(epoch, **row)
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
                **extra,
            )
            print(f"epoch {epoch} done, {time.time() - self.started:.1f}s since start", flush=True)
        barrier()

    def finish(self) -> Statistics:
        """Fail loudly when the run promised a model file and none exists (nothing was ever evaluated)."""
        if self.main and not self.files.model.is_file():
            raise UserError(f"no evaluation produced {self.key_metric}; {self.files.model} was not written")
        return self.stats
