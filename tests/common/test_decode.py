"""Input pipeline modes (common/decode.py) against the presets as written: ``fast`` bit-identical, ``tensor`` within
a grey level with the same random draws, JPEG draft sizes by libjpeg's rule, and the batch (GPU-side) path on CPU."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from common.datasets import RetrievalDataset, open_image
from common.decode import (
    EncodedImages,
    GpuAugment,
    TensorPipeline,
    ToNormalizedTensor,
    accelerate,
    collate_encoded,
    draft_size,
)
from common.errors import UserError
from common.presets import build_transform, fastretri_transform

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec; it still works (and is what is tested)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
PRESETS = [(m, train) for m in ("cgd", "reir", "sreml", "irt", "fastretri") for train in (True, False)]


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Gradient + a bright square + noise: smooth areas and edges, like a photo."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / w, 255 * y / h, 128 + 60 * np.sin(x / 7)], axis=-1)
    img[h // 4 : h // 2, w // 3 : w // 2] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(150, 110), (97, 131), (160, 120)]):
        path = root / f"img{i}.jpg"
        _photo(rng, w, h).save(path, quality=90)
        paths.append(str(path))
    return paths


def _preset(method, train, image_size=48):
    return build_transform(method, train, "cub", "uncropped", image_size)


@pytest.mark.parametrize("method,train", PRESETS)
def test_fast_mode_is_bit_identical_to_the_preset(jpegs, method, train):
    preset = _preset(method, train)
    fast = accelerate(preset, "fast")
    assert isinstance(fast.transforms[-1], ToNormalizedTensor)
    for i, path in enumerate(jpegs):
        torch.manual_seed(i)
        ref = preset(Image.open(path).convert("RGB"))
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


@pytest.mark.parametrize("method,train", PRESETS)
def test_tensor_mode_draws_the_same_crops_and_stays_within_resize_rounding(jpegs, method, train):
    preset = _preset(method, train)
    tensor = accelerate(preset, "tensor")
    scale = torch.tensor(preset.transforms[-1].std).view(3, 1, 1) * 255
    for i, path in enumerate(jpegs):
        torch.manual_seed(i)
        ref = preset(open_image(path))
        torch.manual_seed(i)
        got = tensor(open_image(path))
        levels = ((got - ref) * scale).abs()
        # one antialiased resize: fixed-point rounding of the uint8 kernels differs by at most one grey level;
        # FastRetri's training preset resizes twice (bicubic Resize, then RandomResizedCrop, which may upscale)
        # (a different crop or flip would differ by tens of levels on average)
        most, mean = (8, 0.5) if method == "fastretri" and train else (1 + 1e-3, 0.1)
        assert got.shape == ref.shape and levels.max() <= most and levels.mean() < mean


def test_tensor_mode_color_jitter_uses_the_presets_random_factors(jpegs):
    preset = fastretri_transform(True, [40], crop_size=32, jitter=(0.3, 0.3, 0.3, 0.1), jitter_prob=1.0)
    tensor = TensorPipeline(preset)
    scale = torch.tensor(preset.transforms[-1].std).view(3, 1, 1) * 255
    other = []
    for seed in range(3):
        torch.manual_seed(seed)
        ref = preset(open_image(jpegs[0]))
        torch.manual_seed(seed)
        got = tensor(open_image(jpegs[0]))
        torch.manual_seed(seed + 100)
        other.append(((tensor(open_image(jpegs[0])) - ref) * scale).abs().mean())
        # PIL's ImageEnhance and the tensor kernels round differently, but the factors and crop are the same
        assert ((got - ref) * scale).abs().mean() < min(other) / 4


def test_jpeg_bytes_decode_like_pil(jpegs, tmp_path):
    preset = _preset("irt", False)
    tensor = TensorPipeline(preset)
    from torchvision.io import read_file

    gray, cmyk = tmp_path / "gray.jpg", tmp_path / "cmyk.jpg"
    Image.open(jpegs[0]).convert("L").save(gray, quality=90)
    Image.open(jpegs[0]).convert("CMYK").save(cmyk, quality=90)
    for path in jpegs + [str(gray), str(cmyk)]:
        assert torch.equal(tensor(read_file(path)), tensor(open_image(path)))


def test_open_image_returns_the_rgb_decode_and_drafts_only_when_asked(jpegs, tmp_path, monkeypatch):
    monkeypatch.delenv("RETRIEVAL_JPEG_DRAFT", raising=False)
    for path in jpegs:
        img = open_image(path)
        assert img.mode == "RGB" and np.array_equal(np.array(img), np.array(Image.open(path).convert("RGB")))
        assert np.array_equal(np.array(img.resize((20, 20))), np.array(img.resize((20, 20))))  # still usable
    path = tmp_path / "big.jpg"
    _photo(np.random.default_rng(2), 403, 301).save(path, quality=90)
    # libjpeg scales by the largest of 8, 4, 2, 1 not above min(W // w, H // h); the size rounds up
    for target, factor in [((200, 150), 2), ((100, 60), 4), ((50, 37), 8), ((210, 100), 1), ((20, 20), 8)]:
        img = open_image(str(path), draft=target)
        assert img.size == (-(-403 // factor), -(-301 // factor))
        assert img.size[0] >= target[0] and img.size[1] >= target[1]
    monkeypatch.setenv("RETRIEVAL_JPEG_DRAFT", "100")
    assert open_image(str(path)).size == (202, 151)  # min(403 // 100, 301 // 100) = 3 -> scale 1/2
    monkeypatch.setenv("RETRIEVAL_JPEG_DRAFT", "big")
    with pytest.raises(UserError, match="RETRIEVAL_JPEG_DRAFT"):
        open_image(str(path))


def test_draft_size_keeps_the_first_resize_a_downscale():
    assert draft_size(build_transform("cgd", True)) == (252, 252)  # Resize((252, 252))
    assert draft_size(build_transform("irt", False)) == (256, 256)  # shorter side 256
    assert draft_size(fastretri_transform(True, [64, 48])) == (48, 64)  # (h, w) -> (w, h)
    assert draft_size(fastretri_transform(True, [0])) is None  # RandomResizedCrop of the whole image


def test_environment_selects_the_mode_and_default_is_the_preset_itself(jpegs, monkeypatch):
    monkeypatch.delenv("RETRIEVAL_PIPELINE", raising=False)
    default = build_transform("cgd", False, image_size=48)
    assert type(default).__name__ == "Compose" and type(default.transforms[-1]).__name__ == "Normalize"
    monkeypatch.setenv("RETRIEVAL_PIPELINE", "fast")
    img = open_image(jpegs[0])
    assert torch.equal(build_transform("cgd", False, image_size=48)(img), default(img))
    monkeypatch.setenv("RETRIEVAL_PIPELINE", "tensor")
    assert isinstance(build_transform("cgd", False, image_size=48), TensorPipeline)
    monkeypatch.setenv("RETRIEVAL_PIPELINE", "simd")
    with pytest.raises(UserError, match="RETRIEVAL_PIPELINE"):
        build_transform("cgd", False)


def test_pipelines_pickle_for_loader_workers():
    for mode in ("fast", "tensor"):
        t = accelerate(_preset("fastretri", True), mode)
        torch.manual_seed(0)
        a = t(Image.new("RGB", (60, 50), (10, 200, 30)))
        torch.manual_seed(0)
        assert torch.equal(pickle.loads(pickle.dumps(t))(Image.new("RGB", (60, 50), (10, 200, 30))), a)


def test_batch_decode_and_augment_path_matches_the_tensor_pipeline_on_cpu(jpegs, tmp_path):
    png = tmp_path / "alpha.png"
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(png)
    dataset = RetrievalDataset([(p, str(i % 2)) for i, p in enumerate(jpegs + [str(png)])], {"0": 0, "1": 1})
    preset = _preset("cgd", False)
    loader = torch.utils.data.DataLoader(EncodedImages(dataset), batch_size=4, collate_fn=collate_encoded)
    items, labels = next(iter(loader))
    assert [x.ndim for x in items] == [1, 1, 1, 3] and labels.tolist() == [0, 1, 0, 1]
    batch = GpuAugment(preset, "cpu")(items)
    expected = torch.stack([TensorPipeline(preset)(open_image(p)) for p in dataset.images])
    assert batch.shape == (4, 3, 48, 48) and torch.allclose(batch, expected, atol=1e-6, rtol=0)
    # the worker-side variant (decode_jpeg + tensor preset in the workers) gives the same images
    worker = EncodedImages(dataset, transform=TensorPipeline(preset), return_index=True)
    image, label, index = worker[1]
    assert torch.equal(image, expected[1]) and (label, index) == (1, 1)
