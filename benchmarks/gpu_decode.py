"""Decoding and augmenting on the GPU, and the presets on uint8 tensors: the alternatives
``benchmarks.loader_benchmark`` and ``benchmarks.gpu_check`` measure against the presets as the methods run them.

* :class:`TensorPipeline`: a preset's ops as ``torchvision.transforms.v2`` kernels on uint8 tensors (SIMD
  antialiased resizes, the same random draws for the same seed). Resized pixels differ from PIL's by at most one
  grey level on a few per cent of the pixels, and ColorJitter by more, so the methods do not use it.
* :class:`EncodedImages` + :func:`collate_encoded` + :class:`GpuAugment`: the loader workers only read files; JPEG
  decoding (``torchvision.io.decode_jpeg(device='cuda')``, nvJPEG) and the augmentation run on the GPU, for a
  host that cannot keep up with it.
* :func:`draft_size`: the smallest reduced-size JPEG decode (``open_image(path, draft=...)``, libjpeg's DCT
  scaling by 1/2, 1/4, 1/8) that keeps a preset's first resize a down-scaling; it only helps where the image is at
  least twice the preset's resize size, and changes pixels.
"""

import io
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common.data.images import is_plain, max_image_pixels, open_image
from common.data.normalize import ToNormalizedTensor, chw_view, split_preset

__all__ = ["draft_size", "TensorPipeline", "EncodedImages", "collate_encoded", "GpuAugment"]

_JPEG_SOI = (0xFF, 0xD8)


def draft_size(transform: Callable) -> Optional[Tuple[int, int]]:
    """Smallest decode size (w, h) that keeps the preset's first Resize a down-scaling (PIL ``draft`` keeps both
    sides >= it); None when the preset does not start with a Resize (then the whole image is needed)."""
    ops = getattr(transform, "transforms", [])
    first = ops[0] if ops else None
    if not isinstance(first, T.Resize):
        return None
    size = [first.size] if isinstance(first.size, int) else list(first.size)
    if len(size) == 1:  # shorter side -> s: both sides >= s keeps it >= s, the longer side follows the aspect
        return size[0], size[0]
    return size[1], size[0]  # (h, w) -> (w, h)


class _TensorOp:
    """One op of a preset on uint8 (C, H, W) tensors: ``transforms.v2`` kernels (antialiased resizes), with the
    random parameters drawn by the PIL op's own ``get_params`` in the same order, so a seed gives the same crops,
    flips and jitter factors as the preset."""

    def __init__(self, op: Callable):
        supported = (
            T.Resize,
            T.CenterCrop,
            T.RandomCrop,
            T.RandomResizedCrop,
            T.RandomHorizontalFlip,
            T.ColorJitter,
            T.RandomApply,
        )
        if not isinstance(op, supported) or (isinstance(op, T.RandomCrop) and (op.padding or op.pad_if_needed)):
            raise ValueError(f"no tensor equivalent for {op!r}")
        self.op = op
        self.inner = [_TensorOp(o) for o in op.transforms] if isinstance(op, T.RandomApply) else []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F2

        op = self.op
        if isinstance(op, T.RandomResizedCrop):
            i, j, h, w = op.get_params(x, op.scale, op.ratio)
            return F2.resized_crop(x, i, j, h, w, op.size, op.interpolation, antialias=True)
        if isinstance(op, T.Resize):
            return F2.resize(x, op.size, op.interpolation, op.max_size, antialias=True)
        if isinstance(op, T.CenterCrop):
            return F2.center_crop(x, op.size)
        if isinstance(op, T.RandomCrop):
            return F2.crop(x, *op.get_params(x, op.size))
        if isinstance(op, T.RandomHorizontalFlip):
            return F2.horizontal_flip(x) if torch.rand(1) < op.p else x
        if isinstance(op, T.ColorJitter):
            order, *factors = op.get_params(op.brightness, op.contrast, op.saturation, op.hue)
            adjust = (F2.adjust_brightness, F2.adjust_contrast, F2.adjust_saturation, F2.adjust_hue)
            for k in order.tolist():
                if factors[k] is not None:
                    x = adjust[k](x, factors[k])
            return x
        if op.p < torch.rand(1):  # RandomApply
            return x
        for inner in self.inner:
            x = inner(x)
        return x

    def __repr__(self) -> str:
        return f"tensor:{self.op!r}"


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.ndim == 1 and data.numel() > 2 and tuple(data[:2].tolist()) == _JPEG_SOI


def _as_uint8_chw(img: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    """uint8 (C, H, W) from a PIL image (a view with channels-last strides, the fast layout of the uint8 resize
    kernels), a uint8 (C, H, W) tensor, or JPEG file bytes (libjpeg-turbo through ``torchvision.io.decode_jpeg``:
    the same pixels as PIL's decoder, tested)."""
    if isinstance(img, torch.Tensor):
        if img.ndim == 1:
            from torchvision.io import ImageReadMode, decode_jpeg

            return decode_jpeg(img, mode=ImageReadMode.RGB)
        return img
    return chw_view(img if img.mode in ("RGB", "L") else img.convert("RGB"))


class TensorPipeline:
    """A preset run with ``transforms.v2`` kernels on uint8 tensors; takes a PIL image, a uint8 (C, H, W) tensor
    or JPEG file bytes (a uint8 1-D tensor, as :class:`EncodedImages` gives)."""

    def __init__(self, transform: Callable):
        ops, mean, std = split_preset(transform)
        self.ops = [_TensorOp(op) for op in ops]
        self.normalize = ToNormalizedTensor(mean, std)

    def __call__(self, img: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
        x = _as_uint8_chw(img)
        for op in self.ops:
            x = op(x)
        return self.normalize(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ops + [self.normalize]})"


class EncodedImages(Dataset):
    """The images of a ``RetrievalDataset`` read as file bytes (uint8 1-D tensors), decoded later: by ``transform``
    in the loader workers (a :class:`TensorPipeline`: ``torchvision.io.decode_jpeg`` + ``transforms.v2``), or, with
    no transform, on the GPU by :class:`GpuAugment`. Only upright RGB or greyscale JPEGs within the pixel limit
    (:func:`common.data.images.is_plain`) are left encoded: anything else (PNG, CMYK, an EXIF orientation, alpha,
    16-bit) is decoded here with ``open_image`` and passed on as a uint8 (3, H, W) tensor, so every path gives
    ``open_image``'s pixels."""

    def __init__(self, dataset, transform: Optional[Callable] = None):
        max_image_pixels()  # a bad RETRIEVAL_MAX_IMAGE_PIXELS is one error line here, not in a worker
        self.images: List[str] = list(dataset.images)
        self.labels: List[int] = list(dataset.labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from torchvision.io import read_file

        data = read_file(self.images[i])
        if not (_is_jpeg(data) and is_plain(io.BytesIO(memoryview(data.numpy())))):
            data = TF.pil_to_tensor(open_image(self.images[i]))
        elif self.transform is not None:
            try:
                data = _as_uint8_chw(data)
            except RuntimeError:  # a JPEG libjpeg-turbo refuses through torchvision: PIL's decoder decides
                data = TF.pil_to_tensor(open_image(self.images[i]))
        if self.transform is not None:
            data = self.transform(data)
        return data, self.labels[i]


def collate_encoded(batch: Sequence[tuple]) -> tuple:
    """(list of encoded or decoded images, labels tensor): images keep their own sizes."""
    columns = list(zip(*batch))
    return (list(columns[0]),) + tuple(torch.as_tensor(c) for c in columns[1:])


class GpuAugment:
    """Decode a batch from :class:`EncodedImages` on ``device`` (nvJPEG on CUDA, libjpeg-turbo on CPU), run the
    preset's ops per image with ``transforms.v2`` there, and normalise: float32 (B, 3, H, W) on ``device``.

    The presets' outputs all have one size (they end with a crop or a fixed-size resize), so the batch stacks.
    On CUDA the uint8 resizes run in float32 and are rounded back, so they differ slightly from the CPU kernels.
    """

    def __init__(self, transform: Callable, device: Union[str, torch.device] = "cuda"):
        ops, mean, std = split_preset(transform)
        self.ops = [_TensorOp(op) for op in ops]
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def decode(self, items: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """uint8 (3, H, W) images on ``device``; encoded ones decoded as a batch (one by one if the batch fails,
        e.g. a CMYK JPEG nvJPEG refuses, then on the CPU)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: List[Optional[torch.Tensor]] = [None] * len(items)
        encoded = [i for i, x in enumerate(items) if x.ndim == 1]
        for i, x in enumerate(items):
            if x.ndim == 3:
                out[i] = x.to(self.device, non_blocking=True)
        if encoded:
            try:
                images = decode_jpeg([items[i] for i in encoded], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                images = [self._decode_one(items[i]) for i in encoded]
            for i, img in zip(encoded, images):
                out[i] = img
        return out

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return decode_jpeg(data, mode=ImageReadMode.RGB).to(self.device)

    def __call__(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        images = []
        for img in self.decode(items):
            for op in self.ops:
                img = op(img)
            images.append(img)
        batch = torch.stack(images).to(torch.float32)
        return batch.div_(255).sub_(self.mean).div_(self.std)
