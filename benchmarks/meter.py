"""Timing, memory and machine helpers shared by the benchmarks."""

import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch

from common.device import Precision, maybe_compile
from common.device import autocast as device_autocast

REPO = Path(__file__).resolve().parents[1]


class TrainingParts(NamedTuple):
    """What a training step of one method needs, as its train.py builds it (the per-method benchmarks make these)."""

    model: torch.nn.Module
    loss: Callable[[Any, torch.Tensor], torch.Tensor]  # (model output, labels) -> scalar
    optimizer: Callable[[Any], torch.optim.Optimizer]  # parameters -> optimizer
    labels: torch.Tensor  # one batch's labels


class Trainer:
    """One training step of ``parts`` on ``device`` as the methods' ``train_one_epoch`` takes it
    (``common.device.Precision``): forward under ``dtype`` autocast (None: fp32), the loss, backward (through a
    GradScaler with ``scaler``), the optimizer; model and images channels-last with ``channels_last``; the model
    compiled in place with ``compile`` (``common.device.maybe_compile``)."""

    def __init__(
        self,
        parts: TrainingParts,
        device: torch.device,
        dtype: Optional[torch.dtype] = None,
        scaler: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ):
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.precision = Precision(device, dtype, channels_last, torch.amp.GradScaler(device.type) if scaler else None)
        model = self.precision.model(parts.model.to(device).train())
        self.model = maybe_compile(model, compile, device)
        self.optimizer = parts.optimizer(model.parameters())
        self.loss = parts.loss.to(device) if isinstance(parts.loss, torch.nn.Module) else parts.loss
        self.labels = parts.labels.to(device)
        self.scaler = self.precision.scaler

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return self.precision.images(images.to(self.device, non_blocking=True))

    def step(self, images: torch.Tensor) -> None:
        with self.precision.autocast():
            out = self.model(images)
        loss = self.loss(out, self.labels[: images.shape[0]])
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.step(loss, self.optimizer)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call: ``warmup`` calls (cuDNN autotuning, allocator), then ``steps`` calls between syncs."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / max(steps, 1)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device`` as training takes it (``common.device.autocast``); nothing for None."""
    return device_autocast(device, dtype is not None, dtype or torch.bfloat16)


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_gib(device: torch.device) -> Optional[float]:
    """Peak allocated GPU memory since the last reset (torch.cuda.max_memory_allocated); None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---- host memory: torch allocates outside tracemalloc's view, so read the kernel's RSS high-water mark ----------
def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the RSS high-water mark where the kernel allows it; return the baseline (KiB) to subtract."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:  # no reset: the peak so far is the baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---- machine and child processes --------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def module_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: this process's) with the repository first on PYTHONPATH, for a child run from anywhere."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_module(module: str, argv: List[str], env: Optional[Dict[str, str]] = None) -> dict:
    """``python -m <module> <argv>`` in a fresh process; its last stdout line as JSON, or ``{"status": "failed:
    <last stderr line>"}`` (the benchmarks' workers measure one method per process to isolate its peak memory)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, env=module_env(env), cwd=REPO
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"status": f"failed: {lines[-1] if lines else proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    """``rows`` as a CSV at ``path`` (folders made): one column per key any row has, in order of first appearance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
