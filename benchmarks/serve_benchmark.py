"""Load on the HTTP service: concurrent clients sending real JPEGs to ``cgd/serve.py``, exact and IVF search.

For each gallery size a synthetic database is written (clustered unit vectors, as ``search_benchmark.py`` draws
them; paths are names only) beside an untrained CGD model with a matching embedding size, plus an IVF index. The
server runs as its own process on 127.0.0.1; ``--clients`` threads each keep one connection and post JPEGs
(demo-like shapes rendered at the model's input size) to ``/search`` back to back for ``--seconds`` per setting.
Measured per setting: queries/s, p50/p99 latency, error responses, and the server's memory sampled every second
(RSS, split into anonymous memory and mapped file pages: the database's features are a mapped file).

``--minutes M`` is the soak test: every setting runs M minutes, and the run fails (exit 1) on any error response or
when the server's anonymous memory grows by more than ``--max_growth_mb`` between the end of the first tenth of
the run and its end. ``--add N`` then measures adding N new JPEGs to the database (``inference.py --add``'s
update: embedding, index update, atomic rewrite), per gallery size.

    python -m benchmarks.serve_benchmark                                   # 100,000 and 1,000,000 x 512
    python -m benchmarks.serve_benchmark --gallery_sizes 1000000 --indexes ivf --minutes 10   # soak
    python -m benchmarks.serve_benchmark --gallery_sizes 2000 --seconds 5 --quick              # smoke, seconds

Writes ``results/benchmarks/serve_benchmark.csv`` (load) and ``serve_benchmark_add.csv`` (additions); only
loopback addresses are used.
"""

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from benchmarks.meter import REPO, write_csv


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--gallery_sizes", default="100000,1000000", help="comma-separated gallery sizes")
    p.add_argument("--indexes", default="exact,ivf", help="comma-separated: exact, ivf, hnsw")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=60, help="load per setting")
    p.add_argument("--minutes", type=float, default=None, help="soak: load per setting in minutes, with checks")
    p.add_argument("--max_growth_mb", type=float, default=64, help="soak: anonymous memory growth allowed")
    p.add_argument("--dim", type=int, default=512, help="embedding size (CGD feature_dim)")
    p.add_argument("--backbone", default="resnet50", help="CGD backbone of the (untrained) model")
    p.add_argument("--image_size", type=int, default=224, help="model input size; query JPEGs are rendered at it")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--add", type=int, default=1000, help="new images added per gallery size (0: skip)")
    p.add_argument("--workers", type=int, default=1, help="server processes")
    p.add_argument("--gpu_ids", default=None, help="server GPU for embedding queries ('' = CPU)")
    p.add_argument("--quick", action="store_true", help="resnet18, 64-d, 64 px, --add 20: a smoke run in seconds")
    p.add_argument("--work_dir", type=Path, default=None, help="where databases are written (default: a temp dir)")
    p.add_argument("--output", type=Path, default=REPO / "results" / "benchmarks" / "serve_benchmark.csv")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------- data


def clustered(n: int, dim: int, seed: int, per_class: int = 10) -> np.ndarray:
    """(n, dim) float32 unit vectors around n / per_class random class centres, drawn in blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per_class), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        x = rng.standard_normal((b - a, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        x += centres[rng.integers(0, len(centres), b - a)]
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def jpegs(folder: Path, count: int, size: int, seed: int) -> List[Path]:
    """``count`` demo-like photos (a shape with a fill pattern on a gradient) saved as JPEG."""
    from PIL import Image

    from common.data.demo import demo_classes, render

    folder.mkdir(parents=True, exist_ok=True)
    classes = demo_classes()
    paths = []
    for i in range(count):
        shape, pattern = classes[i % len(classes)]
        pixels, _ = render(shape, pattern, np.random.default_rng([seed, i]), size)
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def write_database(folder: Path, n: int, args) -> Path:
    """A CGD run (untrained model, seeded) whose database holds ``n`` synthetic rows and an IVF index."""
    import torch

    from cgd.model import model_from_config
    from common.ann import build_index, save_index
    from common.database import Split, save_database
    from common.runio import atomic_save

    config = {
        "data_name": "synthetic",
        "crop_type": "uncropped",
        "backbone_type": args.backbone,
        "gd_config": "SG",
        "feature_dim": args.dim,
        "num_classes": 100,
        "image_size": args.image_size,
        "smoothing": 0.1,
        "temperature": 0.5,
        "margin": 0.1,
        "batch_size": 64,
        "method": "cgd",
    }
    torch.manual_seed(args.seed)
    model_file = folder / "synthetic_model.pth"
    if not model_file.is_file():
        atomic_save({"model": model_from_config(config).state_dict(), "config": config, "epoch": 1}, model_file)
    db_path = folder / f"synthetic{n}_data_base.pth"
    features = torch.from_numpy(clustered(n, args.dim, args.seed))
    start = time.perf_counter()
    index = build_index(features, "euclidean", "ivf")
    print(f"IVF index over {n} rows built in {time.perf_counter() - start:.1f} s")
    stored = {**config, "model_file": str(model_file.resolve()), "ann_index": str(folder / f"{db_path.name}.ivf.faiss")}
    save_index(index, stored["ann_index"])
    images = [f"synthetic/{i:07d}.jpg" for i in range(n)]
    split = Split(images, [i // 10 for i in range(n)], features)
    save_database(db_path, config=stored, method="cgd", splits={"gallery": split}, metric="euclidean",
                  query="gallery", gallery="gallery")  # fmt: skip
    return db_path


# ---------------------------------------------------------------- server and clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_path: Path, index: str, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "cgd" / "serve.py"), "--data_base", str(db_path), "--port", str(port)]
    cmd += ["--index", index, "--workers", str(args.workers), "--log_level", "warning", "--max_batch", "32"]
    cmd += ["--gpu_ids", args.gpu_ids] if args.gpu_ids is not None else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(cmd, env=env, cwd=REPO)
    deadline = time.time() + 1800
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): {' '.join(cmd)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become ready")


def multipart(image: bytes, k: int) -> tuple:
    boundary = "----serve-benchmark-boundary"
    body = io.BytesIO()
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode())
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'.encode())
    body.write(b"Content-Type: image/jpeg\r\n\r\n" + image + f"\r\n--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def client(port: int, bodies: List[tuple], stop: threading.Event, out: Dict[str, list], seed: int, count=None) -> None:
    """Post to /search back to back over one keep-alive connection (``count`` times, or until ``stop``); record
    (latency, status)."""
    rng = np.random.default_rng(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    while not stop.is_set() and (count is None or len(out["status"]) < count):
        body, kind = bodies[int(rng.integers(len(bodies)))]
        start = time.perf_counter()
        try:
            conn.request("POST", "/search", body=body, headers={"Content-Type": kind})
            response = conn.getresponse()
            payload = response.read()
            ok = response.status == 200 and len(json.loads(payload)["results"]) > 0
            status = response.status if ok else f"{response.status}: {payload[:200]!r}"
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            status = f"{type(e).__name__}: {e}"
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        out["latency"].append(time.perf_counter() - start)
        out["status"].append(status)


def server_memory(pid: int) -> Dict[str, float]:
    """MiB of RSS, anonymous and file-backed pages of the server and its child processes (workers)."""
    pids = [pid]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    total = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in total:
                    total[key] += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def load(db_path: Path, index: str, n: int, bodies: List[tuple], duration: float, args) -> Dict[str, object]:
    """One setting: start the server, warm it up, run the clients for ``duration`` s, stop it."""
    port = free_port()
    server = start_server(db_path, index, port, args)
    try:
        warm: Dict[str, list] = {"latency": [], "status": []}
        client(port, bodies, threading.Event(), warm, args.seed, count=4)  # first requests load lazy state
        out: Dict[str, list] = {"latency": [], "status": []}
        memory: List[Dict[str, float]] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=client, args=(port, bodies, stop, out, args.seed + 100 + i))
            for i in range(args.clients)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        while time.perf_counter() - start < duration:
            memory.append(server_memory(server.pid))
            time.sleep(min(1.0, max(0.0, duration - (time.perf_counter() - start))))
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        memory.append(server_memory(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=60)
    errors = [s for s in out["status"] + warm["status"] if s != 200]
    latency = np.array(out["latency"]) * 1000
    settled = memory[max(0, len(memory) // 10)]
    return {
        "gallery": n,
        "index": index,
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "queries": len(latency),
        "queries_per_s": round(len(latency) / elapsed, 2),
        "p50_ms": round(float(np.percentile(latency, 50)), 1) if len(latency) else None,
        "p99_ms": round(float(np.percentile(latency, 99)), 1) if len(latency) else None,
        "errors": len(errors),
        "first_error": str(errors[0])[:200] if errors else "",
        "rss_mb": round(max(m["VmRSS"] for m in memory)),
        "anon_mb": round(memory[-1]["RssAnon"]),
        "file_mb": round(memory[-1]["RssFile"]),
        "anon_growth_mb": round(memory[-1]["RssAnon"] - settled["RssAnon"], 1),
    }


def add_images(db_path: Path, photos: List[Path], args) -> Dict[str, object]:
    """``inference.py --add``'s update of ``db_path`` with ``photos``, timed by the update itself."""
    import torch

    from cgd.spec import SPEC
    from common.catalogue import update
    from common.device import main_device, parse_gpu_ids
    from common.runs import model_of_database

    device = main_device(parse_gpu_ids(args.gpu_ids)[:1])
    start = time.perf_counter()
    _, report = update(
        SPEC,
        db_path,
        add=[(str(p), None) for p in photos],
        get_model=lambda db: model_of_database(SPEC, db_path, db, device),
        device=device,
        batch_size=64,
        num_workers=min(4, os.cpu_count() or 1),
    )
    torch.cuda.synchronize() if device.type == "cuda" else None
    return {
        "gallery": report.images - report.added,
        "added": report.added,
        "total_s": round(time.perf_counter() - start, 2),
        "embed_s": round(report.embed_seconds, 2),
        "index_and_write_s": round(report.write_seconds, 2),
    }


def markdown(rows: List[Dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.backbone, args.dim, args.image_size, args.add = "resnet18", 64, 64, min(args.add, 20)
    duration = 60 * args.minutes if args.minutes else args.seconds
    sizes = [int(s) for s in args.gallery_sizes.split(",")]
    indexes = [s.strip() for s in args.indexes.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve_benchmark_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        queries = jpegs(work / "queries", 32, args.image_size, args.seed + 1)
        bodies = [multipart(p.read_bytes(), args.k) for p in queries]
        rows, added = [], []
        for n in sizes:
            db_path = write_database(work, n, args)
            for index in indexes:
                row = load(db_path, index, n, bodies, duration, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
            if args.add:
                photos = jpegs(work / f"new{n}", args.add, args.image_size, args.seed + 2)
                added.append(add_images(db_path, photos, args))
                print(json.dumps(added[-1]), flush=True)
            for f in work.glob(f"synthetic{n}_data_base.pth*"):
                f.unlink()
    write_csv(rows, args.output)
    print(markdown(rows))
    if added:
        write_csv(added, args.output.with_name(args.output.stem + "_add.csv"))
        print(markdown(added))
    failed = [r for r in rows if r["errors"] or (args.minutes and r["anon_growth_mb"] > args.max_growth_mb)]
    for r in failed:
        print(f"FAILED: {r['gallery']} {r['index']}: {r['errors']} errors ({r['first_error']}), "
              f"anonymous memory grew {r['anon_growth_mb']} MB")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
