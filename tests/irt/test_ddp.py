"""IRT under torchrun: 2 gloo processes train exactly what 1 process trains (float64), with the contrastive loss,
KoLeo and the XBM memory on the global batch, a momentum key encoder, and augmentation ON (crops are seeded by the
global position of a sample in its batch, so both runs see the same crops)."""

from irt.spec import model_from_config
from tests.ddp import assert_two_processes_equal_one
from tests.tiny import make_tiny_processed

RUN = "cub_uncropped_vit_tiny_patch16_224-patch_size8-depth1_32_4_8_0.7_0.5_2_0.5_0.9"


def test_two_processes_equal_one(tmp_path):
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=6, size=40)
    args = [
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        "patch_size=8",
        "depth=1",
        "--input-size",
        "32",
        "--pretrained",
        "none",
        "--drop-path",
        "0",
        "--dataset",
        "cub",
        "--data-path",
        str(data),
        "--max-iter",
        "4",
        "--eval-freq",
        "2",
        "--batch-size",
        "8",
        "--m_per_class",
        "2",
        "--memory-ratio",
        "0.5",
        "--encoder-momentum",
        "0.9",
        "--lr",
        "1e-3",
        "--num-workers",
        "0",
        "--rank",
        "2",
        "4",
        "--float64",
    ]
    config = {
        "model": "vit_tiny_patch16_224",
        "model_kwargs": ["patch_size=8", "depth=1"],
        "input_size": 32,
        "drop_path": 0.0,
    }
    assert_two_processes_equal_one("irt", args, tmp_path, RUN, lambda: model_from_config(config))
