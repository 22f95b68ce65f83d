"""Helpers shared by ``cgd/test.py`` and ``cgd/inference.py``: finding and checking a database and its model,
embedding images with a trained model, and ranking + rendering one query as leftthomas/CGD's test.py did."""
import argparse
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from PIL import Image, ImageDraw
from torch import nn

from cgd.model import MODEL_KEYS, load_trained_model
from common.database import Database, load_database, rank_gallery
from common.datasets import open_image
from common.errors import UserError
from common.presets import build_transform
from common.render import framed, save_retrieval
from common.runio import results_dir

__all__ = ["database_path", "model_path", "requested_config", "open_database", "open_model", "embed_file",
           "rank_and_render"]

DB_SUFFIX = "_data_base.pth"


def database_path(name: str) -> Path:
    """A database given as a path, or as a file name under ``results/cgd/`` (the original's convention)."""
    path = Path(name)
    return path if path.is_file() or path.parent != Path(".") else results_dir("cgd") / name


def model_path(db_path: Path) -> Path:
    """``<run>_model.pth`` next to ``<run>_data_base.pth``."""
    if not db_path.name.endswith(DB_SUFFIX):
        raise UserError(f"{db_path} is not named <run>{DB_SUFFIX}; cannot find its <run>_model.pth")
    return db_path.with_name(db_path.name[: -len(DB_SUFFIX)] + "_model.pth")


def requested_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The model-defining flags the user actually gave (the rest default to None and come from the database)."""
    return {k: getattr(args, k) for k in MODEL_KEYS if getattr(args, k, None) is not None}


def open_database(args: argparse.Namespace) -> Tuple[Path, Database]:
    """Load ``--data_base``, refusing (one line) a CGD database of another model or a database of another method."""
    path = database_path(args.data_base)
    requested = requested_config(args)
    db = load_database(path, requested, list(requested))
    if db.method != "cgd":
        raise UserError(f"database {path} was written by {db.method!r}, not by CGD")
    return path, db


def open_model(db_path: Path, db: Database, device: torch.device) -> nn.Module:
    """The trained model saved with the database, checked against the database's configuration."""
    model, _ = load_trained_model(model_path(db_path), {k: db.config.get(k) for k in MODEL_KEYS})
    return model.to(device).eval()


@torch.inference_mode()
def embed_file(model: nn.Module, path: str, config: Dict[str, Any], device: torch.device) -> torch.Tensor:
    """Embedding (feature_dim,) of any image file, with the test transform the model was evaluated with."""
    transform = build_transform("cgd", False, config["data_name"], config["crop_type"], config.get("image_size"))
    try:
        image = open_image(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}")
    return model(transform(image)[None].to(device))[0][0].float().cpu()


def _save_unlabelled(out_dir: Path, query_path: str, results: List[Tuple[str, int, float]],
                     size: Tuple[int, int] = (224, 224), cell: int = 160) -> Path:
    """Like ``save_retrieval`` for a query of unknown label: no green/red frames (correctness is unknown)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    framed(query_path, size).save(out_dir / "query_img.jpg")
    grid = Image.new("RGB", ((len(results) + 1) * (cell + 8) + 8, cell + 34), "white")
    draw = ImageDraw.Draw(grid)
    tiles = [(query_path, "query")] + [(p, f"#{r} {s:.4f}") for r, (p, _, s) in enumerate(results, start=1)]
    for i, (path, text) in enumerate(tiles):
        if i:
            framed(path, size).save(out_dir / f"retrieval_img_{i}_{results[i - 1][2]:.4f}.jpg")
        grid.paste(framed(path, (cell, cell)), (8 + i * (cell + 8), 8))
        draw.text((12 + i * (cell + 8), cell + 11), text, fill="black")
    grid.save(out_dir / "grid.png")
    return out_dir


def rank_and_render(db: Database, query_path: str, query_label: Optional[int], feature: torch.Tensor, k: int,
                    exclude: Optional[int] = None) -> Tuple[Path, List[Tuple[str, int, float]]]:
    """Rank the gallery by Euclidean distance, print the list and write ``results/cgd/<query stem>/``."""
    gallery = db.split(db.gallery)
    available = len(gallery.images) - (1 if exclude is not None else 0)
    if not 1 <= k <= available:
        raise UserError(f"--retrieval_num {k} must be between 1 and the {available} gallery images")
    index, scores = rank_gallery(feature, gallery.features, "euclidean", k, exclude=exclude)
    results = [(gallery.images[i], gallery.labels[i], float(s)) for i, s in zip(index.tolist(), scores.tolist())]
    out_dir = results_dir("cgd") / Path(query_path).stem
    if query_label is None:
        out = _save_unlabelled(out_dir, query_path, results)
    else:
        out = save_retrieval(out_dir, query_path, query_label, results)
    print(f"query {query_path} (label {'unknown' if query_label is None else query_label}): "
          f"{k} nearest of {len(gallery.images)} gallery images")
    for rank, (path, lab, dist) in enumerate(results, start=1):
        mark = "" if query_label is None else ("  correct" if lab == query_label else "  wrong")
        print(f"{rank:3d}. {dist:.4f}  label {lab}  {path}{mark}")
    print(f"saved to {out}")
    return out, results
