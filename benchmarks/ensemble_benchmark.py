"""Training-step speed of the REIR/SREML ensemble forms, side by side, on the same weights.

One step = forward + cross-entropy over meta-classes + backward + Adam, at E learners sharing stem + layer1.
Forms:
* ``original``: the originals' code shape: E separate torchvision branches (ModuleList) run one after another;
* ``loop``: ``reir.model.Model`` learner by learner, each on its own weights (the CPU default);
* ``grouped``: ``Model`` as one network with ``groups = E`` convolutions on the concatenated weights (GPU default);
* ``grouped_cl``: grouped in channels-last memory format (CUDA only);
* ``compiled``: ``torch.compile`` of the grouped model (CUDA only, ``--compile``).
All start from the same weights; the first step's logits (in full fp32, no TF32, unless ``--amp``) and the
parameters after one Adam step (plain Adam, as training uses) are compared with ``original`` and printed (max abs
difference). ``--rounds 2`` times the forms in interleaved rounds (each form rebuilt from the same weights in every
round; the median is over all rounds' timed steps), which evens out other jobs' load. Peak memory: CUDA max
allocated, or on CPU the process's peak RSS while the form ran (sampled every 10 ms; it includes the ~4
bytes/parameter of the reference model every form is copied from).

    python -m benchmarks.ensemble_benchmark --device cpu --image_size 64 --steps 3 --rounds 2 --forms original loop
    python -m benchmarks.ensemble_benchmark --device cuda --image_size 256 --steps 20 --compile
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import threading
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from benchmarks.meter import TrainingParts, autocast, sync
from reir.model import STAGES, EnsembleBatchNorm, EnsembleConv, Model


class Original(nn.Module):
    """The original layout: a shared trunk and a ModuleList of E torchvision branches, looped in Python."""

    def __init__(self, model: Model):
        super().__init__()
        self.common_extractor = copy.deepcopy(model.common_extractor)
        block = model.branches[0]
        self.learners = nn.ModuleList()
        for i in range(model.ensemble_size):
            ref = getattr(models, model.model_type)()
            stages = [getattr(ref, n) for n in STAGES[len(model.common_extractor) :]]
            ens = [m for m in block.features.modules() if isinstance(m, (EnsembleConv, EnsembleBatchNorm))]
            mine = [m for s in stages for m in s.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
            with torch.no_grad():
                for e, r in zip(ens, mine):
                    n = r.out_channels if isinstance(r, nn.Conv2d) else r.num_features
                    r.weight.copy_(e.weights[i] if isinstance(e, EnsembleConv) else e.weight[i * n : (i + 1) * n])
                    if isinstance(r, nn.BatchNorm2d):
                        r.bias.copy_(e.bias[i * n : (i + 1) * n])
                head = nn.Linear(block.weight.shape[2], block.weight.shape[1])
                head.weight.copy_(block.weight[i])
                head.bias.copy_(block.bias[i])
            self.learners.append(nn.ModuleList([nn.Sequential(*stages), head]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shared = self.common_extractor(images)
        return torch.stack([head(body(shared).mean(dim=(2, 3))) for body, head in self.learners], dim=1)


def ensemble_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over meta-classes, mean over batch x learners (logits [B, E, M], labels [B, E])."""
    return F.cross_entropy(logits.float().permute(0, 2, 1), labels)


def training_parts(ensemble: int, meta: int, batch: int, impl: str = "grouped") -> TrainingParts:
    """REIR/SREML's ResNet-18 ensemble (shared stem + layer1), its loss and Adam, with random meta-class labels."""
    model = Model("resnet18", "layer1", ensemble, meta, pretrained="none", impl=impl)
    labels = torch.randint(0, meta, (batch, ensemble))
    return TrainingParts(model, ensemble_loss, lambda params: torch.optim.Adam(params, lr=1e-4), labels)


def forms(base: Model, device: torch.device, compile: bool = False) -> Dict[str, Callable[[], nn.Module]]:
    """name -> a fresh copy of ``base`` in that form (``grouped_cl`` and ``compiled`` on CUDA only)."""
    out = {
        "original": lambda: Original(base),
        "loop": lambda: copy.deepcopy(base).set_impl("loop"),
        "grouped": lambda: copy.deepcopy(base).set_impl("grouped"),
    }
    if device.type == "cuda":
        out["grouped_cl"] = lambda: copy.deepcopy(base).set_impl("grouped").to(memory_format=torch.channels_last)
        if compile:
            out["compiled"] = lambda: torch.compile(copy.deepcopy(base).set_impl("grouped").to(device))
    return out


@contextlib.contextmanager
def exact_fp32():
    """Full-precision fp32 (no TF32) for equality checks."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def head_weight(model: nn.Module) -> torch.Tensor:
    """Learner heads as [E, M, d], whatever the layout."""
    if isinstance(model, Original):
        return torch.stack([head.weight for _, head in model.learners])
    base = getattr(model, "_orig_mod", model)
    return base.branches[0].weight


class PeakRSS:
    """Peak resident memory of this process (GiB) while the ``with`` block runs, sampled every 10 ms (Linux)."""

    def __enter__(self):
        self.peak, self._stop = self.now(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def now() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
        except OSError:
            return float("nan")

    def _poll(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def time_form(
    model: nn.Module, images, labels, steps: int, warmup: int, device: torch.device, dtype: Optional[torch.dtype] = None
) -> Dict:
    """Per-step seconds of ``steps`` training steps (forward under ``dtype`` autocast, loss, backward, Adam) after
    one untimed first step and ``warmup`` more; the first step's logits (in exact fp32 when ``dtype`` is None) and
    the learner heads after it, for comparing forms."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        with autocast(device, dtype):
            logits = model(images)
        loss = ensemble_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return logits

    with exact_fp32() if dtype is None else contextlib.nullcontext():
        first = step().detach().float().cpu()
    after = head_weight(model).detach().float().cpu().clone()
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"times": times, "first_logits": first, "head_after_step": after, "peak_gib": peak}


def main(args: argparse.Namespace) -> List[Dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    base = Model(args.model_type, "layer1", args.ensemble_size, args.meta_class_size, pretrained="none")
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.meta_class_size, (args.batch_size, args.ensemble_size), device=device)
    made = {k: v for k, v in forms(base, device, args.compile).items() if k in args.forms or args.forms == ["all"]}
    dtype = torch.bfloat16 if args.amp and device.type == "cuda" else None
    results: Dict[str, Dict] = {}
    for rnd in range(args.rounds):
        for name, make in made.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with PeakRSS() as rss:
                model = make().to(device).train()
                r = {"form": name} | time_form(model, images, labels, args.steps, args.warmup, device, dtype)
                del model
            if device.type == "cpu":
                r["peak_gib"] = rss.peak
            else:
                torch.cuda.empty_cache()
            if name in results:  # later rounds: more timed steps; the first round's outputs are kept
                results[name]["times"] += r["times"]
                results[name]["peak_gib"] = max(results[name]["peak_gib"], r["peak_gib"])
            else:
                results[name] = r
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            print(
                f"round {rnd + 1} {name:12s} "
                + " ".join(f"{t * 1000:.0f}" for t in r["times"])
                + f" ms/step, peak {r['peak_gib']:.2f} GiB, load {load:.2f}",
                flush=True,
            )
    rows = list(results.values())
    for r in rows:
        times = sorted(r["times"])
        r["median_s"], r["min_s"] = times[len(times) // 2], times[0]
    ref = rows[0]
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(
        f"E={args.ensemble_size} M={args.meta_class_size} {args.model_type} batch {args.batch_size} "
        f"image {args.image_size}px, amp={args.amp}, {args.rounds} round(s) x {args.steps} steps (median)"
    )
    print(
        f"{'form':12s} {'ms/step':>9s} {'speed-up':>9s} {'max|dlogits|':>13s} {'max|dW| step1':>14s} {'peak GiB':>9s}"
    )
    out = []
    for r in rows:
        dl = (r["first_logits"] - ref["first_logits"]).abs().max().item()
        dw = (r["head_after_step"] - ref["head_after_step"]).abs().max().item()
        print(
            f"{r['form']:12s} {r['median_s'] * 1000:9.1f} {ref['median_s'] / r['median_s']:8.2f}x {dl:13.2e} "
            f"{dw:14.2e} {r['peak_gib']:9.2f}"
        )
        out.append(
            {k: v for k, v in r.items() if not isinstance(v, torch.Tensor)}
            | {
                "dlogits": dl,
                "dw": dw,
                "image_size": args.image_size,
                "ensemble_size": args.ensemble_size,
                "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            }
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="REIR/SREML ensemble training-step benchmark", add_help=add_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model_type", default="resnet18")
    p.add_argument("--ensemble_size", default=48, type=int)
    p.add_argument("--meta_class_size", default=12, type=int)
    p.add_argument("--batch_size", default=10, type=int)
    p.add_argument("--image_size", default=256, type=int)
    p.add_argument("--steps", default=5, type=int)
    p.add_argument("--warmup", default=1, type=int)
    p.add_argument("--rounds", default=1, type=int, help="interleaved rounds over the forms (median of all steps)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the grouped model (CUDA)")
    p.add_argument("--forms", default=["all"], nargs="+", help="subset of original loop grouped grouped_cl compiled")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
