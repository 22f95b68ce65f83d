"""CGD under torchrun: 2 gloo processes train exactly what 1 process trains (float64, no augmentation)."""

import torch

from cgd.model import Model
from tests.ddp import compare_runs, run_script
from tests.tiny import make_tiny_processed

RUN = "cub_uncropped_resnet18_SG_64_0.1_0.5_0.1_16"


def test_two_processes_equal_one(tmp_path):
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=8, size=32)
    args = [
        "--data_path",
        str(data),
        "--data_name",
        "cub",
        "--backbone_type",
        "resnet18",
        "--pretrained",
        "none",
        "--no-freeze_bn",
        "--image_size",
        "32",
        "--batch_size",
        "16",
        "--num_epochs",
        "2",
        "--num_workers",
        "0",
        "--feature_dim",
        "64",
        "--recalls",
        "2,4",
        "--lr",
        "1e-3",
        "--float64",
        "--no-augment",
    ]
    for n in (1, 2):
        run_script("cgd/train.py", args, tmp_path / f"p{n}", nproc=n)
    torch.manual_seed(0)
    initial = Model("resnet18", "SG", 64, 4).double().state_dict()
    # --recalls 2,4 (no R@1): the model and database are still written, selected on R@2
    compare_runs(tmp_path / "p1" / "cgd", tmp_path / "p2" / "cgd", RUN, initial)
