"""Recall@K at SOP scale: our chunked exact ``recall_at_k`` vs the full-matrix approach vs faiss ``IndexFlatIP``.

Synthetic, clustered unit features (default 60,502 x 512, 11,316 classes, like Stanford Online Products) are
searched against themselves (self excluded). Each method runs in its own subprocess so that its peak extra memory
(peak RSS above the RSS after loading the data, or peak CUDA memory) is measured in isolation.

    python benchmarks/recall_benchmark.py --repeat 2           # full scale, CPU, best of 2 interleaved rounds
    python benchmarks/recall_benchmark.py --skip-full --device cuda
    python benchmarks/recall_benchmark.py --threads 1          # single-threaded comparison (also OpenBLAS/OMP)

Prints a table and writes ``results/benchmarks/recall_benchmark.csv``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ours", "full", "faiss")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num_queries", type=int, default=60502, help="query (= gallery) set size")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--num_classes", type=int, default=11316)
    p.add_argument("--ranks", type=lambda s: [int(k) for k in s.split(",")], default=[1, 10, 100, 1000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=2.3, help="within-class spread (norm of the noise vs unit centres)")
    p.add_argument("--skip-full", dest="skip_full", action="store_true", help="skip the full N x N matrix method")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device for ours and full (faiss: CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch / faiss threads (default: library default)")
    p.add_argument("--repeat", type=int, default=1,
                   help="interleaved rounds of ours and faiss (full: once); the fastest run of each is reported")
    p.add_argument("--in-process", dest="in_process", action="store_true",
                   help="run methods in this process (fast, for smoke tests; memory numbers are not isolated)")
    p.add_argument("--output", type=Path, default=REPO / "results" / "benchmarks" / "recall_benchmark.csv")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return p


def make_data(n: int, dim: int, num_classes: int, seed: int, noise: float):
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


# ---- peak memory -----------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int:
    """Reset the kernel's RSS high-water mark if allowed; return the baseline (KiB) to subtract."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _rss_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    return _rss_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---- the three methods -----------------------------------------------------------------------------------------
def _recall_from_neighbours(neighbour_labels, labels, ranks) -> List[float]:
    """(N, K) labels of the top-K retrieved items -> Recall@K for each K."""
    match = neighbour_labels == labels[:, None]
    first = np.where(match.any(1), match.argmax(1), np.iinfo(np.int64).max)
    return [float((first < k).sum()) / len(labels) for k in ranks]


def run_ours(x, labels, ranks, device):
    import torch
    from common.metrics import recall_at_k
    feats, lab = torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device)
    return recall_at_k(feats, lab, ranks)


def full_matrix_bytes(n: int, kmax: int) -> int:
    return n * n * 4 + n * kmax * (4 + 8 + 8 + 1)  # scores, topk values/indices, gathered labels, matches


def run_full(x, labels, ranks, device):
    """The original repos' evaluation: full similarity, diagonal -inf, topk(max K) on the whole matrix."""
    import torch
    feats, lab = torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device)
    sim = feats @ feats.T
    sim.fill_diagonal_(float("-inf"))
    idx = sim.topk(max(ranks), dim=1).indices
    del sim
    return _recall_from_neighbours(lab[idx].cpu().numpy(), labels, ranks)


def run_faiss(x, labels, ranks, device):
    import faiss
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, max(ranks) + 1)
    is_self = found == np.arange(len(x))[:, None]
    keep = ~is_self
    keep[:, -1] &= is_self.any(1)  # self not returned (a tie pushed it out): drop the extra last neighbour
    found = found[keep].reshape(len(x), max(ranks))
    return _recall_from_neighbours(labels[found], labels, ranks)


RUNNERS: Dict[str, Callable] = {"ours": run_ours, "full": run_full, "faiss": run_faiss}


def measure(method: str, x, labels, ranks, device: str, threads: Optional[int]) -> dict:
    """Wall and CPU time of one method and its peak extra memory (MiB), in this process."""
    import torch
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
    base = _reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    recalls = RUNNERS[method](x, labels, ranks, device)
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    extra = (_peak_kib() - base) / 1024
    if cuda and method != "faiss":
        extra = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return {"status": "ok", "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_extra_mib": extra,
            "recalls": recalls, "load_before": load}


def _worker(args) -> None:
    """Subprocess entry: load the data, warm the libraries up, measure one method, print JSON."""
    import torch
    import common.metrics  # noqa: F401  (imports count towards the baseline, not the method)
    x = np.load(args.data / "x.npy")
    labels = np.load(args.data / "labels.npy")
    torch.ones(8, 8) @ torch.ones(8, 8)
    if args.device == "cuda":
        torch.ones(1, device="cuda")
    print(json.dumps(measure(args.worker, x, labels, args.ranks, args.device, args.threads)))


def _skip_reason(method: str, args, n: int) -> Optional[str]:
    if method == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "skipped: faiss not importable"
    if method == "full":
        if args.skip_full:
            return "skipped: --skip-full"
        need = full_matrix_bytes(n, max(args.ranks))
        avail = _available_bytes(args.device)
        if need > 0.8 * avail:
            return f"skipped: needs {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
    return None


def _available_bytes(device: str) -> int:
    if device == "cuda":
        import torch
        return torch.cuda.mem_get_info()[0]
    return (_meminfo_kib("MemAvailable") or 0) * 1024


def _meminfo_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _run_isolated(method: str, args, data_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--data", str(data_dir),
           "--ranks", ",".join(map(str, args.ranks)), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if args.threads:  # numpy's OpenBLAS (ours on CPU) reads its thread count at import
        env.update(OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"status": f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
        row = {"method": method, "status": r["status"], "seconds": r.get("seconds"),
               "cpu_seconds": r.get("cpu_seconds"), "peak_extra_mib": r.get("peak_extra_mib"),
               "load_before": r.get("load_before")}
        for k, v in zip(args.ranks, r.get("recalls") or [None] * len(args.ranks)):
            row[f"recall@{k}"] = v
        ok = r["status"] == "ok" and ours["status"] == "ok"
        row["identical"] = bool(ok and r["recalls"] == ours["recalls"])
        row["ours_time_over_this"] = ours["seconds"] / r["seconds"] if ok else None
        row["ours_mem_over_this"] = (ours["peak_extra_mib"] / r["peak_extra_mib"]
                                     if ok and r["peak_extra_mib"] > 0 else None)
        row.update(num_queries=args.num_queries, dim=args.dim, num_classes=args.num_classes, device=args.device,
                   cpus=os.cpu_count(), machine=platform.machine(), isolated=not args.in_process)
        rows.append(row)
    return rows


def _print_table(rows: List[dict], ranks: List[int]) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    head = f"{'method':<7}{'time s':>9}{'cpu s':>9}{'peak MiB':>10}" + "".join(f"{'R@' + str(k):>8}" for k in ranks)
    print(head + f"{'identical':>11}{'ours/this':>11}  status")
    for r in rows:
        print(f"{r['method']:<7}{fmt(r['seconds'], '.2f'):>9}{fmt(r['cpu_seconds'], '.1f'):>9}"
              f"{fmt(r['peak_extra_mib'], '.0f'):>10}"
              + "".join(f"{fmt(r[f'recall@{k}'], '.4f'):>8}" for k in ranks)
              + f"{str(r['identical']):>11}{fmt(r['ours_time_over_this'], '.2f'):>11}  {r['status']}")


def main(args) -> List[dict]:
    if args.worker:
        return _worker(args)
    x, labels = make_data(args.num_queries, args.dim, args.num_classes, args.seed, args.noise)
    mode = "in-process" if args.in_process else "one subprocess per method"
    print(f"data: {x.shape[0]} x {x.shape[1]} unit features, {args.num_classes} classes, ranks {args.ranks}, "
          f"device {args.device}, {os.cpu_count()} CPUs, {mode}")
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", x)
        np.save(Path(tmp) / "labels.npy", labels)
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
                    run = _run_isolated(method, args, Path(tmp))
                results[method] = _keep_fastest(results.get(method), run)
                print(f"  round {round_ + 1} {method}: {run['status']} {run.get('seconds', '')}", flush=True)
    rows = _rows(results, args)
    _print_table(rows, args.ranks)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(get_args_parser().parse_args())
