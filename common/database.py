"""The retrieval "database": features, labels and image paths of the evaluation splits, plus the run's config.

Layout (a plain dict, ``weights_only``-loadable)::

    {"config": {...}, "method": "cgd", "metric": "euclidean" | "cosine", "scale": 1.0,
     "query": "test", "gallery": "test",
     "splits": {"test": {"images": [str], "labels": [int], "features": FloatTensor[N, D]}, ...}}

``metric`` says how the method ranks: CGD shows Euclidean distances (smaller first), the others a cosine score
(larger first; REIR stores the concatenated per-learner unit vectors with ``scale`` = E, so the score is the mean
per-learner cosine). For unit vectors both orders are the same ranking.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from common.errors import UserError
from common.runio import atomic_save, check_config, safe_load

__all__ = ["Split", "Database", "save_database", "load_database", "check_splits", "find_query"]


@dataclass
class Split:
    images: List[str]
    labels: List[int]
    features: torch.Tensor


@dataclass
class Database:
    config: Dict[str, Any]
    method: str
    metric: str
    scale: float
    query: str
    gallery: str
    splits: Dict[str, Split]

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise UserError(f"database has no '{name}' split (has: {', '.join(self.splits)})")
        return self.splits[name]


def save_database(
    path: os.PathLike,
    *,
    config: Mapping[str, Any],
    method: str,
    splits: Mapping[str, Split],
    metric: str = "cosine",
    scale: float = 1.0,
    query: str = "test",
    gallery: str = "test",
) -> None:
    atomic_save(
        {
            "config": dict(config),
            "method": method,
            "metric": metric,
            "scale": float(scale),
            "query": query,
            "gallery": gallery,
            "splits": {
                k: {
                    "images": list(s.images),
                    "labels": [int(x) for x in s.labels],
                    "features": s.features.detach().float().cpu().contiguous(),
                }
                for k, s in splits.items()
            },
        },
        path,
    )


def load_database(
    path: os.PathLike,
    expected: Optional[Mapping[str, Any]] = None,
    keys: Sequence[str] = (),
    dim: Optional[int] = None,
    mmap: bool = False,
) -> Database:
    """Load and check a database: refused in one line when it was written by a different model configuration
    (``expected`` on ``keys``), or when its contents cannot be what this toolkit wrote (see :func:`check_splits`;
    ``dim``, the embedding size of the model it is used with, when the caller knows it). ``mmap``: the features
    stay in the file's pages, shared by every process that maps it (a server's workers)."""
    obj = safe_load(path, "database", mmap=mmap)
    if expected is not None:
        check_config(obj["config"], expected, f"database {path}", keys)
    try:
        splits = {k: Split(v["images"], v["labels"], v["features"]) for k, v in obj["splits"].items()}
        db = Database(obj["config"], obj["method"], obj["metric"], obj["scale"], obj["query"], obj["gallery"], splits)
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"database {path} is incomplete ({e})") from None
    check_splits(db, path, dim)
    return db


def check_splits(db: Database, path: os.PathLike, dim: Optional[int] = None) -> None:
    """One row of features per image and label, all finite, one dimension in every split: the ``feature_dim`` of
    the stored configuration where it names one, and ``dim`` when given. A database edited or written by other
    code is refused here instead of ranking the wrong images or failing deep inside a search."""
    dims = set()
    for name, split in db.splits.items():
        where = f"database {path}, split {name!r}"
        feats = split.features
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or not feats.is_floating_point():
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise UserError(f"{where}: features are not a 2-D float tensor ({shape})")
        if not isinstance(split.images, list) or not all(isinstance(x, str) for x in split.images):
            raise UserError(f"{where}: images are not a list of paths")
        if not isinstance(split.labels, list) or not all(isinstance(x, int) for x in split.labels):
            raise UserError(f"{where}: labels are not a list of integers")
        if not len(split.images) == len(split.labels) == feats.shape[0]:
            raise UserError(
                f"{where}: {feats.shape[0]} feature rows for {len(split.images)} images and {len(split.labels)} labels"
            )
        if not torch.isfinite(feats).all():
            bad = int((~torch.isfinite(feats)).any(dim=1).sum())
            raise UserError(f"{where}: {bad} feature row(s) hold NaN or infinite values")
        dims.add(feats.shape[1])
    if len(dims) > 1:
        raise UserError(f"database {path}: its splits have features of different dimensions {sorted(dims)}")
    stored = db.config.get("feature_dim")
    for source, want in (("its configuration's feature_dim", stored), ("the model", dim)):
        if isinstance(want, int) and not isinstance(want, bool) and dims and dims != {want}:
            raise UserError(f"database {path}: features have {dims.pop()} dimensions, {source} {want}")
    for name in (db.query, db.gallery):
        db.split(name)


def find_query(images: Sequence[str], name: str) -> int:
    """Index of a query given as the stored path, a path to the same file, or a unique file name."""
    if name in images:
        return list(images).index(name)
    target = os.path.realpath(name)
    for i, path in enumerate(images):
        if os.path.realpath(path) == target:
            return i
    matches = [i for i, path in enumerate(images) if Path(path).name == Path(name).name]
    if len(matches) == 1:
        return matches[0]
    raise UserError(f"{name} not found in the database" + (" (file name is ambiguous)" if matches else ""))
