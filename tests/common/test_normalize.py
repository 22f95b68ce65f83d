"""The input pipeline the methods run: ``open_image`` + a preset ending with the fused ToTensor/Normalize pass
(common/data/normalize.py), bit-identical to the two torchvision ops; JPEG draft sizes by libjpeg's rule."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common.data.images import open_image
from common.data.normalize import ToNormalizedTensor, split_preset
from common.presets import build_transform
from fastretri.transforms import preset_transform

PRESETS = [(m, train) for m in ("cgd", "reir", "sreml", "irt", "fastretri") for train in (True, False)]


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Gradient + a bright square + noise: smooth areas and edges, like a photo."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / w, 255 * y / h, 128 + 60 * np.sin(x / 7)], axis=-1)
    img[h // 4 : h // 2, w // 3 : w // 2] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_jpegs(root) -> list:
    """Three photo-like JPEGs of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(150, 110), (97, 131), (160, 120)]):
        path = root / f"img{i}.jpg"
        photo(rng, w, h).save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return write_jpegs(tmp_path_factory.mktemp("jpegs"))


def preset(method, train, image_size=48):
    if method == "fastretri":
        return preset_transform(train, "cub", image_size)
    return build_transform(method, train, "cub", "uncropped", image_size)


@pytest.mark.parametrize("method,train", PRESETS)
def test_presets_end_with_the_fused_pass_bit_identical_to_totensor_normalize(jpegs, method, train):
    fast = preset(method, train)
    assert isinstance(fast.transforms[-1], ToNormalizedTensor)
    ops, mean, std = split_preset(fast)
    written = T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])  # the preset as the papers write it
    for i, path in enumerate(jpegs):
        torch.manual_seed(i)
        ref = written(Image.open(path).convert("RGB"))
        torch.manual_seed(i)
        assert torch.equal(fast(open_image(path)), ref)


def test_fused_normalisation_equals_totensor_normalize_for_every_input_kind():
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.7)
    ref = TF.normalize(TF.to_tensor(rgb), mean, std)
    assert torch.equal(ToNormalizedTensor(mean, std)(rgb), ref)
    assert torch.equal(ToNormalizedTensor(mean, std)(TF.pil_to_tensor(rgb)), ref)
    assert torch.equal(ToNormalizedTensor((0.3,), (0.6,))(gray), TF.normalize(TF.to_tensor(gray), (0.3,), (0.6,)))
    rgba = rgb.convert("RGBA")  # other modes: the torchvision ops themselves
    four = ((0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.5, 0.5))
    assert torch.equal(ToNormalizedTensor(*four)(rgba), TF.normalize(TF.to_tensor(rgba), *four))


def test_split_preset_reads_both_endings_and_refuses_others():
    fused = preset("irt", False)
    ops, mean, std = split_preset(fused)
    assert ops == fused.transforms[:-1] and (mean, std) == (fused.transforms[-1].mean, fused.transforms[-1].std)
    written = T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])
    assert split_preset(written) == (ops, mean, std)
    with pytest.raises(ValueError, match="ToTensor -> Normalize"):
        split_preset(T.Compose(ops + [T.ToTensor()]))


def test_open_image_returns_the_rgb_decode_and_drafts_only_when_asked(jpegs, tmp_path):
    for path in jpegs:
        img = open_image(path)
        assert img.mode == "RGB" and np.array_equal(np.array(img), np.array(Image.open(path).convert("RGB")))
        assert np.array_equal(np.array(img.resize((20, 20))), np.array(img.resize((20, 20))))  # still usable
    path = tmp_path / "big.jpg"
    photo(np.random.default_rng(2), 403, 301).save(path, quality=90)
    # libjpeg scales by the largest of 8, 4, 2, 1 not above min(W // w, H // h); the size rounds up
    for target, factor in [((200, 150), 2), ((100, 60), 4), ((50, 37), 8), ((210, 100), 1), ((20, 20), 8)]:
        img = open_image(str(path), draft=target)
        assert img.size == (-(-403 // factor), -(-301 // factor))
        assert img.size[0] >= target[0] and img.size[1] >= target[1]
    assert open_image(str(path)).size == (403, 301)


def test_presets_pickle_for_loader_workers():
    t = preset("fastretri", True)
    torch.manual_seed(0)
    a = t(Image.new("RGB", (60, 50), (10, 200, 30)))
    torch.manual_seed(0)
    assert torch.equal(pickle.loads(pickle.dumps(t))(Image.new("RGB", (60, 50), (10, 200, 30))), a)
