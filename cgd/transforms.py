"""CGD's image preset, reached through ``cgd.spec.SPEC.transform(config, train)``."""

from typing import Optional

from torchvision import transforms as T

from common.presets import IMAGENET_MEAN, IMAGENET_STD, normalized, scaled

__all__ = ["cgd_transform"]


def cgd_transform(train: bool, image_size: Optional[int] = None) -> T.Compose:
    """CGD: train Resize((252,252)) -> RandomCrop(224) -> flip; test Resize((224,224)); ImageNet statistics."""
    crop, big = scaled(224, 224, image_size), scaled(252, 224, image_size)
    ops = [T.Resize((big, big)), T.RandomCrop(crop), T.RandomHorizontalFlip()] if train else [T.Resize((crop, crop))]
    return normalized(ops, IMAGENET_MEAN, IMAGENET_STD)
