"""CGD under torchrun: 2 gloo processes train exactly what 1 process trains (float64, no augmentation)."""

from cgd.model import Model
from tests.ddp import assert_two_processes_equal_one
from tests.tiny import make_tiny_processed, tiny_args

RUN = "cub_uncropped_resnet18_SG_64_0.1_0.5_0.1_16"


def test_two_processes_equal_one(tmp_path):
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=8, size=32)
    options = "--backbone_type resnet18 --no-freeze_bn --image_size 32 --batch_size 16 --num_epochs 2 --feature_dim 64"
    args = tiny_args(data, "cub", f"{options} --recalls 2,4 --lr 1e-3 --float64 --no-augment")
    # --recalls 2,4 (no R@1): the model and database are still written, selected on R@2
    assert_two_processes_equal_one("cgd", args, tmp_path, RUN, lambda: Model("resnet18", "SG", 64, 4))
