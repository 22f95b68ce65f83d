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
that arrive together are embedded in one forward pass and searched in one pass over the gallery
(:class:`common.searcher.Searcher`; this module holds the routes and ``serve.py``'s command line).
"""

import argparse
import hashlib
import hmac
import importlib
import io
import ipaddress
import json
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from PIL import Image

from common.catalogue import listed
from common.cli import add_flag
from common.data.images import IMAGE_EXTENSIONS, open_image
from common.database import load_database
from common.device import script_device
from common.errors import UserError
from common.runs import database_path, run_prefix
from common.searcher import BadImage, Searcher, State, read_upload
from common.spec import MethodSpec

__all__ = ["serve_parser", "run_server", "create_app", "TOKEN_ENV"]

TOKEN_ENV = "RETRIEVAL_SERVE_TOKEN"
_WORKER_ENV = "RETRIEVAL_SERVE_ARGS"  # --workers N: the settings each worker process builds its app from
PAGE = Path(__file__).with_name("static") / "serve.html"
THUMBNAIL = 256
_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


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

    def result_json(state: State, results) -> List[Dict[str, Any]]:
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
