"""``export.py`` of every method: a trained run's embedding network as ONNX and TorchScript, written once on a
:class:`MethodSpec`.

The exported graph takes RGB float32 images ``(N, 3, H, W)`` in [0, 1] at the evaluation size, normalises them
with the preset's mean / std *inside* the graph and returns the embedding the method retrieves with, L2-normalised
as in evaluation. REIR / SREML return the ensemble embedding: the E per-learner unit vectors concatenated and
divided by sqrt(E), so a plain inner product is the mean per-learner cosine (the database's ``scale = E`` folded in).
A JSON file beside the graphs records what happens *before* it (resize / centre-crop rule read off the evaluation
transform), the size, mean / std, embedding size, similarity and the run's configuration.

    python cgd/export.py --data_base <run>_data_base.pth            # -> results/cgd/export/<run>/
    python cgd/export.py --model_file results/cgd/<run>_model.pth --format onnx --output deploy/

ONNX uses torch's TorchScript-based exporter (no ``onnxscript`` needed, fast) at the newest opset it supports,
with a dynamic batch axis; TorchScript uses ``torch.jit.trace``. ``onnx`` and ``onnxruntime`` are the optional
``export`` extra (``pip install -e .[export]``); unless ``--no-verify``, onnxruntime and the reloaded TorchScript
module must reproduce the PyTorch embeddings (max abs difference <= ``--atol``) before any file is written.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common.backbones import fixed_input_size
from common.cli import add_flag
from common.data.normalize import split_preset
from common.errors import UserError
from common.runs import add_run_flags, load_run, results_dir
from common.spec import MethodSpec

__all__ = [
    "FORMATS",
    "FILES",
    "METADATA",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "EmbeddingGraph",
    "preprocessing",
    "default_opset",
    "export_model",
    "export_parser",
    "ExportOptions",
    "run_export",
]

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "embedding.onnx", "torchscript": "embedding_torchscript.pt"}
METADATA = "embedding.json"
INPUT_NAME, OUTPUT_NAME = "images", "embedding"
EXTRA = "pip install -e .[export]  (or: pip install -r requirements-export.txt)"


class EmbeddingGraph(nn.Module):
    """RGB in [0, 1] -> ``(x - mean) / std`` -> the method's ``embed`` -> divided by ``sqrt(scale)``."""

    def __init__(
        self,
        model: nn.Module,
        embed: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 1.0,
    ):
        super().__init__()
        self.model, self.embed = model, embed
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.root = math.sqrt(scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.embed(self.model, (images - self.mean) / self.std)
        return out / self.root if self.root != 1.0 else out


# ---------------------------------------------------------------- the evaluation preset, as data


def _image_ops(transform: Callable) -> Tuple[list, Tuple[float, ...], Tuple[float, ...]]:
    """(PIL ops, mean, std) of an evaluation preset."""
    try:
        return split_preset(transform)
    except ValueError:
        raise UserError(
            f"cannot export: the evaluation transform does not end with ToTensor -> Normalize ({transform!r})"
        ) from None


def _pair(size: Any) -> List[int]:
    """torchvision's size argument as [h, w]."""
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in (list(size) * 2)[:2]]


def preprocessing(transform: Callable) -> Tuple[List[Dict[str, Any]], List[int], List[float], List[float]]:
    """The evaluation transform's resize / crop steps as JSON-able dicts, the output size [H, W], mean and std.

    ``resize`` with ``mode: shorter_side`` scales the shorter side to ``size`` and the longer one to
    ``int(size * longer / shorter)`` (torchvision's rule); ``mode: exact`` resizes to ``size = [h, w]``.
    ``center_crop`` cuts ``size = [h, w]`` at top = round((H - h) / 2), left = round((W - w) / 2)."""
    ops, mean, std = _image_ops(transform)
    steps: List[Dict[str, Any]] = []
    size: Optional[List[int]] = None
    for op in ops:
        if isinstance(op, T.Resize):
            shorter = isinstance(op.size, int) or len(op.size) == 1
            target = int(op.size if isinstance(op.size, int) else op.size[0]) if shorter else _pair(op.size)
            steps.append(
                {
                    "op": "resize",
                    "mode": "shorter_side" if shorter else "exact",
                    "size": target,
                    "interpolation": op.interpolation.value,
                    "antialias": True,
                    "max_size": op.max_size,
                }
            )
            size = None if shorter else target
        elif isinstance(op, T.CenterCrop):
            size = _pair(op.size)
            steps.append({"op": "center_crop", "size": size})
        else:
            raise UserError(
                f"cannot export: the evaluation transform has {op!r}, which is not a resize or a centre crop"
            )
    if size is None:
        raise UserError(
            "cannot export: the evaluation transform gives images of varying size (a shorter-side "
            "Resize without a crop); a graph needs one input size"
        )
    return steps, size, [float(m) for m in mean], [float(s) for s in std]


# ---------------------------------------------------------------- export


def default_opset() -> int:
    """The newest opset both torch's TorchScript-based exporter and the installed ``onnx`` support."""
    import onnx
    from torch.onnx import _constants

    return min(int(getattr(_constants, "ONNX_MAX_OPSET", 17)), int(onnx.defs.onnx_opset_version()))


def _require(module: str, why: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{why} needs the optional package {module!r}: {EXTRA}") from None


def _ranking(spec: MethodSpec, scale: float) -> str:
    if spec.metric == "euclidean":
        return "Euclidean distance, smaller first (unit vectors: the same order as the inner product, larger first)"
    if scale != 1.0:
        return (
            f"inner product, larger first: the mean cosine of the {int(scale)} learners (each learner's unit "
            f"vector is divided by sqrt({int(scale)}) here)"
        )
    return "inner product, larger first (cosine similarity of unit vectors)"


def _max_diff(a: torch.Tensor, b: Any) -> float:
    return float((a - torch.as_tensor(b)).abs().max())


def _tensors(graph) -> Iterator:
    """Every TensorProto of an ONNX graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _gather_external_data(proto, source: Path, target: Path) -> Optional[str]:
    """Copy the weights that live outside ``proto`` (torch writes one file per tensor above protobuf's 2 GiB
    limit, e.g. REIR with 48 ResNet-18 learners) into the single file ``target``, one tensor at a time (no copy
    of the model in memory), and point ``proto`` at it; None when every weight is inside ``proto``."""
    from onnx import TensorProto
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = [t for t in _tensors(proto.graph) if uses_external_data(t)]
    if not tensors:
        return None
    offset = 0
    with open(target, "wb") as out:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            with open(source / info.location, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
            padding = -offset % 4096  # page-aligned tensors can be memory-mapped
            out.write(b"\0" * padding + blob)
            offset += padding
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", target.name), ("offset", offset), ("length", len(blob))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += len(blob)
    return target.name


def _export_onnx(
    graph: nn.Module, example: torch.Tensor, path: Path, opset: int, meta: Dict[str, Any]
) -> Optional[str]:
    """``path``, plus ``<path>.data`` with the weights of a graph over 2 GiB; returns that file's name or None."""
    import onnx

    raw = path.parent / "raw" / path.name
    raw.parent.mkdir()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
        torch.onnx.export(
            graph,
            (example,),
            str(raw),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load(str(raw), load_external_data=False)
    data = _gather_external_data(proto, raw.parent, path.parent / f"{path.name}.data")
    entry = proto.metadata_props.add()
    entry.key, entry.value = "retrieval_toolkit", json.dumps(meta, default=str)
    onnx.save_model(proto, str(path))
    del proto
    shutil.rmtree(raw.parent)
    onnx.checker.check_model(str(path))
    return data


def _verify_onnx(path: Path, inputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    ort = _require("onnxruntime", "checking the ONNX graph (--verify)")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - e.g. an onnxruntime older than the opset
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"onnxruntime {ort.__version__} cannot load the exported graph ({first}); upgrade "
            f"onnxruntime or pass an older --opset"
        ) from None
    return max(_max_diff(e, session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]) for x, e in zip(inputs, expected))


def _export_torchscript(graph: nn.Module, example: torch.Tensor, path: Path, meta: Dict[str, Any]) -> None:
    """``torch.jit.trace`` + save, the metadata inside as the extra file ``embedding.json``."""
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit's FutureWarning (TorchScript is what LibTorch loads) and tracer warnings on shape arithmetic,
        # which is traced as graph ops: the batch axis stays dynamic (checked at batch 1 and 3)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA: json.dumps(meta, default=str)})


def _verify_torchscript(path: Path, inputs: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return max(_max_diff(e, module(x)) for x, e in zip(inputs, expected))


def export_model(
    spec: MethodSpec,
    model: nn.Module,
    config: Mapping[str, Any],
    out_dir: os.PathLike,
    *,
    run: str = "",
    formats: Sequence[str] = FORMATS,
    opset: Optional[int] = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> Dict[str, Any]:
    """Export ``model`` (a trained network of ``spec`` built from ``config``) to ``out_dir``; returns the metadata.

    The model is put in eval mode, float32, on the CPU (REIR: the learner-by-learner form). Files
    are written in a temporary folder inside ``out_dir`` and renamed into place only after the check passed, the
    JSON last: a failed or killed export never leaves a partial or stale-looking set."""
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {' '.join(unknown) or '(none)'}: choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        _require("onnx", "ONNX export")
        if verify:
            _require("onnxruntime", "checking the ONNX graph (--verify)")
        opset = opset or default_opset()
    steps, size, mean, std = preprocessing(spec.eval_transform(config))
    model = model.float().cpu().eval().requires_grad_(False)  # inference only: weights are graph constants
    if callable(getattr(model, "set_impl", None)):
        model.set_impl("loop")  # REIR: learner by learner, faster than grouped in onnxruntime on CPU too
    scale = float(spec.scale(config))
    graph = EmbeddingGraph(fixed_input_size(model, size), spec.embed, mean, std, scale).eval()  # ViTs: no resize

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(n, 3, *size, generator=generator) for n in (2, 1, 3)]  # traced at 2, checked at 1 and 3
    with torch.no_grad():  # the reference: the evaluation code path, normalising with torchvision
        expected = [spec.embed(model, TF.normalize(x, mean, std)) / math.sqrt(scale) for x in inputs]
    dim = int(expected[0].shape[1])
    norms = torch.cat(expected).norm(dim=1)
    meta: Dict[str, Any] = {
        "format_version": 1,
        "method": spec.name,
        "run": run,
        "files": {f: FILES[f] for f in formats},
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, *size],
            "dtype": "float32",
            "channels": "RGB",
            "range": [0.0, 1.0],
            "layout": "NCHW",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", dim], "dtype": "float32"},
        "preprocess": steps,
        "size": size,
        "mean": mean,
        "std": std,
        "normalization": "inside the graph: (x - mean) / std per channel, x = RGB / 255",
        "embedding_size": dim,
        "l2_normalized": bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4)),
        "similarity": spec.metric,
        "ranking": _ranking(spec, scale),
        "opset": opset if "onnx" in formats else None,
        "torch": torch.__version__,
        "config": dict(config),
    }
    if scale != 1.0:
        meta["ensemble"] = {"learners": int(scale), "learner_size": dim // int(scale), "divided_by": math.sqrt(scale)}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    try:
        written, checks = [], {}
        if "onnx" in formats:
            data = _export_onnx(graph, inputs[0], tmp / FILES["onnx"], opset, meta)
            written += ([data] if data else []) + [FILES["onnx"]]
            if data:
                meta["files"]["onnx_data"] = data
            if verify:
                checks["onnxruntime"] = _verify_onnx(tmp / FILES["onnx"], inputs, expected)
        if "torchscript" in formats:
            _export_torchscript(graph, inputs[0], tmp / FILES["torchscript"], meta)
            written.append(FILES["torchscript"])
            if verify:
                checks["torchscript"] = _verify_torchscript(tmp / FILES["torchscript"], inputs, expected)
        bad = {k: v for k, v in checks.items() if not v <= atol}
        if bad:
            raise UserError(
                "export check failed, nothing written: max abs difference to PyTorch "
                + ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
                + f" > --atol {atol:g}"
            )
        if verify:
            meta["verification"] = {
                "max_abs_diff": checks,
                "atol": atol,
                "batch_sizes": [2, 1, 3],
                "inputs": "uniform random RGB in [0, 1] at the evaluation size",
            }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        stale = out_dir / f"{FILES['onnx']}.data"
        if "onnx" in formats and "onnx_data" not in meta["files"] and stale.is_file():
            stale.unlink()  # the weights of an earlier, larger export of this folder's graph
        for name in written + [METADATA]:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# ---------------------------------------------------------------- export.py


def export_parser(spec: MethodSpec, add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of every method's ``export.py`` (``test.py``'s run flags; hyphenated aliases)."""
    parser = argparse.ArgumentParser(
        description=f"Export a trained {spec.display} run's embedding network (RGB in "
        "[0, 1] -> retrieval embedding) to ONNX and TorchScript, with a JSON file of "
        "its preprocessing",
        add_help=add_help,
    )
    add_run_flags(parser, spec, "export")
    g = parser.add_argument_group("export")
    add_flag(g, "output", default=None, type=str, help=f"output folder (default: results/{spec.name}/export/<run>/)")
    add_flag(
        g,
        "format",
        nargs="+",
        default=list(FORMATS),
        choices=FORMATS,
        help="formats to write (default: onnx torchscript)",
    )
    add_flag(g, "opset", default=None, type=int, help="ONNX opset (default: the newest the exporter supports)")
    add_flag(
        g,
        "verify",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="check onnxruntime / the reloaded TorchScript module against PyTorch before writing (default: on)",
    )
    add_flag(g, "atol", default=1e-4, type=float, help="largest accepted absolute difference (default: 1e-4)")
    return parser


@dataclass(frozen=True)
class ExportOptions:
    """What ``export.py``'s flags ask for."""

    data_base: Optional[str]
    model_file: Optional[str]
    output: Optional[str]
    formats: Tuple[str, ...]
    opset: Optional[int]
    verify: bool
    atol: float
    original_args: Any = None  # the flags a method's import_original reads

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ExportOptions":
        return cls(
            data_base=args.data_base,
            model_file=args.model_file,
            output=args.output,
            formats=tuple(args.format),
            opset=args.opset,
            verify=args.verify,
            atol=args.atol,
            original_args=args,
        )


def run_export(spec: MethodSpec, args: argparse.Namespace) -> Dict[str, Any]:
    """``export.py``: load the run's model on the CPU, export it, print where the files went."""
    options = ExportOptions.from_args(args)
    run, config, model, _ = load_run(
        spec,
        torch.device("cpu"),
        model_file=options.model_file,
        data_base=options.data_base,
        original_args=options.original_args,
    )
    out = Path(options.output) if options.output else results_dir(spec.name) / "export" / run
    meta = export_model(
        spec,
        model,
        config,
        out,
        run=run,
        formats=list(options.formats),
        opset=options.opset,
        verify=options.verify,
        atol=options.atol,
    )
    h, w = meta["size"]
    print(
        f"{spec.display} {run}: RGB [0, 1] (N, 3, {h}, {w}) -> {meta['embedding_size']}-d embedding; "
        f"rank by {meta['ranking']}"
    )
    for name, diff in meta.get("verification", {}).get("max_abs_diff", {}).items():
        print(f"  {name}: max abs difference to PyTorch {diff:.2e}")
    for name in list(meta["files"].values()) + [METADATA]:
        print(f"  wrote {out / name}")
    return meta
