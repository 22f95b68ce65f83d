"""Every transform the methods use, in one place (torchvision ``presets.py`` style).

``image_size`` rescales a CNN preset proportionally (e.g. CGD 252->224 becomes 72->64 for ``--image_size 64``),
which is what the demo quickstart and the CPU tests use.
"""

from typing import Optional, Sequence, Tuple

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from common.data.normalize import ToNormalizedTensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DATASET_STATS",
    "build_transform",
    "fastretri_transform",
    "fastretri_preset",
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


def build_transform(
    method: str, train: bool, data_name: str = "car", crop_type: str = "uncropped", image_size: Optional[int] = None
) -> T.Compose:
    """The transform of ``method`` for training or evaluation."""
    if method == "fastretri":
        return fastretri_transform(train, **fastretri_preset(data_name, image_size))
    raise ValueError(f"no transform preset for method {method!r}")


# FastRetri per-dataset inputs (fast-reid projects/FastRetri/configs, anchors.md A): resize ([s] = shorter side,
# [h, w] = fixed, [0] = none), RandomResizedCrop ratio, ColorJitter (brightness, contrast, saturation, hue) or None.
FASTRETRI_PRESETS = {
    "cub": {"resize": [256], "ratio": (0.75, 1.33333), "jitter": (0.25, 0.25, 0.25, 0.0)},
    "car": {"resize": [256, 256], "ratio": (1.0, 1.0), "jitter": (0.3, 0.3, 0.3, 0.1)},
    "sop": {"resize": [256, 256], "ratio": (0.75, 1.33333), "jitter": None},
    "isc": {"resize": [0], "ratio": (0.75, 1.33333), "jitter": None},
}


def fastretri_preset(data_name: str, image_size: Optional[int] = None) -> dict:
    """Keyword arguments of :func:`fastretri_transform` for a dataset (demo uses CUB's), scaled to ``image_size``."""
    preset = dict(FASTRETRI_PRESETS.get(data_name, FASTRETRI_PRESETS["cub"]))
    preset["resize"] = [_scaled(s, 224, image_size) if s > 0 else 0 for s in preset["resize"]]
    preset["crop_size"] = _scaled(224, 224, image_size)
    return preset


def fastretri_transform(
    train: bool,
    resize: Sequence[int] = (256,),
    crop_size: int = 224,
    crop: bool = True,
    scale: Tuple[float, float] = (0.16, 1.0),
    ratio: Tuple[float, float] = (0.75, 1.33333),
    flip_prob: float = 0.5,
    jitter: Optional[Sequence[float]] = None,
    jitter_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """FastRetri (fastreid ``build_transforms``): bicubic Resize -> RandomResizedCrop(scale 0.16-1) -> flip ->
    ColorJitter with probability 0.5; test Resize -> CenterCrop. ``resize`` [s] is the shorter side, [h, w] a fixed
    size, [0] no resize. fastreid normalises inside the model on 0-255 tensors; Normalize here is the same map."""
    bicubic = InterpolationMode.BICUBIC
    ops = [T.Resize(resize[0] if len(resize) == 1 else list(resize), interpolation=bicubic)] if resize[0] > 0 else []
    if train:
        if crop:
            ops.append(T.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=bicubic))
        if flip_prob > 0:
            ops.append(T.RandomHorizontalFlip(flip_prob))
        if jitter is not None and jitter_prob > 0:
            ops.append(T.RandomApply([T.ColorJitter(*jitter)], p=jitter_prob))
    elif crop:
        ops.append(T.CenterCrop(crop_size))
    return _finish(ops, mean, std)
