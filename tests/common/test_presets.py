import pytest
import torch
from PIL import Image

from common.presets import DATASET_STATS, build_transform
from reir.spec import SPEC as REIR_SPEC
from sreml.spec import SPEC as SREML_SPEC

SPECS = {"reir": REIR_SPEC, "sreml": SREML_SPEC}  # presets reached through the method's spec


def preset(method, train, data_name="car", crop_type="uncropped", image_size=None):
    if method in SPECS:
        config = {"data_name": data_name, "crop_type": crop_type, "image_size": image_size}
        return SPECS[method].transform(config, train)
    return build_transform(method, train, data_name, crop_type, image_size)


@pytest.mark.parametrize(
    "method,train,image_size,expected",
    [
        ("cgd", True, None, (224, 224)),
        ("cgd", False, None, (224, 224)),
        ("cgd", True, 64, (64, 64)),
        ("reir", True, None, (256, 256)),
        ("reir", False, None, (256, 256)),
        ("reir", False, 32, (32, 32)),
        ("sreml", True, None, (256, 256)),
        ("irt", True, None, (224, 224)),
        ("irt", False, 32, (32, 32)),
    ],
)
def test_output_sizes(method, train, image_size, expected):
    img = Image.new("RGB", (300, 200), (120, 60, 30))
    out = preset(method, train, "cub", "uncropped", image_size)(img)
    assert tuple(out.shape) == (3, *expected)


def test_cgd_resize_is_not_aspect_preserving_and_reir_uses_dataset_stats():
    t = build_transform("cgd", False)
    sizes = [op.size for op in t.transforms if op.__class__.__name__ == "Resize"]
    assert sizes == [(224, 224)]
    r = preset("reir", False, "car")
    norm = r.transforms[-1]
    assert tuple(norm.mean) == DATASET_STATS["car"][0]
    flat = preset("reir", False, "car")(Image.new("RGB", (256, 256), (0, 0, 0)))
    assert torch.allclose(flat[0], torch.full_like(flat[0], -0.4853 / 0.2237), atol=1e-4)
