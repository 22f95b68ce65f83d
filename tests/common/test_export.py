"""ONNX / TorchScript export of every method (common.export + <method>/export.py).

Tiny untrained models built from stored-style configurations (BatchNorm statistics randomised so normalisation
matters), saved as a run's ``<run>_model.pth`` + database like the trainers do, exported through each method's
command, then run on demo images preprocessed by the JSON's rule alone (PIL, independent of torchvision) and
compared with the method's evaluation path (its eval transform + ``spec.embed``) in float32.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from common.data.demo import render
from common.data.normalize import split_preset
from common.database import Split, save_database
from common.errors import UserError, run_cli
from common.export import FILES, METADATA, export_model, preprocessing
from common.runio import atomic_save
from fastretri.transforms import fastretri_transform
from irt.transforms import irt_transform

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is what is tested here
ATOL = 1e-4
RUN_KEYS = {"smoothing": 0.1, "temperature": 0.5, "margin": 0.1, "batch_size": 32}
IRT_RUN = {
    "max_iter": 10,
    "batch_size": 8,
    "lambda_reg": 0.7,
    "margin": 0.5,
    "m": 0,
    "memory_ratio": 1.0,
    "data_name": "demo",
    "crop_type": "uncropped",
    "method": "irt",
}


def _cgd(gd: str, backbone: str = "resnet18", image_size: int = 32) -> dict:
    return {
        "method": "cgd",
        "data_name": "demo",
        "crop_type": "cropped",
        "backbone_type": backbone,
        "gd_config": gd,
        "feature_dim": 48,
        "num_classes": 5,
        "image_size": image_size,
        **RUN_KEYS,
    }


def _reir(share_type: str, model_type: str) -> dict:
    return {
        "method": "reir",
        "data_name": "demo",
        "crop_type": "uncropped",
        "label_type": "fixed",
        "with_random": True,
        "share_type": share_type,
        "model_type": model_type,
        "ensemble_size": 3,
        "meta_class_size": 4,
        "image_size": 32,
    }


def _fastretri(*opts: str) -> dict:
    from fastretri.config import config_dict, load_config

    cfg = load_config("fastretri/configs/demo.yml", opts)
    return {**config_dict(cfg), "num_classes": 5, "method": "fastretri"}


CASES = {
    "cgd-S": ("cgd", lambda: _cgd("S")),
    "cgd-M": ("cgd", lambda: _cgd("M")),
    "cgd-G": ("cgd", lambda: _cgd("G")),
    "cgd-SMG": ("cgd", lambda: _cgd("SMG")),
    "cgd-timm-vit": ("cgd", lambda: _cgd("SMG", "timm:vit_tiny_patch16_224", 48)),
    "cgd-timm-convnext": ("cgd", lambda: _cgd("SG", "timm:convnext_atto", 64)),
    "reir": ("reir", lambda: _reir("layer3", "resnet18")),
    "sreml": (
        "sreml",
        lambda: {
            "method": "sreml",
            "data_name": "demo",
            "crop_type": "uncropped",
            "label_type": "random",
            "with_random": False,
            "share_type": "layer1",
            "model_type": "resnet18",
            "ensemble_size": 2,
            "meta_class_size": 4,
            "image_size": 32,
        },
    ),
    "irt-vit": (
        "irt",
        lambda: {
            **IRT_RUN,
            "model": "vit_tiny_patch16_224",
            "input_size": 32,
            "model_kwargs": ["patch_size=8", "depth=2", "embed_dim=64", "num_heads=2"],
            "distilled_embedding": "mean",
        },
    ),
    "irt-deit-distilled": (
        "irt",
        lambda: {
            **IRT_RUN,
            "model": "deit_tiny_distilled_patch16_224",
            "input_size": 48,
            "model_kwargs": ["depth=2", "embed_dim=64", "num_heads=2"],
            "distilled_embedding": "mean",
        },
    ),
    "reir-timm": ("reir", lambda: _reir("layer4", "timm:resnet10t")),
    "fastretri": ("fastretri", _fastretri),
    "fastretri-timm-vit": ("fastretri", lambda: _fastretri("MODEL.BACKBONE.NAME", "timm:vit_tiny_patch16_224")),
}


def _spec(method: str):
    return importlib.import_module(f"{method}.spec").SPEC


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking BatchNorm statistics and affine parameters (a fresh model has mean 0, var 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            if m.affine:
                m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


def _save_run(spec, config: dict, root: Path) -> tuple:
    """Model built from ``config``, saved as ``<run>_model.pth`` + ``<run>_data_base.pth`` like the trainers."""
    torch.manual_seed(0)
    model = spec.build_model(config).eval()
    _randomise_batchnorm(model)
    run = spec.run_name(config)
    folder = root / spec.name
    atomic_save({"model": model.state_dict(), "config": config, "epoch": 1}, folder / f"{run}_model.pth")
    dim = config.get("feature_dim", 8)  # a CGD database holds feature_dim columns (checked at load)
    save_database(
        folder / f"{run}_data_base.pth",
        config=config,
        method=spec.name,
        metric=spec.metric,
        scale=spec.scale(config),
        splits={"test": Split(["a.jpg", "b.jpg"], [0, 1], torch.zeros(2, dim))},
    )
    return model, run, folder


def _demo_images() -> list:
    """Three demo images: portrait, landscape, square (exercises shorter-side resizes and centre crops)."""
    rng = np.random.default_rng(7)
    a, _ = render("star", "hstripes", rng, 80)
    b, _ = render("circle", "checker", rng, 80)
    c, _ = render("cross", "dots", rng, 80)
    return [Image.fromarray(a[:, 10:70]), Image.fromarray(b[5:65, :]), Image.fromarray(c)]


def _from_json(img: Image.Image, meta: dict) -> np.ndarray:
    """The JSON's preprocessing with PIL only (what a deployment without torchvision does): (3, H, W) in [0, 1]."""
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    for step in meta["preprocess"]:
        w, h = img.size
        if step["op"] == "resize" and step["mode"] == "exact":
            th, tw = step["size"]
        elif step["op"] == "resize":
            s = step["size"]
            th, tw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if step["op"] == "resize":
            img = img.resize((tw, th), resample[step["interpolation"]])
        else:
            th, tw = step["size"]
            top, left = int(round((h - th) / 2)), int(round((w - tw) / 2))
            img = img.crop((left, top, left + tw, top + th))
    x = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    assert list(x.shape[:2]) == meta["size"]
    return x.transpose(2, 0, 1)


def _reference(spec, model: nn.Module, config: dict, images: list) -> torch.Tensor:
    """The evaluation path: the method's eval transform (torchvision) and ``spec.embed``."""
    transform = spec.eval_transform(config)
    with torch.no_grad():
        return spec.embed(model, torch.stack([transform(img) for img in images]))


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trip(case, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path))
    method, make_config = CASES[case]
    spec, config = _spec(method), make_config()
    model, run, folder = _save_run(spec, config, tmp_path)
    command = importlib.import_module(f"{method}.export")
    command.main(command.get_args_parser().parse_args(["--data_base", str(folder / f"{run}_data_base.pth")]))

    out = tmp_path / method / "export" / run
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES.values(), METADATA])  # no temp files left
    meta = json.loads((out / METADATA).read_text())
    images = _demo_images()
    reference = _reference(spec, model, config, images)
    scale = float(spec.scale(config))
    assert meta["method"] == method and meta["run"] == run and meta["similarity"] == spec.metric
    assert meta["config"] == json.loads(json.dumps(config))
    assert meta["embedding_size"] == reference.shape[1] and meta["output"]["shape"] == ["batch", reference.shape[1]]
    assert meta["input"]["shape"] == ["batch", 3, *meta["size"]] and meta["l2_normalized"] is True
    transform = spec.eval_transform(config)
    assert meta["mean"] == pytest.approx(list(transform.transforms[-1].mean))
    assert meta["std"] == pytest.approx(list(transform.transforms[-1].std))
    assert max(meta["verification"]["max_abs_diff"].values()) <= ATOL

    batch = np.stack([_from_json(img, meta) for img in images])
    expected = reference / math.sqrt(scale)
    session = ort.InferenceSession(str(out / FILES["onnx"]), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(out / FILES["torchscript"]))
    for n in (1, 3):  # the dynamic batch axis
        onnx_out = session.run(None, {"images": batch[:n]})[0]
        assert onnx_out.shape == (n, meta["embedding_size"])
        assert np.abs(onnx_out - expected[:n].numpy()).max() <= ATOL
        with torch.no_grad():
            ts_out = scripted(torch.from_numpy(batch[:n]))
        assert (ts_out - expected[:n]).abs().max() <= ATOL
    assert np.linalg.norm(onnx_out, axis=1) == pytest.approx(1.0, abs=1e-5)

    if scale != 1.0:  # REIR / SREML: inner product of exported embeddings = mean per-learner cosine of raw logits
        assert meta["ensemble"]["learners"] == config["ensemble_size"] == scale
        with torch.no_grad():
            x = torch.stack([transform(img) for img in images])
            unit = F.normalize(model(x), dim=-1)  # [B, E, M]
        mean_cosine = torch.einsum("aem,bem->ab", unit, unit) / config["ensemble_size"]
        assert np.abs(onnx_out @ onnx_out.T - mean_cosine.numpy()).max() <= ATOL


@pytest.fixture(scope="module")
def cgd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    spec, config = _spec("cgd"), _cgd("S")
    model, run, folder = _save_run(spec, config, root)
    return spec, config, model, folder / f"{run}_model.pth"


def _cli(argv, capsys):
    import cgd.export as command

    with pytest.raises(SystemExit) as e:
        run_cli(command.main, command.get_args_parser().parse_args(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_model_file_is_one_line(tmp_path, capsys):
    err = _cli(["--model_file", str(tmp_path / "none_model.pth"), "--output", str(tmp_path / "out")], capsys)
    assert "not found" in err and "none_model.pth" in err
    err = _cli(["--data_base", str(tmp_path / "none_data_base.pth")], capsys)
    assert "not found" in err
    assert not (tmp_path / "out").exists()


def test_missing_onnx_is_one_line_and_torchscript_still_exports(cgd_run, tmp_path, monkeypatch, capsys):
    _, _, model, path = cgd_run
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    err = _cli(["--model_file", str(path), "--output", str(tmp_path / "a")], capsys)
    assert "onnx" in err and "pip install -e .[export]" in err
    import cgd.export as command

    meta = command.main(
        command.get_args_parser().parse_args(
            ["--model_file", str(path), "--output", str(tmp_path / "b"), "--format", "torchscript"]
        )
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted([FILES["torchscript"], METADATA])
    assert meta["opset"] is None and meta["verification"]["max_abs_diff"]["torchscript"] <= ATOL
    scripted = torch.jit.load(str(tmp_path / "b" / FILES["torchscript"]), _extra_files={METADATA: ""})
    x = torch.rand(2, 3, *meta["size"])
    with torch.no_grad():
        mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
        assert (scripted(x) - model((x - mean) / std)[0]).abs().max() <= ATOL


def test_failed_check_writes_nothing(cgd_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _, _, _, path = cgd_run
    err = _cli(["--model_file", str(path), "--output", str(tmp_path / "out"), "--atol", "-1"], capsys)
    assert "nothing written" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_weights_written_apart_are_gathered_into_one_data_file(cgd_run, tmp_path):
    """Above 2 GiB torch writes one file per tensor next to the graph; the export gathers them into one file."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from common.export import _gather_external_data

    spec, config, model, _ = cgd_run
    meta = export_model(spec, model, config, tmp_path / "inline", formats=["onnx"], verify=False)
    apart = tmp_path / "apart"
    apart.mkdir()
    onnx.save_model(
        onnx.load(str(tmp_path / "inline" / FILES["onnx"])),
        str(apart / "raw.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(apart.iterdir())) > 10  # torch's layout: one file per tensor
    proto = onnx.load(str(apart / "raw.onnx"), load_external_data=False)
    out = tmp_path / "out"
    out.mkdir()
    assert _gather_external_data(proto, apart, out / "embedding.onnx.data") == "embedding.onnx.data"
    onnx.save_model(proto, str(out / FILES["onnx"]))
    onnx.checker.check_model(str(out / FILES["onnx"]))
    assert (out / FILES["onnx"]).stat().st_size < 100_000 < (out / "embedding.onnx.data").stat().st_size
    x = torch.rand(3, 3, *meta["size"]).numpy()
    inline = ort.InferenceSession(str(tmp_path / "inline" / FILES["onnx"]), providers=["CPUExecutionProvider"])
    gathered = ort.InferenceSession(str(out / FILES["onnx"]), providers=["CPUExecutionProvider"])
    assert np.array_equal(inline.run(None, {"images": x})[0], gathered.run(None, {"images": x})[0])


@pytest.mark.parametrize("ending", ["fused", "two ops"])
def test_preprocessing_reads_the_eval_transform(ending):
    transform = irt_transform(False, 48)
    if ending == "two ops":  # the preset as the papers write it: ToTensor -> Normalize
        ops, mean, std = split_preset(transform)
        transform = T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])
    steps, size, mean, std = preprocessing(transform)
    assert steps == [
        {
            "op": "resize",
            "mode": "shorter_side",
            "size": round(48 * 256 / 224),
            "interpolation": "bicubic",
            "antialias": True,
            "max_size": None,
        },
        {"op": "center_crop", "size": [48, 48]},
    ]
    assert size == [48, 48] and mean == pytest.approx([0.485, 0.456, 0.406])
    steps, size, _, _ = preprocessing(fastretri_transform(False, resize=[40, 30], crop=False))
    assert steps[0]["mode"] == "exact" and steps[0]["size"] == [40, 30] and size == [40, 30]
    with pytest.raises(UserError, match="varying size"):
        preprocessing(fastretri_transform(False, resize=[36], crop=False))
    with pytest.raises(UserError, match="RandomHorizontalFlip"):
        preprocessing(fastretri_transform(True, resize=[36, 36], crop=False))
