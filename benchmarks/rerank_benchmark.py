"""Time and peak extra memory of k-reciprocal re-ranking, alpha-QE and DBA at SOP scale (common.postprocess).

Synthetic, clustered unit features (default 60,502 x 512 in 11,316 classes of ~5 images, like Stanford Online
Products) are ranked against themselves (self excluded), as CUB/CARS/SOP are evaluated. Each configuration is one
``postprocess_rank`` call (top-100 lists) in its own subprocess, so its peak extra memory (peak RSS above the RSS
after loading the data) is measured in isolation; Recall@K and MAP@R of the lists are printed too.

    python -m benchmarks.rerank_benchmark              # full scale (several minutes on 2 cores)
    python -m benchmarks.rerank_benchmark --quick      # 6,000 images

Prints a table and writes ``results/benchmarks/rerank_benchmark.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from benchmarks.meter import REPO, cpu_model, peak_rss_kib, reset_peak_rss, run_module, write_csv
from benchmarks.recall_benchmark import add_data_flags, load_data, make_data, save_data
from common.errors import UserError, run_cli

CONFIGS: Dict[str, dict] = {
    "plain": {},
    "qe": {"qe_k": 5},
    "dba": {"dba_k": 5},
    "rerank": {"rerank": True},
    "dba+qe+rerank": {"dba_k": 5, "qe_k": 5, "rerank": True},
}
RANKS = [1, 10, 100]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_data_flags(p, "num_images")
    p.add_argument("--quick", action="store_true", help="6,000 images in 1,122 classes (same class size)")
    p.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: library default)")
    p.add_argument(
        "--in-process",
        dest="in_process",
        action="store_true",
        help="run configurations in this process (for smoke tests; memory numbers are not isolated)",
    )
    p.add_argument("--output", type=Path, default=REPO / "results" / "benchmarks" / "rerank_benchmark.csv")
    p.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return p


def measure(config: str, x: np.ndarray, labels: np.ndarray, threads: Optional[int]) -> dict:
    """Wall and CPU time, peak extra memory (MiB) and metrics of one configuration, in this process."""
    import torch

    from common.metrics import metrics_from_ranking
    from common.postprocess import postprocess_rank

    if threads:
        torch.set_num_threads(threads)
    feats = torch.from_numpy(x)
    postprocess_rank(feats[:64], same_set=True, topk=8, **CONFIGS[config])  # imports and first-call setup
    load = os.getloadavg()[0]
    base = reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    indices, _ = postprocess_rank(feats, same_set=True, topk=100, **CONFIGS[config])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    extra = (peak_rss_kib() - base) / 1024
    metrics = metrics_from_ranking(indices, labels, None, RANKS)
    return {
        "status": "ok",
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_extra_mib": extra,
        "load_before": load,
        **metrics,
    }


def _worker(args) -> None:
    """Subprocess entry: load the data, measure one configuration, print one JSON line."""
    x, labels = load_data(args.data)
    print(json.dumps(measure(args.worker, x, labels, args.threads)))


def _run_isolated(config: str, args, data_dir: Path) -> dict:
    argv = ["--worker", config, "--data", str(data_dir)] + (["--threads", str(args.threads)] if args.threads else [])
    return run_module("benchmarks.rerank_benchmark", argv)


def _print_table(rows: List[dict]) -> None:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(
        f"{'config':<15}{'time s':>9}{'cpu s':>9}{'peak MiB':>10}{'x plain':>9}"
        + "".join(f"{'R@' + str(k):>8}" for k in RANKS)
        + f"{'MAP@R':>8}{'load':>6}  status"
    )
    for r in rows:
        print(
            f"{r['config']:<15}{fmt(r.get('seconds'), '.1f'):>9}{fmt(r.get('cpu_seconds'), '.1f'):>9}"
            f"{fmt(r.get('peak_extra_mib'), '.0f'):>10}{fmt(r.get('time_over_plain'), '.1f'):>9}"
            + "".join(f"{fmt(r.get(f'recall@{k}'), '.4f'):>8}" for k in RANKS)
            + f"{fmt(r.get('map@r'), '.4f'):>8}{fmt(r.get('load_before'), '.1f'):>6}  {r['status']}"
        )


def main(args) -> List[dict]:
    if args.worker:
        return _worker(args)
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        raise UserError(f"unknown configs {sorted(unknown)} (choose from {', '.join(CONFIGS)})")
    if args.quick:
        args.num_images, args.num_classes = 6000, 1122
    x, labels = make_data(args.num_images, args.dim, args.num_classes, args.seed, args.noise)
    print(
        f"data: {x.shape[0]} x {x.shape[1]} unit features, {args.num_classes} classes, query = gallery; "
        f"{os.cpu_count()} CPUs ({cpu_model()}), load average {os.getloadavg()[0]:.1f} (shared machine)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_data(Path(tmp), x, labels)
        for config in args.configs:
            if args.in_process:
                run = measure(config, x, labels, args.threads)
            else:
                run = _run_isolated(config, args, Path(tmp))
            print(f"  {config}: {run['status']} {run.get('seconds', 0):.1f} s", flush=True)
            rows.append({"config": config, **run})
    plain = next((r for r in rows if r["config"] == "plain" and r["status"] == "ok"), None)
    for r in rows:
        r["time_over_plain"] = r["seconds"] / plain["seconds"] if plain and r["status"] == "ok" else None
        r.update(
            num_images=args.num_images,
            dim=args.dim,
            num_classes=args.num_classes,
            noise=args.noise,
            cpus=os.cpu_count(),
            cpu_model=cpu_model(),
            threads=args.threads,
        )
    _print_table(rows)
    write_csv(rows, args.output)
    print(f"wrote {args.output}")
    return rows


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
