"""One command that checks a GPU end to end (under 8 minutes on one GPU) and writes
``results/benchmarks/gpu_check.md`` + ``.json``, row by row as it goes:

1. ``synthetic``: training img/s and peak GPU memory at each paper's setting (224 px; CGD ResNet-50 batch 128,
   REIR/SREML E = 48 ResNet-18 batch 10 (grouped), IRT DeiT-S batch 64, FastRetri ResNet-50 batch 128), tensors
   already on the GPU (the model's ceiling): fp32 (PyTorch defaults: cuDNN convolutions in TF32), fp32
   channels-last, bf16 autocast, fp16 autocast + GradScaler (channels-last for the CNNs).
2. ``loader``: the same step (bf16) fed by a real DataLoader over realistic fake JPEGs (500x375, made on the fly)
   with every host core, per input pipeline (``original``, ``fast``, ``tensor``, ``gpu`` decode, see
   ``benchmarks.loader_benchmark.data_loader``), and the loader alone: does the host keep the GPU fed?
3. ``ensemble``: REIR/SREML E = 48 ResNet-18, the originals' loop of 48 learners (a ModuleList) and
   ``reir.model.Model``'s loop vs its grouped form: ms/step and outputs (``benchmarks.ensemble_benchmark``).
4. ``recall``: exact Recall@{1,10,100,1000} at SOP scale (60,502 x 512, 11,316 classes, the data of
   ``benchmarks.recall_benchmark``) with ``common.metrics.recall_at_k`` vs the full similarity matrix + top-k, and
   the GEMM alone (the floor).
5. ``ddp``: a 1-process DDP smoke run of every method: ``torchrun --standalone --nproc_per_node 1 <method>/train.py``
   on the demo data with tiny settings; failures are reported in their row.

Every section and every row is guarded (an error is recorded in its row and the check goes on) and the files are
rewritten after every row. ``--budget_s`` bounds the whole run: a row that would start after its section's share of
the budget is recorded as skipped. The models, losses and steps come from the per-topic benchmarks.

    python -m benchmarks.gpu_check                            # on a GPU
    python -m benchmarks.gpu_check --device cpu --quick       # every section at tiny sizes, < 1 minute (tests)
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import cgd_benchmark, ensemble_benchmark, irt_benchmark, loader_benchmark, recall_benchmark
from benchmarks.meter import (
    REPO,
    Trainer,
    TrainingParts,
    cpu_model,
    cuda_peak_gib,
    host_cores,
    module_env,
    reset_cuda_peak,
    sync,
    timed,
)
from benchmarks.recall_benchmark import full_matrix_recall
from common.errors import UserError, run_cli

SECTIONS = ("synthetic", "loader", "ensemble", "recall", "ddp")
# Share of --budget_s by the end of each section (the time a section leaves unused goes to the next ones).
BUDGET_SHARE = {"synthetic": 0.27, "loader": 0.52, "ensemble": 0.64, "recall": 0.72, "ddp": 1.0}
METHODS = ("cgd", "reir", "irt", "fastretri")
DDP_METHODS = ("cgd", "reir", "sreml", "irt", "fastretri")


def settings(quick: bool) -> Dict[str, Dict[str, Any]]:
    """Each paper's training setting (224 px), or tiny CPU sizes with ``--quick``."""
    if quick:
        return {
            "cgd": dict(backbone="resnet18", batch=8, image=32, label="CGD ResNet-18 (quick)"),
            "reir": dict(ensemble=2, meta=4, batch=4, image=32, label="REIR/SREML E=2 ResNet-18 (quick)"),
            "irt": dict(
                model="vit_tiny_patch16_224",
                kwargs={"patch_size": 8, "depth": 2},
                batch=8,
                image=32,
                label="IRT ViT-tiny depth 2 (quick)",
            ),
            "fastretri": dict(backbone="resnet18", batch=8, image=32, label="FastRetri ResNet-18 (quick)"),
        }
    return {
        "cgd": dict(backbone="resnet50", batch=128, image=224, label="CGD ResNet-50 SG-1536, batch 128"),
        "reir": dict(ensemble=48, meta=12, batch=10, image=224, label="REIR/SREML E=48 M=12 ResNet-18, batch 10"),
        "irt": dict(
            model="deit_small_distilled_patch16_224",
            kwargs={},
            batch=64,
            image=224,
            label="IRT DeiT-S distilled, batch 64",
        ),
        "fastretri": dict(backbone="resnet50", batch=128, image=224, label="FastRetri ResNet-50, batch 128"),
    }


# ----------------------------------------------------------------------------------------------------------- report
class Report:
    """Sections of rows, written to ``<out>/gpu_check.json`` and ``.md`` (atomically) after every change."""

    def __init__(self, out: Path, meta: Dict[str, Any]):
        self.out, self.t0 = out, time.perf_counter()
        self.data: Dict[str, Any] = {"meta": meta, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, title: str, columns: Sequence[Tuple[str, str, str]], note: str = "") -> None:
        self.data["sections"][name] = {
            "started": time.perf_counter(),
            "title": title,
            "note": note,
            "columns": [list(c) for c in columns],
            "rows": [],
            "status": "running",
        }
        print(f"\n== {title}", flush=True)
        self.write()

    def add(self, name: str, row: Dict[str, Any]) -> Dict[str, Any]:
        section = self.data["sections"][name]
        section["rows"].append(row)
        print("  " + " | ".join(_cells(section["columns"], row) + [_note(row)]), flush=True)
        self.write()
        return row

    def measure(self, name: str, row: Dict[str, Any], left_s: float, fn: Callable[..., Dict], *args: Any) -> None:
        """Add ``row`` with ``fn(*args)``'s results, or its error, or as skipped when ``left_s`` <= 0: one row's
        failure must not end the check."""
        if left_s <= 0:
            row["error"] = "skipped: time budget"
        else:
            try:
                row |= fn(*args)
            except Exception as e:  # noqa: BLE001
                row["error"] = _error(e)
        self.add(name, row)

    def finish(self, name: str, error: Optional[str] = None) -> None:
        section = self.data["sections"][name]
        section["status"] = "error" if error else "done"
        section["seconds"] = round(time.perf_counter() - section.pop("started", time.perf_counter()), 1)
        if error:
            section["error"] = error
            print(f"  section failed: {error}", flush=True)
        self.write()

    def write(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        _atomic_write(self.out / "gpu_check.json", json.dumps(self.data, indent=1, default=str))
        _atomic_write(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        meta = self.data["meta"]
        lines = [
            "# GPU check",
            "",
            f"`{meta['command']}`",
            "",
            f"- device: {meta['device_name']}; host: {meta['host_cpu']}, {meta['host_cores']} cores",
            f"- torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; {meta['date']}; "
            f"{'quick (tiny sizes)' if meta['quick'] else 'paper settings'}; {meta['elapsed_s']} s",
        ]
        for section in self.data["sections"].values():
            took = f" ({section['seconds']} s)" if "seconds" in section else ""
            lines += ["", f"## {section['title']}{took}", ""]
            if section["note"]:
                lines += [section["note"], ""]
            headers = [c[1] for c in section["columns"]] + ["note"]
            lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += [
                "| " + " | ".join(_cells(section["columns"], row) + [_note(row)]) + " |" for row in section["rows"]
            ]
            if section.get("error"):
                lines += ["", f"Section failed: `{section['error']}`"]
        return "\n".join(lines) + "\n"


def _cells(columns: Sequence[Sequence[str]], row: Dict[str, Any]) -> List[str]:
    out = []
    for key, _, fmt in columns:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append("–")
        else:
            try:
                out.append(fmt.format(value))
            except (ValueError, TypeError):
                out.append(str(value))
    return out


def _note(row: Dict[str, Any]) -> str:
    return str(row.get("error") or row.get("note") or "").replace("|", "/").replace("\n", " ")[:300]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:240] if str(e).strip() else ''}"


class Budget:
    def __init__(self, total_s: float):
        self.t0, self.total = time.perf_counter(), total_s

    def left(self, section: str) -> float:
        """Seconds left before ``section``'s share of the budget is used up."""
        return self.t0 + BUDGET_SHARE[section] * self.total - time.perf_counter()


# -------------------------------------------------------------------------------------------------- models & steps
MODES = {  # name -> (autocast dtype or None, GradScaler, channels-last)
    "fp32": (None, False, False),
    "fp32 CL": (None, False, True),
    "bf16 CL": (torch.bfloat16, False, True),
    "fp16 CL + GradScaler": (torch.float16, True, True),
    "bf16": (torch.bfloat16, False, False),
    "fp16 + GradScaler": (torch.float16, True, False),
}


def modes_of(method: str, device: torch.device, quick: bool = False) -> List[str]:
    """Channels-last only for the CNNs (a ViT has no 4-D activations after the patch embedding). On CPU no fp16
    (no fast fp16 kernels there: a step takes minutes) and, with --quick, no separate fp32 channels-last row."""
    modes = (
        ["fp32", "bf16", "fp16 + GradScaler"]
        if method == "irt"
        else ["fp32", "fp32 CL", "bf16 CL", "fp16 CL + GradScaler"]
    )
    if device.type == "cuda":
        return modes
    return [m for m in modes if "fp16" not in m and not (quick and m == "fp32 CL")]


def fastest_mode(method: str) -> str:
    return "bf16" if method == "irt" else "bf16 CL"


def build(method: str, s: Dict[str, Any]) -> TrainingParts:
    """Model, loss, optimizer and labels of one method at setting ``s``, from its benchmark."""
    if method == "cgd":
        return cgd_benchmark.training_parts(s["backbone"], s["batch"])
    if method == "reir":
        return ensemble_benchmark.training_parts(s["ensemble"], s["meta"], s["batch"])
    if method == "irt":
        return irt_benchmark.training_parts(s["model"], s["kwargs"], s["image"], s["batch"])
    if method == "fastretri":  # label-smoothed cross-entropy and fast-reid's SGD
        from fastretri.losses import LabelSmoothingCrossEntropy
        from fastretri.model import FastRetri

        ce = LabelSmoothingCrossEntropy(0.1)
        return TrainingParts(
            FastRetri(100, backbone=s["backbone"], pretrained="none"),
            lambda out, y: ce(out[1].float(), y),
            lambda params: torch.optim.SGD(params, lr=3e-3, momentum=0.99, nesterov=True, weight_decay=5e-4),
            torch.randint(0, 100, (s["batch"],)),
        )
    raise ValueError(method)


def make_trainer(method: str, s: Dict[str, Any], mode: str, device: torch.device) -> Trainer:
    """A training step of ``method`` at setting ``s`` in precision ``mode``."""
    with device:  # parameters initialised on the device (48 learners' init on a CPU takes seconds)
        parts = build(method, s)
    return Trainer(parts, device, *MODES[mode])


# --------------------------------------------------------------------------------------------------------- sections
def _synthetic_row(method: str, s: Dict[str, Any], mode: str, device: torch.device, args) -> Dict[str, float]:
    reset_cuda_peak(device)
    trainer = make_trainer(method, s, mode, device)
    images = trainer.prepare(torch.randn(s["batch"], 3, s["image"], s["image"], device=device))
    sec = timed(lambda: trainer.step(images), args.warmup, args.steps, device)
    return {"img_s": s["batch"] / sec, "ms_step": sec * 1000, "peak_gib": cuda_peak_gib(device)}


def section_synthetic(report: Report, args, device: torch.device, budget: Budget) -> Dict[Tuple[str, str], float]:
    report.start(
        "synthetic",
        "Training throughput, synthetic tensors on the device (the model's ceiling)",
        [
            ("setting", "setting", "{}"),
            ("mode", "mode", "{}"),
            ("img_s", "img/s", "{:.0f}"),
            ("ms_step", "ms/step", "{:.1f}"),
            ("peak_gib", "peak GiB", "{:.2f}"),
            ("vs_fp32", "vs fp32", "{:.2f}x"),
        ],
        note=f"{args.warmup} warm-up + {args.steps} timed steps (forward, loss, backward, optimizer) after "
        "torch.cuda.synchronize; fp32 = PyTorch defaults (cuDNN convolutions may use TF32, matmuls fp32).",
    )
    ceilings: Dict[Tuple[str, str], float] = {}

    def measure(method: str, s: Dict[str, Any], mode: str) -> Dict[str, float]:
        row = _synthetic_row(method, s, mode, device, args)
        ceilings[(method, mode)] = row["img_s"]
        fp32 = ceilings.get((method, "fp32"))
        return row | {"vs_fp32": row["img_s"] / fp32 if fp32 else None}

    for method in args.methods:
        s = settings(args.quick)[method]
        for mode in modes_of(method, device, args.quick):
            row = {"method": method, "setting": s["label"], "mode": mode}
            report.measure("synthetic", row, budget.left("synthetic"), measure, method, s, mode)
    return ceilings


def _loader_row(
    pipeline: str, preset, paths: List[str], trainer: Trainer, ceiling: Optional[float], args
) -> Dict[str, float]:
    """Loader alone, then training fed by it (the same persistent workers), 2 warm-up batches each."""
    batch, device = len(trainer.labels), trainer.device
    loader, to_device = loader_benchmark.data_loader(
        pipeline, preset, paths, batch, args.loader_batches + 2, args.workers, device
    )
    alone = loader_benchmark.loader_rate(loader, to_device, 2, batch, device)
    fed = loader_benchmark.loader_rate(loader, lambda b: trainer.step(trainer.prepare(to_device(b))), 2, batch, device)
    return {"loader_img_s": alone, "train_img_s": fed} | ({"fed": fed / ceiling} if ceiling else {})


def section_loader(
    report: Report, args, device: torch.device, budget: Budget, paths: List[str], ceilings: Dict[Tuple[str, str], float]
) -> None:
    report.start(
        "loader",
        f"Real DataLoader on fake 500x375 JPEGs, {args.workers} DataLoader workers",
        [
            ("method", "method", "{}"),
            ("pipeline", "pipeline", "{}"),
            ("loader_img_s", "loader alone img/s", "{:.0f}"),
            ("train_img_s", "training img/s", "{:.0f}"),
            ("ceiling_img_s", "synthetic img/s", "{:.0f}"),
            ("fed", "training / synthetic", "{:.0%}"),
        ],
        note=f"Training preset of each method at the setting above, {len(paths)} distinct JPEGs (page cache), "
        "random sampling with replacement; the training step uses the fastest synthetic mode (bf16, "
        "channels-last for CNNs; fp32 on CPU). Pipelines: original = ToTensor and Normalize as two ops (PIL); "
        "fast = the presets as the methods run them (fused, bit-identical); tensor = decode_jpeg + transforms.v2 "
        "in the workers; gpu = workers read bytes, nvJPEG decode + augment on the device (benchmarks/gpu_decode.py).",
    )
    for method in args.methods:
        s = settings(args.quick)[method]
        mode = fastest_mode(method) if device.type == "cuda" else "fp32"
        try:
            preset = loader_benchmark.method_preset(method, True, "cub", "uncropped", s["image"])
            trainer = make_trainer(method, s, mode, device)
        except Exception as e:  # noqa: BLE001
            report.add("loader", {"method": method, "error": _error(e)})
            continue
        for pipeline in args.pipelines:
            ceiling = ceilings.get((method, mode))
            row = {"method": method, "pipeline": pipeline, "ceiling_img_s": ceiling}
            left = budget.left("loader")
            report.measure("loader", row, left, _loader_row, pipeline, preset, paths, trainer, ceiling, args)
        trainer = None
        reset_cuda_peak(device)


ENSEMBLE_FORMS = {  # ensemble_benchmark's forms -> the names of this check's rows
    "original": "originals' loop (ModuleList)",
    "loop": "Model loop",
    "grouped": "Model grouped",
    "grouped_cl": "Model grouped CL",
}


def section_ensemble(report: Report, args, device: torch.device, budget: Budget) -> None:
    s = settings(args.quick)["reir"]
    e, m, b, size = s["ensemble"], s["meta"], s["batch"], s["image"]
    report.start(
        "ensemble",
        f"REIR/SREML ensemble, E={e} ResNet-18 M={m}, batch {b}, {size} px: loop vs grouped",
        [
            ("form", "form", "{}"),
            ("precision", "precision", "{}"),
            ("ms_step", "ms/step", "{:.1f}"),
            ("vs_original", "speed-up vs originals' loop", "{:.2f}x"),
            ("vs_loop", "vs Model loop", "{:.2f}x"),
            ("max_dlogits", "max abs diff logits (fp32)", "{:.2e}"),
            ("peak_gib", "peak GiB", "{:.2f}"),
        ],
        note="One step = forward + cross-entropy over meta-classes + backward + Adam, all forms from the same "
        "weights; logits compared with the originals' loop in full fp32 (no TF32). Target: grouped >= 3x the "
        "loop on GPU.",
    )
    torch.manual_seed(0)
    with device:
        base, _, _, labels = ensemble_benchmark.training_parts(e, m, b)
    images, labels = torch.randn(b, 3, size, size, device=device), labels.to(device)
    forms = ensemble_benchmark.forms(base, device)
    reference: List[torch.Tensor] = []  # the first fp32 form's logits

    def measure(form: str, dtype: Optional[torch.dtype], times: Dict[str, float]) -> Dict[str, Any]:
        with device:
            model = forms[form]()
        reset_cuda_peak(device)
        model = model.to(device).train()
        x = images.contiguous(memory_format=torch.channels_last) if form == "grouped_cl" else images
        slow = form in ("original", "loop")  # the first step is a warm-up step too
        steps, warmup = max(1, args.steps // (3 if slow else 1)), (1 if slow else args.warmup) - 1
        r = ensemble_benchmark.time_form(model, x, labels, steps, max(warmup, 0), device, dtype)
        times[form] = 1000 * sum(r["times"]) / len(r["times"])
        row = {"ms_step": times[form], "peak_gib": cuda_peak_gib(device)}
        if dtype is None:
            reference.append(r["first_logits"])
            row["max_dlogits"] = (r["first_logits"] - reference[0]).abs().max().item()
        orig, loop = times.get("original"), times.get("loop")
        return row | {"vs_original": orig and orig / times[form], "vs_loop": loop and loop / times[form]}

    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        times: Dict[str, float] = {}
        for form in forms:
            row = {"form": ENSEMBLE_FORMS[form], "precision": precision}
            report.measure("ensemble", row, budget.left("ensemble"), measure, form, dtype, times)


def section_recall(report: Report, args, device: torch.device, budget: Budget) -> None:
    from common.metrics import recall_at_k

    n, d, classes = (3000, 64, 560) if args.quick else (60502, 512, 11316)
    ranks = [1, 10, 100] if args.quick else [1, 10, 100, 1000]
    report.start(
        "recall",
        f"Exact Recall@K at {'SOP scale' if not args.quick else 'quick scale'}: N={n:,}, d={d}, "
        f"{classes:,} classes, every image a query against all others",
        [("approach", "approach", "{}"), ("seconds", "seconds", "{:.3f}"), ("peak_gib", "peak GiB", "{:.2f}")]
        + [(f"r{k}", f"R@{k}", "{:.4f}") for k in ranks]
        + [("equal", "equal to full matrix", "{}")],
        note="Synthetic unit features around class centres (benchmarks.recall_benchmark's data); fp32; median of "
        "timed runs after a warm-up; the GEMM row is the N x N product alone (the floor of any exact method).",
    )
    x, y = recall_benchmark.make_data(n, d, classes)
    features, labels = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    approaches: List[Tuple[str, Callable[[], Any]]] = [
        ("full matrix + topk", lambda: full_matrix_recall(features, labels, ranks)),
        ("common.metrics.recall_at_k", lambda: recall_at_k(features, labels, ranks)),
        ("GEMM only (floor)", lambda: features @ features.T),
    ]
    if device.type == "cuda":
        approaches.insert(
            2,
            ("recall_at_k, memory_budget 8 GiB", lambda: recall_at_k(features, labels, ranks, memory_budget=8 * 2**30)),
        )
    full: List[List[float]] = []

    def measure(fn: Callable[[], Any]) -> Dict[str, Any]:
        reset_cuda_peak(device)
        fn()  # warm-up (CUDA context, cuBLAS handles, allocator)
        runs, out = [], None
        for _ in range(3):
            out = None  # free the previous result (an N x N matrix for the GEMM row) before the next
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            runs.append(time.perf_counter() - t0)
            if runs[-1] > 5:
                break
        row = {"seconds": sorted(runs)[len(runs) // 2], "peak_gib": cuda_peak_gib(device)}
        if isinstance(out, list):
            full.append(out)
            row |= {f"r{k}": v for k, v in zip(ranks, out)}
            row["equal"] = all(abs(a - b) * n < 0.5 for a, b in zip(out, full[0]))  # the same hit counts
        return row

    for name, fn in approaches:
        report.measure("recall", {"approach": name}, budget.left("recall"), measure, fn)


def write_tiny_demo(root: Path) -> Path:
    """A tiny stand-in for the demo dataset (8 + 8 classes x 4 images, 40 px) in the processed-index layout, so
    the quick smoke runs need seconds; ``ensure_demo`` sees both indexes and builds nothing."""
    import numpy as np
    from PIL import Image

    folder = root / "demo"
    rng = np.random.default_rng(0)
    splits: Dict[str, List[List[str]]] = {"train": [], "test": []}
    for cls in range(1, 17):
        colour = rng.integers(0, 256, 3)
        for j in range(4):
            rel = f"images/{cls:03d}/img_{cls}_{j}.jpg"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            img = np.clip(colour + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / rel, quality=95)
            splits["train" if cls <= 8 else "test"].append([rel, str(cls)])
    for crop_type in ("uncropped", "cropped"):
        (folder / f"{crop_type}_index.json").write_text(json.dumps({"splits": splits}))
    return root


def ddp_commands(data: str, quick: bool, workers: int) -> Dict[str, List[str]]:
    """Each method's train.py with tiny settings on the demo data (1 epoch / a few iterations)."""
    b, w, iters = ("8" if quick else "32"), str(workers), ("4" if quick else "20")
    cnn = ["--data_path", data, *"--data_name demo --crop_type cropped --pretrained none --image_size 32".split()]
    cnn += f"--batch_size {b} --num_epochs 1 --num_workers {w} --recalls 1,2,4,8".split()
    ensemble = f"--ensemble_size 4 --meta_class_size {4 if quick else 8}".split()
    irt = "--model vit_tiny_patch16_224 --input-size 32 --model-kwargs patch_size=8 depth=2 --pretrained none"
    irt_tail = f"--crop_type cropped --max-iter {iters} --eval-freq {iters} --batch-size {b} --m 4 --num-workers {w}"
    irt_tail += " --rank 1 2 4 8"
    fastretri = f"SOLVER.MAX_EPOCH 1 SOLVER.IMS_PER_BATCH {b} DATALOADER.NUM_WORKERS {w} TEST.EVAL_PERIOD 1"
    return {
        "cgd": ["cgd/train.py", *cnn, *"--backbone_type resnet18 --no-freeze_bn --feature_dim 64".split()],
        "reir": ["reir/train.py", *cnn, *ensemble],
        "sreml": ["sreml/train.py", *cnn, *ensemble],
        "irt": ["irt/train.py", *irt.split(), "--dataset", "demo", "--data-path", data, *irt_tail.split()],
        "fastretri": ["fastretri/train.py", "--config-file", "fastretri/configs/demo.yml", "DATASETS.ROOT", data]
        + fastretri.split(),
    }


def _ddp_row(argv: List[str], env: Dict[str, str], timeout: float) -> Dict[str, Any]:
    """Run one torchrun command line; its status, seconds and last line (or most telling error line)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *argv[1:]],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - t0, "error": f"no exit within {timeout:.0f} s"}
    except Exception as e:  # noqa: BLE001
        return {"status": "error", "error": _error(e)}
    row = {"seconds": time.perf_counter() - t0, "status": "ok"}
    if proc.returncode != 0:
        error = _last_error(proc.stdout + "\n" + proc.stderr)
        return row | {"status": f"failed (exit {proc.returncode})", "error": error}
    return row | {"note": _last_line(proc.stdout)}


def section_ddp(report: Report, args, device: torch.device, budget: Budget) -> None:
    report.start(
        "ddp",
        "1-process DDP smoke run of every method (torchrun, demo data, tiny settings)",
        [
            ("method", "method", "{}"),
            ("status", "status", "{}"),
            ("seconds", "seconds", "{:.1f}"),
            ("command", "command", "`{}`"),
        ],
        note=f"`torchrun --standalone --nproc_per_node 1` (NCCL on GPU, gloo on CPU); results in a temporary "
        f"RETRIEVAL_RESULTS folder; {'a tiny stand-in demo set' if args.quick else 'the demo data'}.",
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = str(write_tiny_demo(Path(tmp) / "data")) if args.quick else args.data_path
        env = module_env() | {"RETRIEVAL_RESULTS": str(Path(tmp) / "results"), "PYTHONUNBUFFERED": "1"}
        if device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        commands = ddp_commands(data, args.quick, 0 if args.quick else 2)
        for method in args.ddp_methods:
            argv = ["torchrun", "--standalone", "--nproc_per_node", "1", *commands[method]]
            row = {"method": method, "command": " ".join(argv)}
            left = budget.left("ddp")
            if left <= 5:
                row |= {"status": "skipped", "error": "skipped: time budget"}
            else:
                row |= _ddp_row(argv, env, min(args.ddp_timeout, left))
            report.add("ddp", row)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _last_error(text: str) -> str:
    """The most telling line of a failed run: the exception line of a traceback or an ``error:`` line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or (":" in ln and ln.split(":")[0].endswith(("Error", "Exception"))):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> Dict[str, Any]:
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available (use --device cpu --quick)")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), args.workers or torch.get_num_threads())))
    torch.backends.cudnn.benchmark = True
    cores = host_cores()
    meta = {
        "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})",
        "host_cpu": cpu_model(),
        "host_cores": cores,
        "workers": args.workers,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
    }
    report = Report(Path(args.out), meta)
    budget = Budget(args.budget_s)
    tmp = tempfile.TemporaryDirectory()
    paths: List[str] = []
    if "loader" in args.sections:  # before CUDA is initialised: the pool forks
        try:
            paths = loader_benchmark.make_jpegs(tmp.name, args.jpegs, workers=cores)
        except Exception as e:  # noqa: BLE001
            print(f"fake JPEGs failed: {_error(e)}")
    ceilings: Dict[Tuple[str, str], float] = {}
    runners = {
        "synthetic": lambda: ceilings.update(section_synthetic(report, args, device, budget)),
        "loader": lambda: section_loader(report, args, device, budget, paths, ceilings),
        "ensemble": lambda: section_ensemble(report, args, device, budget),
        "recall": lambda: section_recall(report, args, device, budget),
        "ddp": lambda: section_ddp(report, args, device, budget),
    }
    for name in SECTIONS:
        if name not in args.sections:
            continue
        try:
            runners[name]()
            report.finish(name)
        except Exception as e:  # noqa: BLE001 - a failed section keeps the others
            traceback.print_exc()
            if name not in report.data["sections"]:
                report.start(name, name, [])
            report.finish(name, _error(e))
        finally:
            reset_cuda_peak(device)
    tmp.cleanup()
    report.write()
    print(f"\nwrote {Path(args.out) / 'gpu_check.md'} and .json in {time.perf_counter() - t0:.0f} s")
    return report.data


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="one-command GPU check: throughput, loader, ensemble, recall, DDP", add_help=add_help
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (CPU: under a minute)")
    p.add_argument("--out", default="results/benchmarks", help="folder of gpu_check.md/.json")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--ddp_methods",
        nargs="+",
        default=None,
        choices=DDP_METHODS,
        help="methods of the torchrun smoke runs (default: all; with --quick: cgd)",
    )
    p.add_argument(
        "--pipelines",
        nargs="+",
        default=["original", "fast", "tensor", "gpu"],
        choices=["original", "fast", "tensor", "gpu"],
    )
    p.add_argument("--steps", default=None, type=int, help="timed steps per row (default 10; quick 1)")
    p.add_argument("--warmup", default=None, type=int, help="warm-up steps per row (default 3; quick 1)")
    p.add_argument("--workers", default=None, type=int, help="DataLoader workers (default: all host cores; quick 0)")
    p.add_argument("--jpegs", default=None, type=int, help="distinct fake JPEGs (default 512; quick 12)")
    p.add_argument("--loader_batches", default=None, type=int, help="timed batches per loader row (default 6; quick 1)")
    p.add_argument("--data_path", default="data", help="demo data root of the DDP runs (built on first use)")
    p.add_argument("--ddp_timeout", default=None, type=float, help="seconds per torchrun (default 150; quick 60)")
    p.add_argument("--budget_s", default=None, type=float, help="whole-run budget (default 420; quick 50)")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    cores, q = host_cores(), args.quick
    defaults = {
        "steps": 1 if q else 10,
        "warmup": 1 if q else 3,
        "workers": 0 if q else cores,
        "jpegs": 12 if q else 512,
        "loader_batches": 1 if q else 6,
        "ddp_timeout": 60 if q else 150,
        "budget_s": 50 if q else 420,
        "ddp_methods": ["cgd"] if q else list(DDP_METHODS),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    run_cli(main, resolve_defaults(get_args_parser().parse_args()))
