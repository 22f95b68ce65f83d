"""Mixed precision, channels-last and torch.compile: one training step of every method, side by side in one run.

For each method (SREML trains REIR's ensemble with REIR's step) the same step -- forward, the method's loss,
backward, optimizer -- is timed in every mode, as ``common.device.Precision`` and ``maybe_compile`` run it in
train.py (``benchmarks.meter.Trainer``): fp32, fp32 channels-last (CNNs), bf16 autocast, bf16 channels-last (CNNs),
and compiled (torch.compile, fp32 and with the best bf16 mode). Synthetic images; modes are timed in interleaved
rounds (median step time over all rounds), which evens out other jobs' load; ratios are to fp32 of the same run.
Compilation time (the first steps) is reported apart.

``--demo`` also trains each method's demo briefly (a few epochs, seeded, ``train.py`` in a fresh process) in fp32
and with ``--amp`` (bf16) and reports test R@1 of the last epoch and the wall time.

    python -m benchmarks.precision_benchmark                      # steps, CPU sizes (a minute per method + compile)
    python -m benchmarks.precision_benchmark --no-compile --demo  # steps without compiling, and the demo runs
    python -m benchmarks.precision_benchmark --threads 1          # a CPU shared with other jobs
    python -m benchmarks.precision_benchmark --device cuda --size paper
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import pandas as pd
import torch

from benchmarks import cgd_benchmark, ensemble_benchmark, irt_benchmark
from benchmarks.gpu_check import build as gpu_check_parts
from benchmarks.meter import REPO, Trainer, TrainingParts, cpu_model, module_env, sync
from common.device import native_low_precision
from common.errors import UserError, run_cli
from reir.model import resolve_impl

METHODS = ("cgd", "reir", "irt", "fastretri")
CNNS = ("cgd", "reir", "fastretri")
# mode -> (autocast dtype, channels-last, compiled); channels-last rows for the CNNs only
MODES: Dict[str, tuple] = {
    "fp32": (None, False, False),
    "fp32 CL": (None, True, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16 CL": (torch.bfloat16, True, False),
    "compiled fp32": (None, False, True),
    "compiled bf16": (torch.bfloat16, False, True),
    "compiled bf16 CL": (torch.bfloat16, True, True),
}


def settings(size: str) -> Dict[str, Dict[str, Any]]:
    """Each method's step at CPU sizes (each paper's model at a reduced resolution) or at the papers' sizes."""
    if size == "paper":
        return {
            "cgd": dict(backbone="resnet50", batch=128, image=224, label="CGD ResNet-50 SG-1536, 224 px, batch 128"),
            "reir": dict(ensemble=48, meta=12, batch=10, image=224, label="REIR/SREML E=48 ResNet-18, 224 px"),
            "irt": dict(model="deit_small_distilled_patch16_224", batch=64, image=224, memory=5864, label="IRT DeiT-S"),
            "fastretri": dict(backbone="resnet50", batch=128, image=224, label="FastRetri ResNet-50, 224 px"),
        }
    return {
        "cgd": dict(backbone="resnet50", batch=8, image=96, label="CGD ResNet-50 SG-1536, 96 px, batch 8"),
        "reir": dict(ensemble=12, meta=12, batch=10, image=96, label="REIR/SREML E=12 ResNet-18, 96 px, batch 10"),
        "irt": dict(
            model="deit_small_distilled_patch16_224",
            batch=16,
            image=96,
            memory=1024,
            label="IRT DeiT-S distilled, 96 px, batch 16, XBM 1,024",
        ),
        "fastretri": dict(backbone="resnet50", batch=8, image=96, label="FastRetri ResNet-50, 96 px, batch 8"),
    }


def training_parts(method: str, s: Dict[str, Any], device: torch.device) -> TrainingParts:
    """Model, loss, optimizer and labels of ``method``'s step, from the per-method benchmarks."""
    if method == "cgd":
        return cgd_benchmark.training_parts(s["backbone"], s["batch"])
    if method == "reir":  # the learner layout train.py picks on this device (loop on CPU, grouped on CUDA)
        return ensemble_benchmark.training_parts(s["ensemble"], s["meta"], s["batch"], resolve_impl("auto", device))
    if method == "irt":
        return irt_benchmark.training_parts(s["model"], {}, s["image"], s["batch"], s["memory"])
    return gpu_check_parts("fastretri", s)


def modes_of(method: str, compile: bool) -> List[str]:
    return [
        m
        for m, (_, cl, compiled) in MODES.items()
        if (method in CNNS or not cl) and (compile or not compiled) and not (method in CNNS and m == "compiled bf16")
    ]


def time_steps(method: str, s: Dict[str, Any], device: torch.device, args) -> Dict[str, Dict[str, float]]:
    """ms per step of every mode (median over ``rounds`` interleaved rounds of ``steps`` steps, after ``warmup``
    steps); the compiled modes' first step (compilation) apart."""
    images = torch.randn(s["batch"], 3, s["image"], s["image"])
    trainers: Dict[str, Trainer] = {}
    out: Dict[str, Dict[str, float]] = {}
    for mode in modes_of(method, args.compile):
        dtype, cl, compiled = MODES[mode]
        torch.manual_seed(0)
        trainers[mode] = Trainer(training_parts(method, s, device), device, dtype, channels_last=cl, compile=compiled)
        x = trainers[mode].prepare(images)
        t0 = time.perf_counter()
        trainers[mode].step(x)
        sync(device)
        out[mode] = {"first_s": time.perf_counter() - t0}
        for _ in range(args.warmup):
            trainers[mode].step(x)
    times: Dict[str, List[float]] = {m: [] for m in trainers}
    for _ in range(args.rounds):
        for mode, trainer in trainers.items():
            x = trainer.prepare(images)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.step(x)
                sync(device)
                times[mode].append(time.perf_counter() - t0)
    fp32 = sorted(times["fp32"])[len(times["fp32"]) // 2]
    for mode, ts in times.items():
        median = sorted(ts)[len(ts) // 2]
        out[mode].update(ms=1000 * median, ratio=median / fp32)
    return out


# ---- the demo runs ----------------------------------------------------------------------------------------------
def demo_commands(data_path: str, length: float) -> Dict[str, List[str]]:
    """Each method's demo (README's settings), shortened; ``--amp`` (FastRetri: SOLVER.AMP.ENABLED) is added for
    bf16."""
    epochs = lambda n: str(max(1, round(n * length)))  # noqa: E731
    data = ["--data_path", data_path, "--data_name", "demo", "--crop_type", "cropped", "--pretrained", "none"]
    # SREML keeps its own batch of 12: at REIR's batch the two settings compute the same on the demo data
    ensemble = ["--ensemble_size", "12", "--meta_class_size", "8", "--image_size", "32"]
    ensemble += ["--lr", "1e-3", "--num_workers", "0", "--num_epochs", epochs(3)]
    iters = str(max(1, round(150 * length)))
    return {
        "cgd": ["cgd/train.py", *data, "--backbone_type", "resnet18", "--no-freeze_bn", "--lr", "1e-3"]
        + ["--image_size", "32", "--batch_size", "32", "--num_epochs", epochs(3), "--num_workers", "0"]
        + ["--feature_dim", "512"],
        "reir": ["reir/train.py", *data, *ensemble, "--batch_size", "32"],
        "sreml": ["sreml/train.py", *data, *ensemble],
        "irt": ["irt/train.py", "--model", "xcit_nano_12_p8_224", "--model-kwargs", "depth=4", "--input-size", "48"]
        + ["--pretrained", "none", "--dataset", "demo", "--data-path", data_path, "--max-iter", iters]
        + ["--eval-freq", iters, "--batch-size", "32", "--m", "4", "--lr", "2e-4", "--lambda-reg", "0.1"]
        + ["--num-workers", "0"],
        "fastretri": ["fastretri/train.py", "--config-file", "fastretri/configs/demo.yml", "--num-gpus", "0"]
        + ["DATASETS.ROOT", data_path, "SOLVER.MAX_EPOCH", epochs(3)],
    }


def demo_run(method: str, argv: List[str], amp: bool, seed: int, results: Path) -> Dict[str, Any]:
    """One demo training in a fresh process; R@1 of its last evaluation, wall seconds."""
    if method == "fastretri":
        argv = argv + ["SOLVER.AMP.ENABLED", str(amp), "SEED", str(seed)]
    else:
        argv = argv + (["--amp"] if amp else []) + ["--seed", str(seed)]
    env = module_env({**os.environ, "RETRIEVAL_RESULTS": str(results)})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"status": f"failed: {lines[-1] if lines else proc.returncode}", "wall_s": wall}
    csv = max((results / method).glob("*_statistics.csv"), key=lambda p: p.stat().st_mtime)
    frame = pd.read_csv(csv, index_col="epoch")
    last = frame["test_recall@1"].dropna()
    return {"r1_untrained": float(last.iloc[0]), "r1": float(last.iloc[-1]), "wall_s": wall, "status": "ok"}


def demo_section(args) -> List[Dict[str, Any]]:
    from common.data.prepare import ensure_dataset

    ensure_dataset(args.data_path, "demo", "cropped")  # built once, before anything is timed
    rows = []
    commands = demo_commands(args.data_path, args.demo_length)
    for method in args.demo_methods:
        for seed in args.demo_seeds:
            row: Dict[str, Any] = {"method": method, "seed": seed, "command": " ".join(commands[method])}
            for amp in (False, True):
                with tempfile.TemporaryDirectory() as tmp:
                    r = demo_run(method, commands[method], amp, seed, Path(tmp))
                row.update({f"{'bf16' if amp else 'fp32'}_{k}": v for k, v in r.items()})
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# ---- report -----------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    bf16 = "native bf16" if native_low_precision(torch.bfloat16) else "no native bf16"
    return f"{cpu_model()} ({bf16}), {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def load() -> str:
    return "{:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def step_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| setting | mode | ms/step | vs fp32 | first step (compile) |", "|---|---|---|---|---|"]
    for r in rows:
        first = f"{r['first_s']:.0f} s" if "compiled" in r["mode"] else ""
        lines.append(f"| {r['setting']} | {r['mode']} | {r['ms']:.0f} | {r['ratio']:.2f}x | {first} |")
    return "\n".join(lines)


def demo_table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| method | seed | R@1 untrained | R@1 fp32 | R@1 bf16 | wall fp32 | wall bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.get("fp32_r1_untrained")]
        for p in ("fp32", "bf16"):
            cells.append(r[f"{p}_r1"] if r.get(f"{p}_status") == "ok" else r.get(f"{p}_status"))
        cells = [f"{c:.2f}" if isinstance(c, float) else str(c or "") for c in cells]
        walls = [f"{r[f'{p}_wall_s']:.0f} s" for p in ("fp32", "bf16")]
        lines.append(f"| {r['method']} | {r['seed']} | {' | '.join(cells)} | {walls[0]} | {walls[1]} |")
    return "\n".join(lines)


def check_threads(threads: int) -> None:
    """A note when the CPU is oversubscribed: a parallel region waits for its slowest thread, so when other jobs
    hold the cores every multi-threaded op stalls and the step times measure the scheduler, not the arithmetic
    (on a shared 2-core VM, 2 threads under load made steps 7-10x slower and every ratio about 1)."""
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if threads > 1 and busy + threads > cores:
        print(
            f"note: load average {busy:.1f} + {threads} threads on {cores} cores: oversubscribed; "
            "timings are unreliable, use --threads 1",
            flush=True,
        )


def main(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        check_threads(torch.get_num_threads())
    print(f"# {machine(device)}; load average {load()} at start", flush=True)
    steps: List[Dict[str, Any]] = []
    for method in args.methods:
        s = settings(args.size)[method]
        for mode, r in time_steps(method, s, device, args).items():
            row = {"method": method, "setting": s["label"], "mode": mode, **r}
            print(json.dumps(row), flush=True)
            steps.append(row)
    print(f"\n{step_table(steps)}\n\nload average {load()} at the end of the step timings", flush=True)
    demo = demo_section(args) if args.demo else []
    if demo:
        print(f"\n{demo_table(demo)}\n\nload average {load()} at the end", flush=True)
    report = {"machine": machine(device), "steps": steps, "demo": demo}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="fp32 vs bf16 vs channels-last vs compiled training steps", add_help=add_help
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="cpu", choices=["cpu", "paper"], help="step sizes (default: cpu)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="steps of these methods")
    p.add_argument("--steps", default=2, type=int, help="timed steps per mode and round (default: 2)")
    p.add_argument("--rounds", default=3, type=int, help="interleaved rounds over the modes (default: 3)")
    p.add_argument("--warmup", default=1, type=int, help="untimed steps after the first (default: 1)")
    p.add_argument("--threads", default=None, type=int, help="torch threads on CPU (default: torch's choice)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="time compiled modes too")
    p.add_argument("--demo", action="store_true", help="also train each demo briefly in fp32 and bf16")
    p.add_argument("--demo_methods", nargs="+", default=["cgd", "reir", "sreml", "irt", "fastretri"])
    p.add_argument("--demo_seeds", nargs="+", type=int, default=[0], help="seeds of the demo runs (default: 0)")
    p.add_argument("--demo_length", default=1.0, type=float, help="scale the demo runs' epochs (default: 1)")
    p.add_argument("--data_path", default="data", help="root of the demo data (built if absent; default: data)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
