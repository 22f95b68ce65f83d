"""What a server answers from: a run's model and memory-mapped database, reloaded when the file changes, with the
queue that embeds and searches the queries of concurrent requests together; and the check of an uploaded image.

Nothing here knows HTTP: :mod:`common.service` maps these to routes, status codes and JSON."""

import io
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

import torch
from PIL import Image

from common.ann import build_index, load_index
from common.catalogue import Report, update
from common.data.images import open_image
from common.database import Database, Split, load_database
from common.errors import UserError
from common.query import labelled
from common.runs import model_of_database
from common.search import Index, prepare_gallery, search
from common.spec import MethodSpec

__all__ = ["BadImage", "read_upload", "State", "Searcher"]


class BadImage(Exception):
    """An upload the server refuses: ``status`` is the HTTP code (400 unreadable or a bomb, 413 too large)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_upload(stream, max_bytes: int, max_pixels: int) -> Tuple[bytes, Image.Image]:
    """(bytes, RGB image) of an upload, decoded as ``inference.py`` decodes a file (``open_image``); the size is
    checked before reading further and the pixel count from the header before decoding."""
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadImage(413, f"upload over the {max_bytes} byte limit")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
        if width * height > max_pixels:
            raise BadImage(400, f"image of {width}x{height} pixels is over the {max_pixels} pixel limit")
        return data, open_image(io.BytesIO(data))
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(400, f"image refused as a decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(400, f"not a readable image: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- the loaded database


@dataclass
class State:
    """One loaded version of the database: its gallery, the index searching it, and path lookups (built once)."""

    stamp: Tuple[int, int, int]  # (inode, mtime, size) of the file it was loaded from
    db: Database
    gallery: Split
    index: Index
    root: Optional[str] = None  # folder the /images/ addresses are relative to
    real_root: Optional[str] = None
    _rows: Optional[Dict[str, int]] = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rows(self) -> Dict[str, int]:
        """Absolute path -> gallery row, built at the first look-up (a dict of every path)."""
        with self._lock:
            if self._rows is None:
                self._rows = {os.path.abspath(p): i for i, p in enumerate(self.gallery.images)}
            return self._rows

    def image_root(self) -> str:
        with self._lock:
            if self.root is None:
                folders = {os.path.dirname(os.path.abspath(p)) for p in self.gallery.images}
                self.root = os.path.commonpath(sorted(folders)) if folders else os.getcwd()
            if self.real_root is None:
                self.real_root = os.path.realpath(self.root)
            return self.root

    def thumbnail(self, path: str) -> Optional[str]:
        full, root = os.path.abspath(path), self.image_root()
        rel = os.path.relpath(full, root)
        return None if rel == ".." or rel.startswith("../") else "/images/" + quote(rel.replace(os.sep, "/"))

    def label_name(self, label: int) -> Optional[str]:
        names = self.db.config.get("label_names") or {}
        return next((n for n, i in names.items() if i == label), None) if names else None


@dataclass
class _Job:
    image: Optional[torch.Tensor]  # a transformed upload, or
    path: Optional[str]  # an image of the database
    k: int
    future: Future = field(default_factory=Future)


class Searcher:
    """A run's model and database (memory-mapped) with its index; reloaded when the database file changes.

    Searches are queued to one thread that takes every query waiting, embeds the uploads in one forward pass and
    searches the whole batch in one pass over the gallery (:func:`common.search.search`)."""

    def __init__(
        self,
        spec: MethodSpec,
        db_path: os.PathLike,
        *,
        device: torch.device,
        index: Optional[str] = None,
        image_root: Optional[str] = None,
        max_batch: int = 16,
    ):
        self.spec, self.db_path, self.device = spec, Path(db_path), device
        if not self.db_path.is_file():
            raise UserError(f"database not found: {self.db_path}")
        self.requested, self.image_root, self.max_batch = index, image_root, max_batch
        self._reload = threading.Lock()
        self.state = self._load()
        self.model = model_of_database(spec, self.db_path, self.state.db, device)
        self.transform = spec.eval_transform(self.state.db.config)
        self._jobs: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._work, name="search-batches", daemon=True).start()

    # ---- loading

    def _stamp(self) -> Tuple[int, int, int]:
        st = os.stat(self.db_path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self) -> State:
        for attempt in range(3):  # an update may replace the database (and delete its old index) meanwhile
            stamp = self._stamp()
            db = load_database(self.db_path, mmap=True)
            if db.method != self.spec.name:
                raise UserError(f"database {self.db_path} was written by {db.method!r}, not by {self.spec.display}")
            gallery = db.split(db.gallery)
            try:
                index = self._index(db, gallery)
            except UserError:
                if attempt < 2 and self._stamp() != stamp:
                    continue
                raise
            root = os.path.abspath(self.image_root) if self.image_root else None
            return State(stamp, db, gallery, index, root)
        raise AssertionError("unreachable")

    def _index(self, db: Database, gallery: Split) -> Index:
        """The database's own ANN index (as ``inference.py`` uses it), one built now for ``--index``, or exact."""
        path = db.config.get("ann_index")
        if path and self.requested != "exact":
            if not Path(path).is_file():
                raise UserError(f"the database's ANN index {path} is missing; rebuild it or serve with --index exact")
            stored = load_index(path)
            if self.requested in (None, stored.kind):
                return stored
        if self.requested in ("ivf", "hnsw"):
            print(f"building a {self.requested} index in memory (the database has none of that kind)")
            return build_index(gallery.features, db.metric, self.requested)
        prepared = prepare_gallery(gallery.features, db.metric, few_queries=True)  # fp32: the mapped features
        return Index("exact", prepared.metric, *prepared.features.shape, exact=prepared)

    def current(self) -> State:
        """The loaded state, reloaded first when the database file was replaced."""
        try:
            changed = self._stamp() != self.state.stamp
        except FileNotFoundError:
            return self.state
        if changed:
            with self._reload:
                if self._stamp() != self.state.stamp:
                    self.state = self._load()
        return self.state

    # ---- searching

    def search(self, k: int, image: Optional[torch.Tensor] = None, path: Optional[str] = None, timeout=120.0):
        """(state, results [(path, label, score)]) for an upload (transformed) or a stored image."""
        job = _Job(image, path, k)
        self._jobs.put(job)
        return job.future.result(timeout=timeout)

    def _work(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                self._answer(jobs)
            except BaseException as e:  # noqa: BLE001 - reported to every waiting request, the thread goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    @torch.inference_mode()
    def _answer(self, jobs: Sequence[_Job]) -> None:
        state = self.current()
        gallery = state.gallery
        rows: List[Optional[int]] = []
        for job in jobs:
            row = state.rows().get(os.path.abspath(job.path)) if job.path is not None else None
            if job.path is not None and row is None:
                job.future.set_exception(LookupError(f"{job.path} is not an image of the database"))
            rows.append(row)
        live = [(j, r) for j, r in zip(jobs, rows) if not j.future.done()]
        if not live:
            return
        features = torch.empty(len(live), gallery.features.shape[1])
        uploads = [i for i, (j, _) in enumerate(live) if j.image is not None]
        if uploads:
            dtype = next(self.model.parameters()).dtype
            batch = torch.stack([live[i][0].image for i in uploads]).to(self.device, dtype)
            features[uploads] = self.spec.embed(self.model, batch).float().cpu()
        for i, (_, row) in enumerate(live):
            if row is not None:
                features[i] = gallery.features[row]
        k = min(max(j.k for j, _ in live), len(gallery.images))  # the gallery may have shrunk since the request
        db = state.db
        found = search(features, gallery.features, k, db.metric, db.scale, [r for _, r in live], state.index)
        lists = labelled(gallery, *found)
        for (job, _), results in zip(live, lists):
            job.future.set_result((state, results[: job.k]))

    # ---- updating

    def update(self, add=(), remove=(), persist: Optional[str] = None) -> Report:
        """The catalogue update of ``inference.py --add`` / ``--remove`` with this server's model; then reload."""
        _, report = update(
            self.spec,
            self.db_path,
            add=add,
            remove=remove,
            get_model=lambda db: self.model,
            device=self.device,
            index=persist,
            batch_size=32,
            num_workers=0,
        )
        self.current()
        return report
