"""Every transform the methods use, in one place (torchvision ``presets.py`` style).

``image_size`` rescales a CNN preset proportionally (e.g. CGD 252->224 becomes 72->64 for ``--image_size 64``),
which is what the demo quickstart and the CPU tests use.
"""

from typing import Optional, Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from common.data.normalize import ToNormalizedTensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DATASET_STATS",
    "build_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-dataset statistics used by REIR/SREML (from DREML's colour table); demo falls back to ImageNet's.
DATASET_STATS = {
    "car": ((0.4853, 0.4965, 0.4295), (0.2237, 0.2193, 0.2568)),
    "cub": ((0.4707, 0.4601, 0.4549), (0.2767, 0.2760, 0.2850)),
    "sop": ((0.5807, 0.5396, 0.5044), (0.2901, 0.2974, 0.3095)),
    "isc": ((0.8324, 0.8109, 0.8041), (0.2206, 0.2378, 0.2444)),
}


def _scaled(size: int, base: int, image_size: Optional[int]) -> int:
    """``size`` of a preset whose reference crop is ``base``, rescaled to ``image_size``."""
    return size if image_size is None else max(1, round(size * image_size / base))


def _finish(ops: list, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The preset: ``ops``, then ToTensor + Normalize(mean, std) fused into one bit-identical pass
    (``common.data.normalize``)."""
    return T.Compose(ops + [ToNormalizedTensor(mean, std)])


def cgd_transform(train: bool, image_size: Optional[int] = None) -> T.Compose:
    """CGD: train Resize((252,252)) -> RandomCrop(224) -> flip; test Resize((224,224)); ImageNet statistics."""
    crop, big = _scaled(224, 224, image_size), _scaled(252, 224, image_size)
    ops = [T.Resize((big, big)), T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.Resize((crop, crop))]
    return _finish(ops, IMAGENET_MEAN, IMAGENET_STD)


def reir_transform(train: bool, data_name: str, crop_type: str, image_size: Optional[int] = None) -> T.Compose:
    """REIR: uncropped Resize(256) -> RandomCrop(256) -> flip / Resize(256) -> CenterCrop(256);
    cropped Resize((256,256)) (+ flip); per-dataset statistics."""
    s = _scaled(256, 256, image_size)
    if crop_type == "cropped":
        ops = [T.Resize((s, s))] + ([T.RandomHorizontalFlip()] if train else [])
    elif train:
        ops = [T.Resize(s), T.RandomCrop(s), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(s), T.CenterCrop(s)]
    return _finish(ops, *DATASET_STATS.get(data_name, (IMAGENET_MEAN, IMAGENET_STD)))


def sreml_transform(train: bool, data_name: str, image_size: Optional[int] = None) -> T.Compose:
    """SREML: Resize((256,256)) (+ flip in training), every dataset and crop type; per-dataset statistics."""
    s = _scaled(256, 256, image_size)
    ops = [T.Resize((s, s))] + ([T.RandomHorizontalFlip()] if train else [])
    return _finish(ops, *DATASET_STATS.get(data_name, (IMAGENET_MEAN, IMAGENET_STD)))


def irt_transform(train: bool, input_size: int = 224) -> T.Compose:
    """IRT/DeiT: shorter side 256 (bicubic) -> RandomCrop(224) + flip / CenterCrop(224); ImageNet statistics."""
    resize = round(input_size * 256 / 224)
    ops = [T.Resize(resize, interpolation=InterpolationMode.BICUBIC)]
    ops += [T.RandomCrop(input_size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(input_size)]
    return _finish(ops, IMAGENET_MEAN, IMAGENET_STD)


def build_transform(
    method: str, train: bool, data_name: str = "car", crop_type: str = "uncropped", image_size: Optional[int] = None
) -> T.Compose:
    """The transform of ``method`` for training or evaluation."""
    if method == "cgd":
        return cgd_transform(train, image_size)
    if method == "reir":
        return reir_transform(train, data_name, crop_type, image_size)
    if method == "sreml":
        return sreml_transform(train, data_name, image_size)
    if method == "irt":
        return irt_transform(train, image_size or 224)
    raise ValueError(f"no transform preset for method {method!r}")
