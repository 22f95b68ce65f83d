"""``<method>/serve.py``: one process loads a run's model and database once and answers searches over HTTP.

    python cgd/serve.py --data_base results/cgd/mine_data_base.pth          # http://127.0.0.1:8000/

* ``GET /healthz``: 200 and the gallery's size once the model and database are loaded;
* ``POST /search`` (multipart: ``image`` = a file, or ``path`` = an image of the database; ``k``, default 10):
  ``{"query": ..., "results": [{"rank", "path", "label", "score", "thumbnail"}, ...], "took_ms"}``, the ranking
  ``inference.py --query_img_name`` gives for the same file (same decoding, transform, model and search);
* ``GET /``: a page to choose or drop an image and browse its top k; ``GET /images/<path>``: thumbnails of the
  database's own images, addressed relative to the image root (the folder holding them all, or ``--image_root``);
* ``POST /images`` (uploads ``images`` with an optional ``label``, and/or ``source`` = a folder or list file on the
  server) and ``DELETE /images`` (JSON ``{"paths": [...]}``): the atomic update of ``inference.py --add`` /
  ``--remove`` (:mod:`common.catalogue`), refused (403) unless the server runs with ``--allow-write``, and (401)
  unless the request carries ``Authorization: Bearer <token>``.

Bad input gets a JSON error and the server goes on: not an image 400, a decompression bomb (more pixels than
``--max_pixels``) 400, a body over ``--max_upload_mb`` 413, a wrong ``k`` 422. The database is memory-mapped, so
the workers of ``--workers N`` share one copy of its features (cosine methods search the mapped features in place;
CGD's Euclidean search keeps one prepared copy per worker; an ANN index is read into each worker). When the
database file changes (an update by this server, another worker or a script), the next request reloads it. Queries
that arrive together are embedded in one forward pass and searched in one pass over the gallery.
"""

import argparse
import hashlib
import hmac
import importlib
import io
import ipaddress
import json
import os
import queue
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

import torch
from PIL import Image

from common.ann import build_index, load_index
from common.catalogue import Report, listed, update
from common.cli import add_flag
from common.data.images import IMAGE_EXTENSIONS, open_image
from common.database import Database, Split, load_database
from common.device import script_device
from common.errors import UserError
from common.query import labelled
from common.runs import database_path, model_of_database, run_prefix
from common.search import Index, prepare_gallery, search
from common.spec import MethodSpec

__all__ = ["serve_parser", "run_server", "Searcher", "create_app", "TOKEN_ENV"]

TOKEN_ENV = "RETRIEVAL_SERVE_TOKEN"
_WORKER_ENV = "RETRIEVAL_SERVE_ARGS"  # --workers N: the settings each worker process builds its app from
PAGE = Path(__file__).with_name("static") / "serve.html"
THUMBNAIL = 256
_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


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
class _State:
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

    def _load(self) -> _State:
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
            return _State(stamp, db, gallery, index, root)
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

    def current(self) -> _State:
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


# ---------------------------------------------------------------- the HTTP application


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def create_app(
    searcher: Searcher,
    *,
    allow_write: bool = False,
    token: Optional[str] = None,
    max_upload_bytes: int = 16 * 2**20,
    max_pixels: int = 64_000_000,
    max_k: int = 1000,
    upload_dir: Optional[os.PathLike] = None,
    persist_index: Optional[str] = None,
):
    """The FastAPI application of a loaded :class:`Searcher` (see the module docstring for the endpoints)."""
    from fastapi import Body, FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    if allow_write and not token:
        raise UserError(f"--allow-write needs a token: --token TOKEN or the {TOKEN_ENV} environment variable")
    spec = searcher.spec
    uploads = Path(upload_dir) if upload_dir else searcher.db_path.parent / f"{run_prefix(searcher.db_path)}_uploads"
    app = FastAPI(title=f"{spec.display} image search", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_upload_bytes + 2**16:  # multipart framing on top of the file
            return JSONResponse({"detail": f"request body over the {max_upload_bytes} byte limit"}, 413)
        return await call_next(request)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, 500)

    def result_json(state: _State, results) -> List[Dict[str, Any]]:
        return [
            {
                "rank": rank,
                "path": path,
                "label": None if label is None or label < 0 else int(label),
                "label_name": state.label_name(label),
                "score": float(score),
                "thumbnail": state.thumbnail(path),
            }
            for rank, (path, label, score) in enumerate(results, start=1)
        ]

    def image_of(upload: UploadFile) -> Tuple[bytes, Image.Image]:
        try:
            return read_upload(upload.file, max_upload_bytes, max_pixels)
        except BadImage as e:
            raise HTTPException(e.status, f"{upload.filename}: {e}") from None

    def authorise(request: Request) -> None:
        if not allow_write:
            raise HTTPException(403, "this server is read-only: start it with --allow-write and a token to change it")
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})

    def updated(**kwargs) -> Dict[str, Any]:
        try:
            return asdict(searcher.update(persist=persist_index, **kwargs))
        except UserError as e:
            raise HTTPException(400, str(e)) from None

    @app.get("/healthz")
    def healthz() -> Dict[str, Any]:
        state = searcher.current()
        return {
            "status": "ready",
            "method": spec.name,
            "images": len(state.gallery.images),
            "metric": state.db.metric,
            "index": state.index.kind,
            "max_k": max_k,
            "writable": allow_write,
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.post("/search")
    def search(
        image: Optional[UploadFile] = File(None),
        path: Optional[str] = Form(None),
        k: int = Form(10, ge=1, le=max_k),
        label: Optional[str] = Form(None),
    ) -> Dict[str, Any]:
        start = time.perf_counter()
        if (image is None) == (path is None):
            raise HTTPException(422, "give either an image file ('image') or an image of the database ('path')")
        available = len(searcher.current().gallery.images) - (1 if path is not None else 0)
        if k > available:
            raise HTTPException(422, f"k={k} is more than the {available} images to rank")
        try:
            if image is not None:
                state, results = searcher.search(k, image=searcher.transform(image_of(image)[1]))
            else:
                state, results = searcher.search(k, path=path)
        except LookupError as e:
            raise HTTPException(404, str(e)) from None
        query: Dict[str, Any] = {"path": path if path is not None else image.filename, "label": None}
        if path is not None:
            stored = state.gallery.labels[state.rows()[os.path.abspath(path)]]
            query.update(label=None if stored < 0 else stored, thumbnail=state.thumbnail(path))
        elif label not in (None, ""):
            names = state.db.config.get("label_names") or {}
            query["label"] = names.get(label, int(label) if label.lstrip("-").isdigit() else None)
        query["label_name"] = None if query["label"] is None else state.label_name(query["label"])
        took = 1000 * (time.perf_counter() - start)
        return {"query": query, "results": result_json(state, results), "took_ms": round(took, 2)}

    @app.get("/images/{address:path}")
    def thumbnail(address: str) -> Response:
        state = searcher.current()
        parts = address.split("/")
        if not address or address.startswith("/") or "\\" in address or "\0" in address or ".." in parts:
            raise HTTPException(400, "an image address is a relative path without '..'")
        full = os.path.normpath(os.path.join(state.image_root(), address))
        if full not in state.rows():
            raise HTTPException(404, "not an image of the database")
        real = os.path.realpath(full)
        if os.path.commonpath([real, state.real_root]) != state.real_root:
            raise HTTPException(403, "the image resolves outside the image root")
        try:
            img = open_image(real)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise HTTPException(404, "the image cannot be read") from None
        img.thumbnail((THUMBNAIL, THUMBNAIL))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
        return Response(out.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/images")
    def add_images(
        request: Request,
        images: List[UploadFile] = File(default=[]),
        label: Optional[str] = Form(None),
        source: Optional[str] = Form(None),
    ) -> Dict[str, Any]:
        authorise(request)
        items: List[Tuple[str, Optional[str]]] = []
        for upload in images:
            data, _ = image_of(upload)
            with Image.open(io.BytesIO(data)) as probe:
                suffix = _SUFFIX.get(probe.format or "", Path(upload.filename or "").suffix.lower())
            name = hashlib.sha256(data).hexdigest()[:24] + (suffix if suffix in IMAGE_EXTENSIONS else ".png")
            target = uploads / name
            if not target.is_file():  # same bytes, same file: a repeated upload is skipped as present
                uploads.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{name}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
            items.append((str(target), label or None))
        if source:
            try:
                items += listed(source)
            except UserError as e:
                raise HTTPException(400, str(e)) from None
        if not items:
            raise HTTPException(422, "give image files ('images') or a folder or list file on the server ('source')")
        return updated(add=items)

    @app.delete("/images")
    def remove_images(request: Request, paths: List[str] = Body(..., embed=True)) -> Dict[str, Any]:
        authorise(request)
        return updated(remove=paths)

    return app


# ---------------------------------------------------------------- serve.py


def serve_parser(spec: MethodSpec, add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of every method's ``serve.py``."""
    parser = argparse.ArgumentParser(
        description=f"Serve {spec.display} image search over HTTP: a JSON API and a web page", add_help=add_help
    )
    add_flag(
        parser,
        "data_base",
        default=spec.default_data_base,
        type=str,
        help=f"the database to serve, a path or a name under results/{spec.name}/; its model is the one it names "
        f"or the <run>_model.pth beside it (default: {spec.default_data_base})",
    )
    add_flag(parser, "host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    add_flag(parser, "port", default=8000, type=int, help="port (default: 8000)")
    add_flag(
        parser,
        "index",
        default=None,
        choices=["exact", "ivf", "hnsw"],
        help="search with the database's stored ANN index (default), exactly, or with an ivf/hnsw index (built in "
        "memory if the database has none; with --allow-write, updates then store one)",
    )
    add_flag(parser, "workers", default=1, type=int, help="server processes sharing the mapped database (default: 1)")
    add_flag(parser, "gpu_ids", default=None, type=str, help="GPU to embed queries on (default: first; CPU if none)")
    add_flag(parser, "max_batch", default=16, type=int, help="queries embedded and searched together (default: 16)")
    add_flag(parser, "max_k", default=1000, type=int, help="largest k a search may ask for (default: 1000)")
    add_flag(parser, "max_upload_mb", default=16.0, type=float, help="largest request body in MB (default: 16)")
    add_flag(
        parser,
        "max_pixels",
        default=64_000_000,
        type=int,
        help="largest image in pixels; beyond: refused as a decompression bomb (default: 64000000)",
    )
    add_flag(
        parser,
        "image_root",
        default=None,
        type=str,
        help="folder /images/ addresses are relative to (default: "
        "the deepest folder holding every image of the database)",
    )
    g = parser.add_argument_group("changing the database over HTTP (POST / DELETE /images)")
    add_flag(g, "allow_write", action="store_true", help="accept updates from requests that carry the token")
    add_flag(g, "token", default=None, type=str, help=f"the token (default: the {TOKEN_ENV} environment variable)")
    add_flag(
        g,
        "upload_dir",
        default=None,
        type=str,
        help="where uploaded images are kept (default: <run>_uploads/ beside the database)",
    )
    add_flag(parser, "log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def build_app(spec: MethodSpec, args: argparse.Namespace, token: Optional[str]):
    """Load the run named by ``args`` and return its application (one per worker process)."""
    device = script_device(args)
    searcher = Searcher(
        spec,
        database_path(args.data_base, spec.name),
        device=device,
        index=args.index,
        image_root=args.image_root,
        max_batch=args.max_batch,
    )
    return create_app(
        searcher,
        allow_write=args.allow_write,
        token=token,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_k=args.max_k,
        upload_dir=args.upload_dir,
        persist_index=args.index if args.index in ("ivf", "hnsw") else None,
    )


def app_from_environment():
    """uvicorn's factory for ``--workers N``: each worker process builds the application ``serve.py`` describes."""
    settings = json.loads(os.environ[_WORKER_ENV])
    spec = importlib.import_module(f"{settings['method']}.spec").SPEC
    args = argparse.Namespace(**settings["args"])
    return build_app(spec, args, args.token)


def run_server(spec: MethodSpec, args: argparse.Namespace) -> None:
    """``serve.py``: load once, then serve until interrupted."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"serving needs the [serve] extra: pip install -e '.[serve]' ({e})") from None
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.allow_write and not token:
        raise UserError(f"--allow-write needs a token: --token TOKEN or the {TOKEN_ENV} environment variable")
    if not _loopback(args.host):
        print(f"note: listening on {args.host}: other machines can reach this server")
    if args.workers > 1:
        path = database_path(args.data_base, spec.name)
        if load_database(path, mmap=True).method != spec.name:  # fail here, not in every worker
            raise UserError(f"database {path} was not written by {spec.display}")
        os.environ[_WORKER_ENV] = json.dumps({"method": spec.name, "args": {**vars(args), "token": token}})
        target: Any = "common.service:app_from_environment"
        uvicorn.run(
            target, factory=True, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level
        )
        return
    app = build_app(spec, args, token)
    print(f"serving {args.data_base} on http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
