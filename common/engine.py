"""Shared loop pieces: feature extraction, Recall@K evaluation of the eval splits, and the epoch loop.

A method writes its own ``train_one_epoch`` and embedding; :func:`fit` then does what every method's ``main`` did
the same way: an epoch-0 evaluation, per-epoch CSV + plot, an atomic checkpoint every epoch for ``--resume``,
and the best-R@1 model and database.
"""
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.database import Split, save_database
from common.device import autocast, unwrap
from common.errors import UserError
from common.metrics import recall_at_k
from common.runio import Statistics, atomic_save, load_checkpoint, save_checkpoint

__all__ = ["extract_features", "eval_recalls", "RunFiles", "Evaluation", "fit", "check_finite"]


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
                     embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
                     desc: str = "features") -> torch.Tensor:
    """Embeddings of ``loader``'s dataset in dataset order (loader must not shuffle), float32 on CPU."""
    model.eval()
    chunks = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images = batch[0].to(device, non_blocking=True)
        with autocast(device, amp):
            out = embed(model, images) if embed is not None else model(images)
        chunks.append(out.float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def eval_recalls(query: Split, gallery: Split, ranks: Sequence[int], same_set: bool) -> Dict[str, float]:
    """``test_recall@K`` in % (the originals' CSV columns); self excluded by index when query is gallery."""
    if same_set:
        values = recall_at_k(query.features, query.labels, ranks)
    else:
        values = recall_at_k(query.features, query.labels, ranks, gallery.features, gallery.labels)
    return {f"test_recall@{k}": 100.0 * v for k, v in zip(ranks, values)}


def check_finite(loss: torch.Tensor) -> None:
    """Stop with exit code 1 on a non-finite loss (DeiT/DINO practice) instead of training on NaNs."""
    if not math.isfinite(loss.item()):
        print(f"error: loss is {loss.item()}, stopping training", file=sys.stderr)
        sys.exit(1)


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


@dataclass
class Evaluation:
    """What a method's evaluate() returns: CSV metrics and the database splits to save if this is the best epoch."""
    metrics: Dict[str, float]
    splits: Dict[str, Split] = field(default_factory=dict)


def _print_row(epoch: int, num_epochs: int, row: Mapping[str, float]) -> None:
    text = " ".join(f"{k.replace('test_recall', 'R')}:{v:.2f}{'%' if 'recall' in k or 'acc' in k else ''}"
                    for k, v in row.items())
    print(f"Epoch {epoch}/{num_epochs} - {text}", flush=True)


def fit(run: RunFiles, *, model: nn.Module, config: Mapping[str, Any], config_keys: Sequence[str],
        num_epochs: int, train_one_epoch: Callable[[int], Dict[str, float]], evaluate: Callable[[], Evaluation],
        optimizer=None, scheduler=None, scaler=None, resume: Optional[str] = None, method: str = "",
        database_kwargs: Optional[Dict[str, Any]] = None, extra_state: Optional[Callable[[], Dict]] = None,
        load_extra: Optional[Callable[[Dict], None]] = None, key_metric: str = "test_recall@1") -> Statistics:
    """Run epochs ``start..num_epochs``; scheduler steps once per epoch after training."""
    bare = unwrap(model)
    start, stats = 1, Statistics(run.statistics)
    if resume:
        path = run.checkpoint if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            raise UserError(f"--resume: no checkpoint of this run at {path}")
        state = load_checkpoint(path, config, config_keys, model=bare, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler)
        if load_extra is not None:
            load_extra(state)
        start = state["epoch"] + 1
        stats = Statistics.resume(run.statistics, state["epoch"])
        print(f"resumed from {path} at epoch {state['epoch']}")
    best = stats.best(key_metric)

    def _evaluate_and_save(epoch: int, train_row: Dict[str, float]) -> None:
        nonlocal best
        result = evaluate()
        stats.log(epoch, **train_row, **result.metrics)
        _print_row(epoch, num_epochs, {**train_row, **result.metrics})
        if result.metrics.get(key_metric, float("-inf")) > best:
            best = result.metrics[key_metric]
            atomic_save({"model": bare.state_dict(), "config": dict(config), "epoch": epoch}, run.model)
            if result.splits:
                save_database(run.database, config=config, method=method, splits=result.splits,
                              **(database_kwargs or {}))

    if start == 1 and 0 not in stats.rows:
        _evaluate_and_save(0, {})
    for epoch in range(start, num_epochs + 1):
        t0 = time.time()
        train_row = train_one_epoch(epoch)
        if scheduler is not None:
            scheduler.step()
        _evaluate_and_save(epoch, {**train_row})
        save_checkpoint(run.checkpoint, model=bare, config=config, epoch=epoch, optimizer=optimizer,
                        scheduler=scheduler, scaler=scaler, **(extra_state() if extra_state else {}))
        print(f"epoch {epoch} took {time.time() - t0:.1f}s", flush=True)
    return stats
