"""FastRetri's transform presets (fastreid ``build_transforms``), built from the shared blocks of ``common.presets``.

``build_transforms`` (``fastretri/data.py``) reads them from a config; :func:`preset_transform` gives the per-dataset
preset of the released configs for the benchmarks and the preset tests, which have a dataset name and no config.
"""

from typing import Optional, Sequence, Tuple

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from common.presets import IMAGENET_MEAN, IMAGENET_STD, _finish, _scaled

__all__ = ["FASTRETRI_PRESETS", "fastretri_preset", "fastretri_transform", "preset_transform"]

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


def preset_transform(train: bool, data_name: str = "cub", image_size: Optional[int] = None) -> T.Compose:
    """The released config's preset for ``data_name``, rescaled to ``image_size`` (no config needed)."""
    return fastretri_transform(train, **fastretri_preset(data_name, image_size))
