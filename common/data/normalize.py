"""The end of every preset (``common/presets.py``): ToTensor + Normalize fused into one pass over the pixels.

:class:`ToNormalizedTensor` runs the same float32 operations as ``Normalize(mean, std)(ToTensor()(img))``
elementwise, so its output is bit-identical to the two torchvision ops (tested), with one pass and no
intermediate tensor.
"""

import warnings
from typing import Callable, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = ["ToNormalizedTensor", "chw_view", "split_preset"]


class ToNormalizedTensor:
    """``Normalize(mean, std)(ToTensor()(img))`` in one pass for uint8 RGB/L PIL images or uint8 (C, H, W)
    tensors: the same float32 operations (x / 255, - mean, / std) elementwise, so the result is bit-identical;
    other inputs go through the two torchvision ops."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, pic: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
        if isinstance(pic, Image.Image) and pic.mode in ("RGB", "L"):
            chw = chw_view(pic)
        elif isinstance(pic, torch.Tensor) and pic.dtype == torch.uint8 and pic.ndim == 3:
            chw = pic
        else:
            return TF.normalize(TF.to_tensor(pic), self.mean, self.std)
        out = torch.empty(chw.shape, dtype=torch.float32)
        torch.div(chw, 255, out=out)
        return out.sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def chw_view(img: Image.Image) -> torch.Tensor:
    """uint8 (C, H, W) over an RGB or L image's bytes without a second copy (channels-last strides). Read-only
    memory: the pipelines never write into their input (resizes and flips allocate, crops are read)."""
    array = np.asarray(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": see above
        tensor = torch.from_numpy(array[:, :, None] if array.ndim == 2 else array)
    return tensor.permute(2, 0, 1)


def split_preset(transform: Callable) -> Tuple[list, Tuple[float, ...], Tuple[float, ...]]:
    """(image ops, mean, std) of a preset that ends with :class:`ToNormalizedTensor` or ToTensor -> Normalize;
    ``ValueError`` for anything else."""
    ops = list(getattr(transform, "transforms", []))
    if ops and isinstance(ops[-1], ToNormalizedTensor):
        return ops[:-1], ops[-1].mean, ops[-1].std
    if len(ops) >= 2 and isinstance(ops[-2], T.ToTensor) and isinstance(ops[-1], T.Normalize):
        return ops[:-2], tuple(ops[-1].mean), tuple(ops[-1].std)
    raise ValueError(f"not a preset ending with ToTensor -> Normalize: {transform!r}")
