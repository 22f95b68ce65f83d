"""The input-pipeline alternatives the benchmarks measure (benchmarks/gpu_decode.py) against the presets: the tensor
pipeline within a grey level with the same random draws, JPEG bytes decoded like PIL, draft sizes, and the batch
(GPU-side) decode path on CPU giving ``open_image``'s pixels for every kind of file."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import read_file
from torchvision.transforms import functional as TF

from benchmarks.gpu_decode import EncodedImages, GpuAugment, TensorPipeline, collate_encoded, draft_size
from benchmarks.loader_benchmark import method_preset
from common.data.datasets import RetrievalDataset
from common.data.images import open_image
from fastretri.transforms import fastretri_transform
from tests.common.test_normalize import PRESETS, preset, write_jpegs
from tests.common.test_safety_data import RNG, _save, _tagged_jpeg

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec; it still works (and is what is tested)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return write_jpegs(tmp_path_factory.mktemp("jpegs"))


@pytest.mark.parametrize("method,train", PRESETS)
def test_tensor_pipeline_draws_the_same_crops_and_stays_within_resize_rounding(jpegs, method, train):
    fused = preset(method, train)
    tensor = TensorPipeline(fused)
    scale = torch.tensor(fused.transforms[-1].std).view(3, 1, 1) * 255
    for i, path in enumerate(jpegs):
        torch.manual_seed(i)
        ref = fused(open_image(path))
        torch.manual_seed(i)
        got = tensor(open_image(path))
        levels = ((got - ref) * scale).abs()
        # one antialiased resize: fixed-point rounding of the uint8 kernels differs by at most one grey level;
        # FastRetri's training preset resizes twice (bicubic Resize, then RandomResizedCrop, which may upscale)
        # (a different crop or flip would differ by tens of levels on average)
        most, mean = (8, 0.5) if method == "fastretri" and train else (1 + 1e-3, 0.1)
        assert got.shape == ref.shape and levels.max() <= most and levels.mean() < mean


def test_tensor_pipeline_color_jitter_uses_the_presets_random_factors(jpegs):
    fused = fastretri_transform(True, [40], crop_size=32, jitter=(0.3, 0.3, 0.3, 0.1), jitter_prob=1.0)
    tensor = TensorPipeline(fused)
    scale = torch.tensor(fused.transforms[-1].std).view(3, 1, 1) * 255
    other = []
    for seed in range(3):
        torch.manual_seed(seed)
        ref = fused(open_image(jpegs[0]))
        torch.manual_seed(seed)
        got = tensor(open_image(jpegs[0]))
        torch.manual_seed(seed + 100)
        other.append(((tensor(open_image(jpegs[0])) - ref) * scale).abs().mean())
        # PIL's ImageEnhance and the tensor kernels round differently, but the factors and crop are the same
        assert ((got - ref) * scale).abs().mean() < min(other) / 4


def test_jpeg_bytes_decode_like_pil(jpegs, tmp_path):
    tensor = TensorPipeline(preset("irt", False))
    gray, cmyk = tmp_path / "gray.jpg", tmp_path / "cmyk.jpg"
    Image.open(jpegs[0]).convert("L").save(gray, quality=90)
    Image.open(jpegs[0]).convert("CMYK").save(cmyk, quality=90)
    for path in jpegs + [str(gray), str(cmyk)]:
        assert torch.equal(tensor(read_file(path)), tensor(open_image(path)))


def test_draft_size_keeps_the_first_resize_a_downscale():
    assert draft_size(method_preset("cgd", True)) == (252, 252)  # Resize((252, 252))
    assert draft_size(method_preset("irt", False)) == (256, 256)  # shorter side 256
    assert draft_size(fastretri_transform(True, [64, 48])) == (48, 64)  # (h, w) -> (w, h)
    assert draft_size(fastretri_transform(True, [0])) is None  # RandomResizedCrop of the whole image


def test_tensor_pipeline_pickles_for_loader_workers():
    t = TensorPipeline(preset("fastretri", True))
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
    fused = preset("cgd", False)
    loader = torch.utils.data.DataLoader(EncodedImages(dataset), batch_size=4, collate_fn=collate_encoded)
    items, labels = next(iter(loader))
    assert [x.ndim for x in items] == [1, 1, 1, 3] and labels.tolist() == [0, 1, 0, 1]
    batch = GpuAugment(fused, "cpu")(items)
    expected = torch.stack([TensorPipeline(fused)(open_image(p)) for p in dataset.images])
    assert batch.shape == (4, 3, 48, 48) and torch.allclose(batch, expected, atol=1e-6, rtol=0)
    # the worker-side variant (decode_jpeg + tensor preset in the workers) gives the same images
    worker = EncodedImages(dataset, transform=TensorPipeline(fused))
    image, label = worker[1]
    assert torch.equal(image, expected[1]) and label == 1


@pytest.fixture
def mixed(tmp_path):
    """One image of each kind the fast paths must route: plain JPEGs and everything else."""
    paths = [_tagged_jpeg(tmp_path / "plain.jpg", 1), _tagged_jpeg(tmp_path / "grey.jpg", 1, mode="L")]
    paths += [_tagged_jpeg(tmp_path / f"o{k}.jpg", k) for k in (3, 6, 8)]
    paths.append(_tagged_jpeg(tmp_path / "cmyk.jpg", 1, mode="CMYK"))
    rgba = RNG.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    paths.append(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"))
    paths.append(_save(tmp_path, Image.fromarray(RNG.integers(0, 65536, (24, 40)).astype(np.uint16)), "g.png"))
    return [str(p) for p in paths]


def test_encoded_and_gpu_paths_give_open_image_pixels(mixed):
    dataset = RetrievalDataset([(p, "0") for p in mixed], {"0": 0})
    encoded = EncodedImages(dataset)
    items = [encoded[i][0] for i in range(len(mixed))]
    assert [x.ndim for x in items] == [1, 1] + [3] * (len(mixed) - 2)  # only the plain JPEGs stay encoded
    decoded = GpuAugment(method_preset("cgd", False, "cub", "uncropped", 32), "cpu").decode(items)
    for path, img in zip(mixed, decoded):
        assert torch.equal(img, TF.pil_to_tensor(open_image(path))), path
    pipeline = TensorPipeline(method_preset("cgd", False, "cub", "uncropped", 32))
    encoded = EncodedImages(dataset, transform=pipeline)
    for i, path in enumerate(mixed):
        assert torch.equal(encoded[i][0], pipeline(open_image(path))), path
