"""IRT's image preset, reached through ``irt.spec.SPEC.transform(config, train)``."""

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from common.presets import IMAGENET_MEAN, IMAGENET_STD, normalized

__all__ = ["irt_transform"]


def irt_transform(train: bool, input_size: int = 224) -> T.Compose:
    """IRT/DeiT: shorter side 256 (bicubic) -> RandomCrop(224) + flip / CenterCrop(224); ImageNet statistics."""
    resize = round(input_size * 256 / 224)
    ops = [T.Resize(resize, interpolation=InterpolationMode.BICUBIC)]
    ops += [T.RandomCrop(input_size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(input_size)]
    return normalized(ops, IMAGENET_MEAN, IMAGENET_STD)
