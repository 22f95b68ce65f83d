"""Helpers shared by REIR/SREML ``test.py`` and ``inference.py``: a database, its model, and embedding new images."""
import argparse
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from common.database import Database, load_database
from common.datasets import open_image
from common.errors import UserError
from common.presets import build_transform
from common.render import framed
from common.runio import check_config, results_dir, safe_load
from reir.model import Model
from reir.train import MODEL_KEYS, build_model

__all__ = ["DB_SUFFIX", "database_path", "open_database", "open_model", "embed_file", "save_unlabelled"]

DB_SUFFIX = "_data_base.pth"


def database_path(name: str, method: str) -> Path:
    """A database given as a path, or as a file name under ``results/<method>/`` (the original's convention)."""
    path = Path(name)
    return path if path.is_file() or path.parent != Path(".") else results_dir(method) / name


def open_database(name: str, method: str, requested: Optional[Dict[str, Any]] = None) -> Tuple[Path, Database]:
    """Load a database of ``method``; flags the user gave explicitly (``requested``) must match its config."""
    path = database_path(name, method)
    requested = {k: v for k, v in (requested or {}).items() if v is not None}
    db = load_database(path, requested, list(requested))
    if db.method != method:
        raise UserError(f"database {path} was written by {db.method!r}, not by {method.upper()}")
    return path, db


def open_model(db_path: Path, db: Database, gpu_ids: Sequence[int], impl: str = "auto") -> Model:
    """The best-epoch model saved next to the database (``<run>_model.pth``), checked against its config."""
    if not db_path.name.endswith(DB_SUFFIX):
        raise UserError(f"{db_path} is not named <run>{DB_SUFFIX}; cannot find its <run>_model.pth")
    path = db_path.with_name(db_path.name[: -len(DB_SUFFIX)] + "_model.pth")
    state = safe_load(path, "model file")
    check_config(state["config"], db.config, f"model file {path}", MODEL_KEYS)
    model = build_model(db.config, gpu_ids, impl)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"model file {path} does not fit its configuration: {str(e).splitlines()[0]}")
    return model.eval()


@torch.inference_mode()
def embed_file(model: Model, path: str, config: Dict[str, Any]) -> torch.Tensor:
    """[E*M] embedding of any image file with the evaluation transform the model was trained with."""
    transform = build_transform(config["method"], False, config["data_name"], config["crop_type"],
                                config.get("image_size"))
    try:
        image = open_image(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}")
    device = next(model.parameters()).device
    return Model.embed(model(transform(image)[None].to(device)))[0].cpu()


def save_unlabelled(out_dir: Path, query_path: str, results: List[Tuple[str, int, float]],
                    size: Tuple[int, int] = (256, 256)) -> Path:
    """The originals' files for a query of unknown label: no green/red frames (correctness is unknown)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    framed(query_path, size).save(out_dir / "query_img.jpg")
    for rank, (path, _, score) in enumerate(results, start=1):
        framed(path, size).save(out_dir / f"retrieval_img_{rank}_{score:.4f}.jpg")
    return out_dir


def runtime_args(args: argparse.Namespace, config: Dict[str, Any]) -> argparse.Namespace:
    """The run's stored configuration, with this invocation's data path, batch size, workers and recalls."""
    merged = dict(config)
    for key in ("data_path", "batch_size", "num_workers", "recalls", "amp", "gpu_ids"):
        if getattr(args, key, None) is not None:
            merged[key] = getattr(args, key)
    return argparse.Namespace(**merged)
