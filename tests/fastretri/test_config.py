import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from common.errors import UserError
from fastretri.config import flatten, load_config
from fastretri.data import build_transforms

CONFIGS = Path(__file__).resolve().parents[2] / "fastretri" / "configs"


@pytest.mark.parametrize(
    "name, epochs, lr, eta, momentum, nesterov, eps, size, ratio, cj, recalls",
    [
        ("cub", 30, 0.02, 2e-5, 0.0, False, 0.3, [256], [0.75, 1.33333], [0.25, 0.25, 0.25, 0.0], [1, 2, 4, 8, 16, 32]),
        ("cars", 100, 0.05, 5e-4, 0.0, False, 0.4, [256, 256], [1.0, 1.0], [0.3, 0.3, 0.3, 0.1], [1, 2, 4, 8, 16, 32]),
        ("sop", 100, 0.003, 3e-5, 0.99, True, 0.1, [256, 256], [0.75, 1.33333], None, [1, 10, 100, 1000]),
        ("inshop", 100, 0.003, 3e-5, 0.99, True, 0.1, [0], [0.75, 1.33333], None, [1, 10, 20, 30, 40, 50]),
    ],
)
def test_dataset_configs_match_fastretri(name, epochs, lr, eta, momentum, nesterov, eps, size, ratio, cj, recalls):
    c = flatten(load_config(CONFIGS / f"{name}.yml"))
    assert (c["SOLVER.MAX_EPOCH"], c["SOLVER.BASE_LR"], c["SOLVER.ETA_MIN_LR"]) == (epochs, lr, eta)
    assert (c["SOLVER.MOMENTUM"], c["SOLVER.NESTEROV"], c["MODEL.LOSSES.CE.EPSILON"]) == (momentum, nesterov, eps)
    assert c["INPUT.SIZE_TRAIN"] == size and c["INPUT.CROP.RATIO"] == ratio and c["TEST.RECALLS"] == recalls
    assert c["INPUT.CJ.ENABLED"] == (cj is not None)
    if cj:
        assert [c[f"INPUT.CJ.{k}"] for k in ("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE")] == cj
    # inherited from base.yml
    assert c["SOLVER.IMS_PER_BATCH"] == 128 and c["SOLVER.WARMUP_ITERS"] == 1000 and c["SOLVER.WEIGHT_DECAY"] == 5e-4
    assert c["SOLVER.CLIP_GRADIENTS.CLIP_VALUE"] == 5.0 and c["MODEL.BACKBONE.NORM"] == "FrozenBN"
    assert c["INPUT.CROP.SCALE"] == [0.16, 1.0] and c["MODEL.BACKBONE.LAST_STRIDE"] == 1


def test_overrides_are_coerced():
    c = load_config(
        CONFIGS / "cub.yml",
        ["SOLVER.BASE_LR", "1", "TEST.RECALLS", "[1,5]", "SOLVER.AMP.ENABLED", "False", "INPUT.SIZE_TEST", "300"],
    )
    assert c["SOLVER"]["BASE_LR"] == 1.0 and isinstance(c["SOLVER"]["BASE_LR"], float)
    assert c["TEST"]["RECALLS"] == [1, 5] and c["SOLVER"]["AMP"]["ENABLED"] is False
    assert c["INPUT"]["SIZE_TEST"] == [300]


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.BASE_LRR", "0.1"], "unknown config key SOLVER.BASE_LRR"),
        (["SOLVER.MAX_EPOCH", "abc"], "SOLVER.MAX_EPOCH expects int"),
        (["SOLVER.MAX_EPOCH"], "KEY VALUE pairs"),
        (["SOLVER", "1"], "is a group"),
    ],
)
def test_bad_overrides(opts, message):
    with pytest.raises(UserError, match=message):
        load_config(CONFIGS / "cub.yml", opts)


def test_unknown_key_in_yaml(tmp_path):
    (tmp_path / "bad.yml").write_text(f"_BASE_: {CONFIGS / 'cub.yml'}\nSOLVER:\n  LR: 1\n")
    with pytest.raises(UserError, match=r"unknown config key SOLVER.LR \(in .*bad.yml\)"):
        load_config(tmp_path / "bad.yml")


def test_cli_unknown_key_is_one_line_error():
    proc = subprocess.run(
        [sys.executable, "fastretri/train.py", "--config-file", str(CONFIGS / "cub.yml"), "SOLVER.NOPE", "1"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key SOLVER.NOPE (command line)"


# the names fast-reid's FastRetri registers (projects/FastRetri/fastretri/datasets.py) and its configs use
@pytest.mark.parametrize(
    "name, data",
    [
        ("Cars196", "car"),
        ("CUB", "cub"),
        ("SOP", "sop"),
        ("InShop", "isc"),
        ("Cars", "car"),
        ("car", "car"),
        ("isc", "isc"),
        ("demo", "demo"),
    ],
)
def test_fastreid_dataset_names(name, data):
    from fastretri.config import data_name

    assert data_name(load_config(CONFIGS / "cub.yml", ["DATASETS.NAMES", f"[{name}]"])) == data
    # fast-reid writes tuples (yacs evaluates the string YAML reads): NAMES: ("Cars196",) in a file or on the CLI
    assert data_name(load_config(CONFIGS / "cub.yml", ["DATASETS.NAMES", f'("{name}",)'])) == data


def test_fastreid_tuple_syntax_in_a_yaml_file(tmp_path):
    (tmp_path / "c.yml").write_text(
        f'_BASE_: {CONFIGS / "base.yml"}\nDATASETS:\n  NAMES: ("Cars196",)\n'
        'MODEL:\n  LOSSES:\n    NAME: ("CrossEntropyLoss",)\n'
    )
    c = load_config(tmp_path / "c.yml")
    assert c["DATASETS"]["NAMES"] == ["Cars196"] and c["MODEL"]["LOSSES"]["NAME"] == ["CrossEntropyLoss"]
    assert load_config(CONFIGS / "cars.yml")["DATASETS"]["NAMES"] == ["Cars196"]


def test_unprocessed_dataset_name_is_one_line(tmp_path):
    """A name that is neither fast-reid's nor processed by data_utils.py fails in one line naming the command."""
    from fastretri.config import data_name
    from fastretri.data import build_datasets

    cfg = load_config(CONFIGS / "cub.yml", ["DATASETS.NAMES", "[Market1501]", "DATASETS.ROOT", str(tmp_path)])
    assert data_name(cfg) == "Market1501"  # a custom dataset's name is accepted ...
    with pytest.raises(UserError, match="data_utils.py") as e:  # ... and must have been processed
        build_datasets(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="one dataset"):
        data_name(load_config(CONFIGS / "cub.yml", ["DATASETS.NAMES", "[CUB, SOP]"]))
    with pytest.raises(UserError, match="expects a list"):
        load_config(CONFIGS / "cub.yml", ["DATASETS.NAMES", "(Cars196"])


def test_demo_config_values():
    """README's demo line is written from these values."""
    c = flatten(load_config(CONFIGS / "demo.yml"))
    assert (c["INPUT.CROP.SIZE"], c["INPUT.SIZE_TRAIN"], c["SOLVER.MAX_EPOCH"], c["SOLVER.WARMUP_ITERS"]) == (
        [32],
        [36],
        15,
        30,
    )
    assert (c["SOLVER.BASE_LR"], c["SOLVER.MOMENTUM"], c["SOLVER.IMS_PER_BATCH"], c["MODEL.BACKBONE.NORM"]) == (
        0.01,
        0.9,
        32,
        "BN",
    )


# ---- RandomResizedCrop with fast-reid's ratio ----

FASTREID_RATIO = (0.75, 1.33333)  # projects/FastRetri/configs/base-image_retri.yml INPUT.CROP.RATIO


def _restated_crop(height, width, scale, ratio):
    """torchvision ``RandomResizedCrop.get_params`` (fast-reid's crop), re-stated: up to 10 draws of an area
    fraction and a log-uniform aspect ratio until the box fits, then a uniform position; else a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    w, h = width, height
    if width / height < min(ratio):
        h = int(round(w / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(h * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("name, size", [("base", (256, 256)), ("cub", (256, 341)), ("sop", (256, 256))])
def test_crop_draws_equal_fastreids(name, size):
    """Under the same seed, every training crop box equals the one fast-reid's ratio [0.75, 1.33333] gives."""
    crop = next(
        op
        for op in build_transforms(load_config(CONFIGS / f"{name}.yml"))[0].transforms
        if isinstance(op, T.RandomResizedCrop)
    )
    image = Image.new("RGB", (size[1], size[0]))
    differ_old = 0
    for seed in range(300):
        torch.manual_seed(seed)
        ours = crop.get_params(image, crop.scale, crop.ratio)
        torch.manual_seed(seed)
        assert ours == _restated_crop(*size, (0.16, 1.0), FASTREID_RATIO), seed
        torch.manual_seed(seed)
        differ_old += ours != _restated_crop(*size, (0.16, 1.0), (0.75, 1.33))
    assert differ_old > 0  # the comparison sees the ratio: [0.75, 1.33] draws other boxes
