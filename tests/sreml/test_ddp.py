"""SREML (REIR's setting) under torchrun: 2 gloo processes train what 1 process trains (float64, no augmentation),
on In-shop-like data (query and gallery splits), in global batches of 7 (slices of 4 and 3 images; the last batch
of 2 split 1 and 1)."""

import torch

from reir.model import Model
from tests.ddp import assert_two_processes_equal_one
from tests.tiny import make_tiny_processed, tiny_args

RUN = "isc_uncropped_resnet18"


def test_two_processes_equal_one(tmp_path):
    data = make_tiny_processed(tmp_path / "data", "isc", num_classes=8, per_class=4, size=32)
    options = "--image_size 48 --batch_size 7 --num_epochs 1 --ensemble_size 2 --meta_class_size 2"
    args = tiny_args(data, "isc", f"{options} --recalls 1,2 --lr 1e-3 --gpu_ids '' --float64 --no-augment")
    two = assert_two_processes_equal_one("sreml", args, tmp_path, RUN, lambda: Model("resnet18", "layer1", 2, 2))
    db = torch.load(two / f"{RUN}_data_base.pth", weights_only=True)
    assert set(db["splits"]) == {"train", "query", "gallery"} and db["config"]["share_type"] == "layer1"
