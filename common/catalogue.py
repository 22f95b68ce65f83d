"""A database that grows and shrinks in place: ``inference.py --data_base DB --add DIR_OR_LIST`` / ``--remove LIST``.

Only the new images are embedded, with the model the database stores; paths already in the database are skipped
and counted (re-adding a folder changes nothing), and labels come from a ``path,label`` CSV, with one id per label
name across additions (the names are stored in the database's configuration). A faiss index beside the database
is updated, not rebuilt, where faiss allows it: IVF adds and deletes vectors in place (a deletion renumbers the
remaining ids so that they stay row numbers; the coarse quantizer is not retrained), HNSW adds in place but
cannot delete, so a removal rebuilds its graph.

**Atomic.** An update writes the new index to a new file (``<database>.<kind>.<generation>.faiss``), then replaces
the database, which names its index file, with one rename, then deletes the old index file. A kill at any moment
leaves the old database with its index or the new one with its index; the files a killed update leaves behind are
deleted by the next update. Updates of one database take a lock file (``<database>.lock``) in turn, so a script
and a server can both write. The database is rewritten whole (a sequential write of its features); embedding and
the index update cost time in proportion to the images added or removed.

**Scales out.** Under ``torchrun`` (``--gallery`` and ``--add``) process r embeds images r, r+N, ...; the rows are
gathered by index and rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from common.cli import add_flag
from common.collection import embed_items, join_processes, label_ids, list_items
from common.database import Database, Split, load_database, save_database
from common.distributed import (
    broadcast_object,
    is_main_process,
)
from common.errors import UserError
from common.query import embed_fn
from common.runs import database_path, model_of_database
from common.spec import MethodSpec

__all__ = [
    "Report",
    "add_catalogue_flags",
    "join_processes",
    "embed_items",
    "listed",
    "update",
    "run_update",
    "locked",
    "commit",
]

Items = Sequence[Tuple[str, Optional[str]]]  # (image path, label name or None)


@dataclass
class Report:
    """What one update did (printed by ``inference.py``, returned as JSON by the server)."""

    added: int = 0
    present: int = 0  # asked to add, already in the database: skipped
    unreadable: int = 0  # asked to add, could not be read: skipped, listed in <database>.errors.log
    removed: int = 0
    missing: int = 0  # asked to remove, not in the database
    images: int = 0  # gallery size after the update
    embed_seconds: float = 0.0  # embedding the new images
    write_seconds: float = 0.0  # updating the index and writing the database (atomically)

    def line(self) -> str:
        return (
            f"added {self.added}, skipped {self.present} already present and {self.unreadable} unreadable, "
            f"removed {self.removed} ({self.missing} not in the database): {self.images} images "
            f"(embedding {self.embed_seconds:.1f} s, writing {self.write_seconds:.1f} s)"
        )


def add_catalogue_flags(parser: argparse.ArgumentParser) -> None:
    """``--add`` / ``--remove`` (and ``--float64`` for N-process vs 1-process checks) of ``inference.py``."""
    g = parser.add_argument_group("growing and shrinking --data_base in place (atomic; --index updates its index)")
    add_flag(
        g,
        "add",
        default=None,
        type=str,
        help="embed the images of a folder, an image file or a list file (paths, or a CSV with 'path' and optional "
        "'label' columns) that --data_base does not hold yet, and append them; paths present are skipped",
    )
    add_flag(g, "remove", default=None, type=str, help="remove the images of a folder, an image file or a list file")
    add_flag(g, "float64", action="store_true", help="embed in float64 (makes N processes comparable with one)")


def listed(source: str) -> List[Tuple[str, Optional[str]]]:
    """(path, label name or None) of an image file, a folder (recursive) or a list file (``path[,label]`` CSV)."""
    return list_items(source)


# ---------------------------------------------------------------- one update


@contextlib.contextmanager
def locked(db_path: os.PathLike) -> Iterator[None]:
    """Hold ``<database>.lock`` (an exclusive flock: another writer waits; released if the process dies)."""
    with open(f"{db_path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _index_file(db_path: Path, kind: str, generation: int) -> Path:
    return db_path.with_name(f"{db_path.name}.{kind}.{generation}.faiss")


def _clean_leftovers(db_path: Path, config: Dict) -> None:
    """Delete what a killed update left: temporary files and index files the database does not name."""
    keep = Path(config["ann_index"]).name if config.get("ann_index") else None
    name = db_path.name
    for f in db_path.parent.iterdir():
        stale_tmp = f.name.endswith(".tmp") and (f.name.startswith(f".{name}.") or f.name.startswith(f"{name}."))
        parts = f.name[len(name) + 1 :].split(".") if f.name.startswith(f"{name}.") else []
        generation = all(x.isdigit() for x in parts[1:-1])
        stale_index = parts[:1] in (["ivf"], ["hnsw"]) and parts[-1:] == ["faiss"] and generation
        if (stale_tmp or stale_index) and f.name != keep:
            f.unlink(missing_ok=True)


def _plan(
    gallery: Split, add: Items, remove: Sequence[str]
) -> Tuple[List[Tuple[str, Optional[str]]], np.ndarray, int, int]:
    """(items to embed, keep mask of the stored rows, how many asked-for items are present, how many removals
    are not in the database). Paths compare as absolute paths; a path removed and added in one update is
    re-embedded."""
    stored = {os.path.abspath(p): i for i, p in enumerate(gallery.images)}
    keep = np.ones(len(gallery.images), dtype=bool)
    missing = 0
    for p in remove:
        i = stored.get(os.path.abspath(p))
        if i is None:
            missing += 1
        else:
            keep[i] = False
    seen = {p for p, i in stored.items() if keep[i]}
    new, present = [], 0
    for p, label in add:
        key = os.path.abspath(p)
        if key in seen:
            present += 1
        else:
            seen.add(key)
            new.append((p, label))
    return new, keep, present, missing


def _updated_index(path: Optional[str], kind: str, metric: str, keep: np.ndarray, added: torch.Tensor, features):
    """The ANN index of the new gallery: the stored one updated in place where faiss can, else built anew."""
    from common.ann import _faiss, _numpy32, build_index, load_index

    old = load_index(path) if path and Path(path).is_file() else None
    if old is not None and (old.kind != kind or old.size != len(keep)):
        print(f"the stored {old.kind} index does not match the database ({old.size} rows); rebuilding it")
        old = None
    if old is None:
        return build_index(features, metric, kind)
    ann = old.faiss_index
    if not keep.all():
        if kind == "hnsw":  # faiss's HNSW cannot delete: a new graph with the same settings
            index = build_index(
                features, metric, kind, hnsw_m=ann.hnsw.nb_neighbors(1), ef_construction=ann.hnsw.efConstruction
            )
            index.faiss_index.hnsw.efSearch = max(index.faiss_index.hnsw.efSearch, ann.hnsw.efSearch)
            return index
        faiss = _faiss()
        gone = np.flatnonzero(~keep).astype(np.int64)
        ann.remove_ids(faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(gone)))
        row = np.cumsum(keep) - 1  # new row number of each kept old row
        for lst in range(ann.nlist):  # ids stay row numbers: renumber the inverted lists in place
            n = ann.invlists.list_size(lst)
            if n:
                ids = faiss.rev_swig_ptr(ann.invlists.get_ids(lst), n)
                ids[:] = row[ids]
    if len(added):
        ann.add(_numpy32(added))
    old.size = ann.ntotal
    return old


def commit(db_path: Path, db: Database, keep: np.ndarray, new: Split, kind: Optional[str] = None) -> Database:
    """Write the database with the stored gallery rows ``keep`` (a mask) followed by ``new``, and its updated index
    (``kind``, or the kind it has), atomically: see the module docstring for the order. Hold :func:`locked`."""
    from common.ann import save_index

    _clean_leftovers(db_path, db.config)
    old = db.split(db.gallery)
    kept = torch.from_numpy(np.flatnonzero(keep))
    features = torch.cat([old.features[kept].float(), new.features.float().reshape(-1, old.features.shape[1])])
    gallery = Split(
        [old.images[i] for i in kept.tolist()] + list(new.images),
        [old.labels[i] for i in kept.tolist()] + list(new.labels),
        features,
    )
    config = dict(db.config)
    config["generation"] = int(config.get("generation", 0)) + 1
    old_index = config.get("ann_index")
    kind = kind or _stored_kind(db_path, config)
    if kind is not None:
        ann = _updated_index(old_index, kind, db.metric, keep, new.features, features)
        target = _index_file(db_path, kind, config["generation"])
        save_index(ann, target)
        config["ann_index"] = str(target.resolve())
    splits = {**db.splits, db.gallery: gallery}
    save_database(
        db_path,
        config=config,
        method=db.method,
        splits=splits,
        metric=db.metric,
        scale=db.scale,
        query=db.query,
        gallery=db.gallery,
    )
    if old_index and old_index != config.get("ann_index"):
        Path(old_index).unlink(missing_ok=True)
    return Database(config, db.method, db.metric, db.scale, db.query, db.gallery, splits)


def _stored_kind(db_path: Path, config: Dict) -> Optional[str]:
    """Kind of the database's index from its file name (``<database>.<kind>[.<generation>].faiss``), else read."""
    path = config.get("ann_index")
    if not path:
        return None
    kind = Path(path).name[len(db_path.name) + 1 :].split(".")[0]
    if Path(path).name.startswith(f"{db_path.name}.") and kind in ("ivf", "hnsw"):
        return kind
    from common.ann import load_index

    return load_index(path).kind


def update(
    spec: MethodSpec,
    db_path: os.PathLike,
    *,
    add: Items = (),
    remove: Sequence[str] = (),
    get_model: Callable[[Database], nn.Module],
    device: torch.device,
    index: Optional[str] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    embed: Optional[Callable] = None,
) -> Tuple[Database, Report]:
    """Add ``add`` (paths with label names or None) and remove ``remove`` (paths) in one atomic update of the
    database's gallery split; ``index`` ('ivf' / 'hnsw') also keeps an ANN index of that kind (an existing index
    is always kept up to date). Every torchrun rank calls this; rank 0 plans, writes and returns the report."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise UserError(f"database not found: {db_path}")
    with locked(db_path) if is_main_process() else contextlib.nullcontext():
        db = load_database(db_path, mmap=True)
        if db.method != spec.name:
            raise UserError(f"database {db_path} was written by {db.method!r}, not by {spec.display}")
        gallery = db.split(db.gallery)
        plan = None
        if is_main_process():
            new, keep, present, missing = _plan(gallery, add, remove)
            names = dict(db.config.get("label_names") or {})
            first = max(gallery.labels, default=-1) + 1
            plan = (label_ids(new, names, first), keep, present, missing, names)
        new, keep, present, missing, names = broadcast_object(plan)
        report = Report(present=present, missing=missing, removed=int((~keep).sum()))
        features = torch.empty(0, gallery.features.shape[1])
        kept: List[int] = []
        start = time.perf_counter()
        if new:
            model = get_model(db)
            features, kept, bad = embed_items(
                model,
                new,
                spec.eval_transform(db.config),
                device=device,
                batch_size=batch_size,
                num_workers=num_workers,
                embed=embed or spec.embed,
                desc=f"embedding {len(new)} new images",
            )
            report.unreadable = len(bad)
            if bad and is_main_process():
                Path(f"{db_path}.errors.log").write_text("".join(f"{new[i][0]}\n" for i in bad))
        report.added, report.embed_seconds = len(kept), time.perf_counter() - start
        report.images = len(gallery.images) - report.removed + report.added
        if not is_main_process():
            return db, report
        unchanged = not kept and keep.all() and (index is None or _stored_kind(db_path, db.config) == index)
        if unchanged:
            return db, report
        if report.images == 0:
            raise UserError(f"removing {report.removed} images would leave database {db_path} empty; nothing written")
        if names:
            db.config["label_names"] = names
        added = Split([new[i][0] for i in kept], [new[i][1] for i in kept], features)
        start = time.perf_counter()
        db = commit(db_path, db, keep, added, index)
        report.write_seconds = time.perf_counter() - start
        return db, report


def run_update(
    spec: MethodSpec,
    data_base: str,
    device: torch.device,
    *,
    add: Optional[str] = None,
    remove: Optional[str] = None,
    index: str = "exact",
    batch_size: int = 64,
    num_workers: int = 0,
    float64: bool = False,
    flip: bool = False,
) -> Tuple[Path, Database]:
    """``inference.py --add`` / ``--remove`` on ``--data_base``: one atomic update, its counts printed."""
    db_path = database_path(data_base, spec.name)
    items = listed(add) if add else []
    gone = [p for p, _ in listed(remove)] if remove else []

    def get_model(db: Database) -> nn.Module:
        model = model_of_database(spec, db_path, db, device)
        return model.double() if float64 else model

    db, report = update(
        spec,
        db_path,
        add=items,
        remove=gone,
        get_model=get_model,
        device=device,
        index=None if index == "exact" else index,
        batch_size=batch_size,
        num_workers=num_workers,
        embed=embed_fn(spec, flip),
    )
    if is_main_process():
        print(
            f"{db_path}: {report.line()}"
            + (f" (unreadable listed in {db_path}.errors.log)" if report.unreadable else "")
        )
    return db_path, db
