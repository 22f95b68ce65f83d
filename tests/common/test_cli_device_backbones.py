import argparse
import os

import pytest
import torch

from common.backbones import build_resnet
from common.cli import common_parser, parse_recalls, validate_args
from common.device import autocast, group_sizes, parse_gpu_ids
from common.errors import UserError


def test_recalls_parse_and_reject():
    assert parse_recalls("1,2,4,8") == [1, 2, 4, 8]
    for bad in ("1,x", "0,1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_recalls(bad)


def test_bad_combinations_are_one_line_errors():
    args = common_parser().parse_args(["--data_name", "sop", "--crop_type", "cropped"])
    with pytest.raises(UserError, match="only car, cub, demo"):
        validate_args(args)
    args = common_parser().parse_args(["--data_name", "cub", "--recalls", "1,100"])
    with pytest.raises(UserError, match="--recalls 100 is larger than the gallery"):
        validate_args(args, gallery_size=50)
    validate_args(args, gallery_size=101)


def test_group_sizes_are_balanced_and_contiguous():
    assert group_sizes(10, 3) == [4, 3, 3]
    assert group_sizes(48, 3) == [16, 16, 16]
    assert group_sizes(4, 1) == [4]
    assert group_sizes(2, 3) == [1, 1, 0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_fallback_and_cpu_autocast():
    assert parse_gpu_ids(None) == [] and parse_gpu_ids("0,1") == []
    with autocast(torch.device("cpu"), True):  # mixed precision works on CPU too
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), False):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_backbone_from_local_state_dict(tmp_path):
    torch.manual_seed(0)
    src = build_resnet("resnet18", "none")
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    loaded = build_resnet("resnet18", str(tmp_path / "r18.pth"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(UserError, match="does not fit resnet34"):
        build_resnet("resnet34", str(tmp_path / "r18.pth"))
    with pytest.raises(UserError, match="no such file"):
        build_resnet("resnet18", str(tmp_path / "missing.pth"))


def test_offline_imagenet_points_to_path_and_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="--pretrained PATH .* --pretrained none") as refused:
        build_resnet("resnet18", "imagenet")
    assert "ResNet18_Weights.IMAGENET1K_V1" in str(refused.value)
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in str(refused.value)  # the cache looked in
