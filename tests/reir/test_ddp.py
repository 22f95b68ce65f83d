"""REIR under torchrun: 2 gloo processes train exactly what 1 process trains (float64, no augmentation).

16 training images in batches of 5: slices of 2 and 3 images (the loss rescaling) and a last global batch of 1
image, so one rank trains on an empty slice; ``--with_random`` draws the branch weights on every rank alike."""

from reir.model import Model
from tests.ddp import assert_two_processes_equal_one
from tests.tiny import make_tiny_processed, tiny_args

RUN = "cub_uncropped_fixed_random_layer1_resnet18_2_2"


def test_two_processes_equal_one(tmp_path):
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=4, size=40)
    options = "--image_size 48 --batch_size 5 --num_epochs 1 --ensemble_size 2 --meta_class_size 2 --with_random"
    args = tiny_args(data, "cub", f"{options} --recalls 2,4 --lr 1e-3 --gpu_ids '' --float64 --no-augment")
    # --recalls 2,4 (no R@1): the model and database are still written, selected on R@2
    model = lambda: Model("resnet18", "layer1", 2, 2, with_random=True)
    assert_two_processes_equal_one("reir", args, tmp_path, RUN, model)
