"""Querying a trained run: its database, the model saved next to it, and embedding a new image.

Every method writes ``results/<method>/<run>_data_base.pth`` and ``<run>_model.pth`` side by side
(:class:`common.engine.RunFiles`); inference, test and ablation scripts open them the same way, so the steps live
here once. What differs per method (building its model from a stored config, its evaluation transform, how its
output becomes an embedding) is passed in by the caller.
"""

from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from common.data.images import open_image
from common.database import Database, Split, load_database
from common.engine import RunFiles
from common.errors import UserError
from common.runio import results_dir

__all__ = [
    "DB_SUFFIX",
    "database_path",
    "run_prefix",
    "model_path",
    "open_database",
    "embed_file",
    "check_dim",
    "labelled",
]

DB_SUFFIX = "_data_base.pth"  # RunFiles.database of run <run>
_DISPLAY_NAMES = {"fastretri": "FastRetri"}  # how error messages name a method; default: upper case

Result = Tuple[str, int, float]  # (image path, label, score), as common.render draws it


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


@torch.inference_mode()
def embed_file(
    model: nn.Module,
    path: str,
    transform: Callable[[Any], torch.Tensor],
    device: torch.device,
    embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Float embedding (on CPU) of any image file, so a query need not be in the database.

    ``transform`` must be the method's evaluation transform and ``embed(model, images)`` (as in
    :func:`common.engine.extract_features`) picks the retrieval embedding when ``model(images)`` is not it.
    """
    try:
        image = open_image(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    images = transform(image)[None].to(device, next(model.parameters()).dtype)
    out = embed(model, images) if embed is not None else model(images)
    return out[0].float().cpu()


def check_dim(features: torch.Tensor, gallery: Split) -> None:
    """Query features (Q, d) embedded by the run's model must have the dimension of the database's features."""
    if features.shape[-1] != gallery.features.shape[1]:
        raise UserError(
            f"the model embeds {features.shape[-1]} dimensions, the database's features have "
            f"{gallery.features.shape[1]}: the database was not written by this model"
        )


def labelled(gallery: Split, scores: torch.Tensor, ids: torch.Tensor) -> List[List[Result]]:
    """Each query's results of :func:`common.search.search` on ``gallery`` as (path, label, score), best first, to
    print and render; missing ones (id -1: an excluded item or an ANN index finding fewer) are left out."""
    return [
        [(gallery.images[i], gallery.labels[i], v) for i, v in zip(row_ids, row_scores) if i >= 0]
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist())
    ]
