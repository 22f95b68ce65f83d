"""Faster input pipelines for the presets of ``common/presets.py``: per-core speed on the host, or decoding on the GPU.

A preset (``T.Compose`` of PIL ops -> ToTensor -> Normalize) runs in one of three modes, chosen with the
``RETRIEVAL_PIPELINE`` environment variable (read when a preset is built) or :func:`accelerate`:

* ``pil`` (default): the preset as written, the reference.
* ``fast``: the same PIL ops with ToTensor + Normalize fused into one pass; bit-identical output (tested).
* ``tensor``: ``torchvision.transforms.v2`` on uint8 tensors (SIMD antialiased resize, same random draws for the
  same seed). Resized pixels differ from PIL's by at most one grey level on a few per cent of the pixels, and
  ColorJitter by more: opt-in.

Independently, reduced-size JPEG decoding (libjpeg's DCT scaling by 1/2, 1/4, 1/8, PIL ``Image.draft``) is opt-in
through ``open_image(path, draft=(w, h))`` or ``RETRIEVAL_JPEG_DRAFT=N`` (both sides kept >= N px): it only helps
where the image is at least twice the preset's resize size, and changes pixels (a smaller decode, then the resize).
:func:`draft_size` gives the safe size of a preset.

When the host cannot keep up with the GPU, :class:`EncodedImages` + :func:`collate_encoded` + :class:`GpuAugment`
move JPEG decoding (``torchvision.io.decode_jpeg(device='cuda')``, nvJPEG) and the augmentation to the GPU; the
loader workers then only read files.
"""

import io
import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common.errors import UserError
from common.images import is_plain, max_image_pixels, open_image

__all__ = [
    "MODES",
    "ENV_MODE",
    "ENV_DRAFT",
    "pipeline_mode",
    "env_draft",
    "draft_size",
    "ToNormalizedTensor",
    "TensorPipeline",
    "accelerate",
    "from_env",
    "EncodedImages",
    "collate_encoded",
    "GpuAugment",
]

MODES = ("pil", "fast", "tensor")
ENV_MODE = "RETRIEVAL_PIPELINE"
ENV_DRAFT = "RETRIEVAL_JPEG_DRAFT"
_JPEG_SOI = (0xFF, 0xD8)


def pipeline_mode(mode: Optional[str] = None) -> str:
    """``mode``, else ``$RETRIEVAL_PIPELINE``, else ``pil``; one ``error:`` line for an unknown value."""
    value = (mode if mode is not None else os.environ.get(ENV_MODE, "")).strip().lower() or "pil"
    if value not in MODES:
        raise UserError(f"{ENV_MODE}={value!r}: choose one of {', '.join(MODES)}")
    return value


def env_draft() -> Optional[Tuple[int, int]]:
    """(N, N) from ``$RETRIEVAL_JPEG_DRAFT=N`` (a positive integer), None when unset or 0."""
    text = os.environ.get(ENV_DRAFT, "").strip()
    if not text:
        return None
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"{ENV_DRAFT}={text!r} must be a size in pixels (e.g. 256), or 0 for off") from None
    if n < 0:
        raise UserError(f"{ENV_DRAFT}={text!r} must be >= 0")
    return (n, n) if n else None


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
            chw = _pil_view(pic)
        elif isinstance(pic, torch.Tensor) and pic.dtype == torch.uint8 and pic.ndim == 3:
            chw = pic
        else:
            return TF.normalize(TF.to_tensor(pic), self.mean, self.std)
        out = torch.empty(chw.shape, dtype=torch.float32)
        torch.div(chw, 255, out=out)
        return out.sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _pil_view(img: Image.Image) -> torch.Tensor:
    """uint8 (C, H, W) over the image's bytes without a second copy (channels-last strides). Read-only memory:
    the pipelines here never write into their input (resizes and flips allocate, crops are read)."""
    array = np.asarray(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": see above
        tensor = torch.from_numpy(array[:, :, None] if array.ndim == 2 else array)
    return tensor.permute(2, 0, 1)


def _split_preset(transform: Callable) -> Tuple[list, Tuple[float, ...], Tuple[float, ...]]:
    """(image ops, mean, std) of a preset that ends with ToTensor -> Normalize."""
    ops = list(getattr(transform, "transforms", []))
    if len(ops) < 2 or not isinstance(ops[-2], T.ToTensor) or not isinstance(ops[-1], T.Normalize):
        raise ValueError(f"not a preset ending with ToTensor -> Normalize: {transform!r}")
    return ops[:-2], tuple(ops[-1].mean), tuple(ops[-1].std)


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
    return _pil_view(img if img.mode in ("RGB", "L") else img.convert("RGB"))


class TensorPipeline:
    """A preset run with ``transforms.v2`` kernels on uint8 tensors; takes a PIL image, a uint8 (C, H, W) tensor
    or JPEG file bytes (a uint8 1-D tensor, as :class:`EncodedImages` gives)."""

    def __init__(self, transform: Callable):
        ops, mean, std = _split_preset(transform)
        self.ops = [_TensorOp(op) for op in ops]
        self.normalize = ToNormalizedTensor(mean, std)

    def __call__(self, img: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
        x = _as_uint8_chw(img)
        for op in self.ops:
            x = op(x)
        return self.normalize(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ops + [self.normalize]})"


def accelerate(transform: Callable, mode: Optional[str] = None) -> Callable:
    """The preset in ``mode`` (see the module docstring; None reads ``$RETRIEVAL_PIPELINE``); ``pil`` returns
    ``transform`` itself, and so does ``fast`` for a transform that is not a ToTensor -> Normalize preset."""
    mode = pipeline_mode(mode)
    if mode == "pil":
        return transform
    if mode == "fast":
        try:
            ops, mean, std = _split_preset(transform)
        except ValueError:
            return transform
        return T.Compose(ops + [ToNormalizedTensor(mean, std)])
    try:
        return TensorPipeline(transform)
    except ValueError as e:
        raise UserError(f"{ENV_MODE}=tensor: {e}") from None


def from_env(transform: T.Compose) -> Callable:
    """What ``common.presets`` returns: the preset itself unless ``$RETRIEVAL_PIPELINE`` asks for another mode."""
    return transform if not os.environ.get(ENV_MODE) else accelerate(transform)


class EncodedImages(Dataset):
    """The images of a ``RetrievalDataset`` read as file bytes (uint8 1-D tensors), decoded later: by ``transform``
    in the loader workers (a :class:`TensorPipeline`: ``torchvision.io.decode_jpeg`` + ``transforms.v2``), or, with
    no transform, on the GPU by :class:`GpuAugment`. Only upright RGB or greyscale JPEGs within the pixel limit
    (:func:`common.images.is_plain`) are left encoded: anything else (PNG, CMYK, an EXIF orientation, alpha, 16-bit)
    is decoded here with ``open_image`` and passed on as a uint8 (3, H, W) tensor, so every path gives
    ``open_image``'s pixels."""

    def __init__(self, dataset, transform: Optional[Callable] = None, return_index: bool = False):
        max_image_pixels()  # a bad RETRIEVAL_MAX_IMAGE_PIXELS is one error line here, not in a worker
        self.images: List[str] = list(dataset.images)
        self.labels: List[int] = list(dataset.labels)
        self.transform, self.return_index = transform, return_index

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
        return (data, self.labels[i], i) if self.return_index else (data, self.labels[i])


def collate_encoded(batch: Sequence[tuple]) -> tuple:
    """(list of encoded or decoded images, labels tensor[, indices tensor]): images keep their own sizes."""
    columns = list(zip(*batch))
    return (list(columns[0]),) + tuple(torch.as_tensor(c) for c in columns[1:])


class GpuAugment:
    """Decode a batch from :class:`EncodedImages` on ``device`` (nvJPEG on CUDA, libjpeg-turbo on CPU), run the
    preset's ops per image with ``transforms.v2`` there, and normalise: float32 (B, 3, H, W) on ``device``.

    The presets' outputs all have one size (they end with a crop or a fixed-size resize), so the batch stacks.
    On CUDA the uint8 resizes run in float32 and are rounded back, so they differ slightly from the CPU kernels.
    """

    def __init__(self, transform: Callable, device: Union[str, torch.device] = "cuda"):
        ops, mean, std = _split_preset(transform)
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
