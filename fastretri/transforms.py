"""FastRetri's transform presets (fastreid ``build_transforms``), built from the shared blocks of ``common.presets``.

``build_transforms`` (``fastretri/data.py``) reads the arguments from a config (``fastretri/configs/<dataset>.yml``).
"""

from typing import Optional, Sequence, Tuple

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from common.presets import IMAGENET_MEAN, IMAGENET_STD, normalized

__all__ = ["fastretri_transform"]


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
    return normalized(ops, mean, std)
