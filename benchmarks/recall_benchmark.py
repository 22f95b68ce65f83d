"""Exact Recall@K at SOP scale: ours vs faiss exact search vs the full matrix vs the bare GEMMs, in one run.

Synthetic, clustered unit features (default 60,502 x 512, 11,316 classes, like Stanford Online Products) are searched
against themselves (self excluded). Methods, each in its own subprocess so that its peak extra memory (peak RSS above
the RSS after loading the data, or peak CUDA memory) is measured in isolation:

- ``ours``        ``common.metrics.recall_at_k``: bf16 candidate pass + float64 re-check (exact)
- ``ours_fp32``   the same function on its fp32 counting path (``accelerate="numpy"``: no bf16 pass)
- ``faiss``       faiss-cpu exact ``IndexFlatIP`` search of the top max(K)+1, with its bundled OpenBLAS given the
                  kernel numpy's OpenBLAS detects (``OPENBLAS_CORETYPE``); left alone, faiss-cpu's older OpenBLAS
                  may not know this CPU and fall back to a generic kernel (``--faiss-generic`` adds that run)
- ``full``        the original repos' evaluation: the full N x N similarity matrix and one top-k
- ``gemm_fp32``   the fp32 GEMM of all scores alone (numpy), the floor of any fp32 exact method
- ``gemm_bf16``   the bf16 GEMM alone (torch), the floor of ours

BLAS-using workers run with ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` unset (numpy picks its own kernel); the
kernels actually used are printed. Every method's recalls must be identical to ours (``identical`` column).

    python -m benchmarks.recall_benchmark                 # full scale, CPU (several minutes)
    python -m benchmarks.recall_benchmark --quick         # 6,000 x 128 (about a minute: process start-ups)
    python -m benchmarks.recall_benchmark --device cuda --skip full

Prints a table and writes ``results/benchmarks/recall_benchmark.csv``.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from benchmarks.meter import REPO, module_env, peak_rss_kib, reset_peak_rss, run_module, write_csv

METHODS = ("ours", "ours_fp32", "faiss", "faiss_generic", "full", "gemm_fp32", "gemm_bf16")
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
NOISE = 2.3  # default within-class spread: norm of the noise vs unit centres


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_data_flags(p, "num_queries")
    p.add_argument("--ranks", type=lambda s: [int(k) for k in s.split(",")], default=[1, 10, 100, 1000])
    p.add_argument("--quick", action="store_true", help="small problem (6,000 x 128, 1,100 classes) for a smoke run")
    p.add_argument(
        "--skip",
        type=lambda s: [m for m in s.split(",") if m],
        default=[],
        help=f"comma-separated methods to leave out, of {','.join(METHODS)}",
    )
    p.add_argument(
        "--faiss-generic",
        dest="faiss_generic",
        action="store_true",
        help="also run faiss with its OpenBLAS left to choose its kernel (slow where it falls back)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device for ours and full (faiss: CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch / faiss / OpenBLAS threads (default: all)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="interleaved rounds (full: once); the fastest run of each method is reported",
    )
    p.add_argument(
        "--in-process",
        dest="in_process",
        action="store_true",
        help="run methods in this process (fast, for smoke tests; memory and kernels not isolated)",
    )
    p.add_argument("--output", type=Path, default=REPO / "results" / "benchmarks" / "recall_benchmark.csv")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return p


def add_data_flags(p: argparse.ArgumentParser, size: str) -> None:
    """The flags of :func:`make_data`'s problem; ``size`` names the set-size flag (default: SOP's test set)."""
    p.add_argument(f"--{size}", type=int, default=60502, help="query (= gallery) set size")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--num_classes", type=int, default=11316)
    p.add_argument("--noise", type=float, default=NOISE, help="within-class spread (norm of the noise vs unit centres)")
    p.add_argument("--seed", type=int, default=0)


def save_data(folder: Path, x: np.ndarray, labels: np.ndarray) -> None:
    """The problem as the worker processes read it (:func:`load_data`)."""
    np.save(folder / "x.npy", x)
    np.save(folder / "labels.npy", labels)


def load_data(folder: Path):
    return np.load(folder / "x.npy"), np.load(folder / "labels.npy")


def make_data(n: int, dim: int, num_classes: int, seed: int = 0, noise: float = NOISE):
    """Unit features: class centre + isotropic noise of norm ~``noise``, L2-normalised. (n, dim) float32, (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= np.float32(noise / np.sqrt(dim))
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


# ---- BLAS kernels ------------------------------------------------------------------------------------------------
def _corename(pattern: str, names) -> Optional[str]:
    """Kernel name an already loaded OpenBLAS reports (None if not found)."""
    for path in glob.glob(pattern):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def numpy_kernel() -> Optional[str]:
    return _corename(
        os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*"),
        ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"),
    )


def faiss_kernel() -> Optional[str]:
    try:
        import faiss
    except ImportError:
        return None
    libs = os.path.join(os.path.dirname(os.path.dirname(faiss.__file__)), "faiss_cpu.libs", "*openblas*")
    return _corename(libs, ("openblas_get_corename", "openblas_get_corename64_"))


def detect_numpy_kernel() -> Optional[str]:
    """The kernel numpy's OpenBLAS picks by itself (probed in a subprocess with the BLAS variables unset)."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV}
    code = "import json; from benchmarks.recall_benchmark import numpy_kernel; print(json.dumps(numpy_kernel()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=module_env(env), cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None


# ---- the methods -----------------------------------------------------------------------------------------------
def recall_from_neighbours(neighbour_labels: torch.Tensor, labels: torch.Tensor, ranks: Sequence[int]) -> List[float]:
    """(N, K) labels of the top-K retrieved items -> Recall@K for each K (exact hit counts / N)."""
    hit = neighbour_labels == labels[:, None]
    return [hit[:, :k].any(dim=1).sum().item() / len(labels) for k in ranks]


def full_matrix_recall(features: torch.Tensor, labels: torch.Tensor, ranks: Sequence[int]) -> List[float]:
    """The original repos' evaluation: full similarity, diagonal -inf, topk(max K) on the whole matrix."""
    sim = features @ features.T
    sim.fill_diagonal_(float("-inf"))
    top = sim.topk(max(ranks), dim=1).indices
    del sim
    return recall_from_neighbours(labels[top], labels, ranks)


def run_ours(x, labels, ranks, device, accelerate: str = "auto"):
    from common.metrics import recall_at_k

    feats, lab = torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device)
    return recall_at_k(feats, lab, ranks, accelerate=accelerate)


def full_matrix_bytes(n: int, kmax: int) -> int:
    return n * n * 4 + n * kmax * (4 + 8 + 8 + 1)  # scores, topk values/indices, gathered labels, matches


def run_full(x, labels, ranks, device):
    return full_matrix_recall(torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device), ranks)


def run_faiss(x, labels, ranks, device):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, max(ranks) + 1)
    is_self = found == np.arange(len(x))[:, None]
    keep = ~is_self
    keep[:, -1] &= is_self.any(1)  # self not returned (a tie pushed it out): drop the extra last neighbour
    found = found[keep].reshape(len(x), max(ranks))
    return recall_from_neighbours(torch.from_numpy(labels[found]), torch.from_numpy(labels), ranks)


def run_gemm_fp32(x, labels, ranks, device):
    """Every score of the problem through numpy's sgemm into a 512 MiB block, nothing else."""
    rows = max(1, 2**27 // len(x))
    if device == "cuda":
        g = torch.from_numpy(x).cuda()
        for i in range(0, len(x), rows):
            g[i : i + rows] @ g.T
        return None
    out = np.empty((rows, len(x)), np.float32)
    for i in range(0, len(x), rows):
        np.matmul(x[i : i + rows], x.T, out=out[: min(rows, len(x) - i)])
    return None


def run_gemm_bf16(x, labels, ranks, device):
    """Every score in bf16 (torch), laid out as ours does it: (gallery, 1024 queries) blocks."""
    g = torch.from_numpy(x).to(device).bfloat16()
    out = torch.empty(len(x) * 1024, dtype=torch.bfloat16, device=device)
    for i in range(0, len(x), 1024):
        q = g[i : i + 1024]
        torch.mm(g, q.T, out=out[: len(x) * len(q)].view(len(x), len(q)))
    return None


RUNNERS: Dict[str, Callable] = {
    "ours": run_ours,
    "ours_fp32": lambda *a: run_ours(*a, accelerate="numpy"),
    "faiss": run_faiss,
    "faiss_generic": run_faiss,
    "full": run_full,
    "gemm_fp32": run_gemm_fp32,
    "gemm_bf16": run_gemm_bf16,
}


def measure(method: str, x, labels, ranks, device: str, threads: Optional[int]) -> dict:
    """Wall and CPU time of one method and its peak extra memory (MiB), in this process."""
    if threads:
        torch.set_num_threads(threads)
        try:
            import faiss

            faiss.omp_set_num_threads(threads)
        except ImportError:
            pass
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    load = os.getloadavg()[0]  # > cpu count means the timings shared the CPUs with other work
    base = reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    recalls = RUNNERS[method](x, labels, ranks, device)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    extra = (peak_rss_kib() - base) / 1024
    if cuda and not method.startswith("faiss"):
        extra = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    kernel = faiss_kernel() if method.startswith("faiss") else numpy_kernel()
    return {
        "status": "ok",
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_extra_mib": extra,
        "recalls": recalls,
        "load_before": load,
        "blas_kernel": kernel,
    }


def _worker(args) -> None:
    """Subprocess entry: load the data, warm the libraries up, measure one method, print JSON."""
    import common.metrics  # noqa: F401  (imports count towards the baseline, not the method)

    if args.worker.startswith("faiss"):
        import faiss  # noqa: F401
    x, labels = load_data(args.data)
    torch.ones(8, 8) @ torch.ones(8, 8)
    if args.device == "cuda":
        torch.ones(1, device="cuda")
    print(json.dumps(measure(args.worker, x, labels, args.ranks, args.device, args.threads)))


def _skip_reason(method: str, args, n: int) -> Optional[str]:
    if method in args.skip or (method == "faiss_generic" and not args.faiss_generic):
        return "skipped"
    if method.startswith("faiss"):
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "skipped: faiss not importable"
    if method == "full":
        need = full_matrix_bytes(n, max(args.ranks))
        avail = _available_bytes(args.device)
        if need > 0.8 * avail:
            return f"skipped: needs {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
    return None


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _worker_env(method: str, args, fair_kernel: Optional[str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV}  # numpy: its own kernel choice
    if method == "faiss" and fair_kernel:
        env["OPENBLAS_CORETYPE"] = fair_kernel  # faiss-cpu's bundled OpenBLAS: the kernel numpy uses
    if args.threads:  # OpenBLAS reads its thread count at import
        env.update(OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    return env


def _run_isolated(method: str, args, data_dir: Path, fair_kernel: Optional[str]) -> dict:
    argv = ["--worker", method, "--data", str(data_dir), "--ranks", ",".join(map(str, args.ranks))]
    argv += ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    return run_module("benchmarks.recall_benchmark", argv, _worker_env(method, args, fair_kernel))


def _keep_fastest(best: Optional[dict], run: dict) -> dict:
    """Fastest run (its wall and CPU time) with the largest peak memory and whether all runs agreed."""
    if best is None:
        return run
    if run["status"] != "ok":
        return {**best, "status": run["status"]}
    keep = dict(run if run["seconds"] < best["seconds"] else best)
    keep["peak_extra_mib"] = max(run["peak_extra_mib"], best["peak_extra_mib"])
    keep["recalls"] = best["recalls"] if run["recalls"] == best["recalls"] else None
    return keep


def _rows(results: Dict[str, dict], args) -> List[dict]:
    ours = results["ours"]
    rows = []
    for method, r in results.items():
        row = {
            "method": method,
            "status": r["status"],
            "seconds": r.get("seconds"),
            "cpu_seconds": r.get("cpu_seconds"),
            "peak_extra_mib": r.get("peak_extra_mib"),
            "blas_kernel": r.get("blas_kernel"),
            "load_before": r.get("load_before"),
        }
        for k, v in zip(args.ranks, r.get("recalls") or [None] * len(args.ranks)):
            row[f"recall@{k}"] = v
        ok = r["status"] == "ok" and ours["status"] == "ok"
        row["identical"] = bool(ok and r.get("recalls") is not None and r["recalls"] == ours["recalls"])
        row["ours_time_over_this"] = ours["seconds"] / r["seconds"] if ok else None
        row.update(
            num_queries=args.num_queries,
            dim=args.dim,
            num_classes=args.num_classes,
            device=args.device,
            cpus=os.cpu_count(),
            machine=platform.machine(),
            isolated=not args.in_process,
        )
        rows.append(row)
    return rows


def _print_table(rows: List[dict], ranks: List[int]) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    head = f"{'method':<14}{'time s':>9}{'cpu s':>9}{'peak MiB':>10}" + "".join(f"{'R@' + str(k):>8}" for k in ranks)
    print(head + f"{'identical':>11}{'ours/this':>11}  {'kernel':<10}  status")
    for r in rows:
        print(
            f"{r['method']:<14}{fmt(r['seconds'], '.2f'):>9}{fmt(r['cpu_seconds'], '.1f'):>9}"
            f"{fmt(r['peak_extra_mib'], '.0f'):>10}"
            + "".join(f"{fmt(r[f'recall@{k}'], '.4f'):>8}" for k in ranks)
            + f"{str(r['identical']) if r[f'recall@{ranks[0]}'] is not None else '-':>11}"
            f"{fmt(r['ours_time_over_this'], '.2f'):>11}  {r['blas_kernel'] or '-':<10}  {r['status']}"
        )


def _summary(rows: List[dict]) -> str:
    by = {r["method"]: r for r in rows if r["status"] == "ok"}
    parts = []
    for method, target in (("faiss", 0.6), ("gemm_fp32", 1.1)):
        if "ours" in by and method in by:
            ratio = by["ours"]["seconds"] / by[method]["seconds"]
            parts.append(f"ours = {ratio:.2f}x {method} (target <= {target}x)")
    return "; ".join(parts)


def main(args) -> List[dict]:
    if args.worker:
        return _worker(args)
    if args.quick:
        args.num_queries, args.dim, args.num_classes = 6000, 128, 1100
    x, labels = make_data(args.num_queries, args.dim, args.num_classes, args.seed, args.noise)
    fair = None if args.in_process else detect_numpy_kernel()
    mode = "in-process" if args.in_process else "one subprocess per method"
    print(
        f"data: {x.shape[0]} x {x.shape[1]} unit features, {args.num_classes} classes, ranks {args.ranks}, "
        f"device {args.device}, {os.cpu_count()} CPUs, {mode}; numpy's OpenBLAS kernel {fair or 'unknown'} "
        f"(faiss is given the same), load average {os.getloadavg()[0]:.1f}"
    )
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_data(Path(tmp), x, labels)
        for round_ in range(max(args.repeat, 1)):
            for method in METHODS:
                if round_ and (method == "full" or results[method]["status"] != "ok"):
                    continue
                reason = _skip_reason(method, args, len(x))
                if reason:
                    run = {"status": reason}
                elif args.in_process:
                    run = measure(method, x, labels, args.ranks, args.device, args.threads)
                else:
                    run = _run_isolated(method, args, Path(tmp), fair)
                results[method] = _keep_fastest(results.get(method), run)
                print(f"  round {round_ + 1} {method}: {run['status']} {run.get('seconds', '')}", flush=True)
    rows = [r for r in _rows(results, args) if r["status"] != "skipped"]
    _print_table(rows, args.ranks)
    print(_summary(rows))
    write_csv(rows, args.output)
    print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
