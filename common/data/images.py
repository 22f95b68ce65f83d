"""Opening an image file: the one function every reader uses (training, evaluation, queries, galleries, crops).

:func:`open_image` returns 8-bit RGB, the same for every method and every input pipeline:

* **Size limit.** An image declaring more than :func:`max_image_pixels` pixels (width x height; default
  ``DEFAULT_MAX_IMAGE_PIXELS`` = 2**26, e.g. 8192 x 8192; ``RETRIEVAL_MAX_IMAGE_PIXELS=N`` changes it) is refused
  from its header, before anything is decoded: a PNG of a few hundred KB can declare 100 megapixels and cost more
  than a gigabyte per decode.
* **EXIF orientation** is applied (``PIL.ImageOps.exif_transpose``), so a phone photo comes out the way viewers
  show it.
* **Modes.** 16-bit greyscale (``I;16*``) is scaled to 8 bits, ``round(v / 257)`` (65535 -> 255), not clipped;
  ``I`` (32-bit integer; Pillow reads 16-bit PGM/PPM as ``I``) by the same rule when every value lies in
  [0, 65535], else stretched linearly from the image's minimum (0) to its maximum (255); ``F`` (float) as
  ``round(255 v)`` when every value lies in [0, 1], else stretched the same way (non-finite values become 0).
  Alpha (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparency key) is composited onto white, as
  viewers and shop pages show such images; ``CMYK`` uses Pillow's conversion ``(255 - C)(255 - K) / 255``;
  every other mode goes through Pillow's ``convert('RGB')``.

:data:`IMAGE_EXTENSIONS` are the file names read as images wherever a folder is scanned (own data, galleries,
queries, uploads).

Every failure is an :class:`ImageError`, an ``OSError``, so the callers' skip-count-and-log paths catch a broken
file, an unsupported mode and an oversized image alike.
"""

import os
import re
import struct
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from common.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ENV_MAX_PIXELS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageError",
    "ImageTooLarge",
    "max_image_pixels",
    "check_size",
    "orientation",
    "is_plain",
    "open_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
ENV_MAX_PIXELS = "RETRIEVAL_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 2**26  # 67.1 MP: every 48-61 MP phone or full-frame photo; 100 MP and up refused
_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# What Pillow's decoders raise on a broken or hostile file besides OSError (truncated headers, bad tables, ...)
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    ZeroDivisionError,
    Image.DecompressionBombError,
)


class ImageError(OSError):
    """An image that cannot be used: unreadable, an unsupported mode, or over the pixel limit."""


class ImageTooLarge(ImageError):
    """An image declaring more pixels than :func:`max_image_pixels` allows."""


def max_image_pixels() -> int:
    """The pixel limit: ``$RETRIEVAL_MAX_IMAGE_PIXELS`` (a positive integer) or ``DEFAULT_MAX_IMAGE_PIXELS``."""
    text = os.environ.get(ENV_MAX_PIXELS, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{ENV_MAX_PIXELS}={text!r} must be a positive number of pixels (default {2**26})")
    return value


def check_size(size: Tuple[int, int], limit: Optional[int] = None) -> None:
    """Raise :class:`ImageTooLarge` when ``width x height`` is over the limit."""
    limit = max_image_pixels() if limit is None else limit
    width, height = size
    if width * height > limit:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
            f"(raise it with {ENV_MAX_PIXELS}=N)"
        )


def _open(fp, limit: int) -> Image.Image:
    """``Image.open`` (header only) with the pixel limit applied; Pillow's own bomb check, which would warn at
    89 MP and fail at 179 MP, is raised to the limit when the limit is larger."""
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decided below, by our limit
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:  # Pillow names the pixel count, not the sides
            found = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(found.group(1)):,} pixels" if found else str(e)
            raise ImageTooLarge(f"{size} is over the limit of {limit:,} (raise it with {ENV_MAX_PIXELS}=N)") from None
    try:
        check_size(img.size, limit)
    except ImageTooLarge:
        img.close()
        raise
    return img


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1 = upright); 1 when absent or unreadable (the pixels stay usable)."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make the image unreadable
        return 1


def is_plain(fp) -> bool:
    """True for an upright 8-bit RGB or greyscale image within the pixel limit: one that any decoder (libjpeg-turbo
    through torchvision, nvJPEG) turns into the same pixels as :func:`open_image`. Anything else, including a file
    that does not parse, is False: it goes through :func:`open_image`, which decides."""
    try:
        with Image.open(fp) as img:
            check_size(img.size)
            return img.mode in ("RGB", "L") and orientation(img) == 1
    except (UserError, *_DECODE_ERRORS):
        return False


def open_image(path, draft: Optional[Tuple[int, int]] = None) -> Image.Image:
    """8-bit RGB of any image file (see the module docstring); raises :class:`ImageError` when it cannot be used.

    An upright RGB file is returned as decoded (no converted copy). ``draft`` = (w, h), opt-in, lets libjpeg decode
    a JPEG at 1/2, 1/4 or 1/8 scale while both displayed sides stay >= (w, h): faster, but the pixels differ from a
    full decode, so the methods never ask for it (``benchmarks.loader_benchmark`` measures it)."""
    limit = max_image_pixels()
    try:
        with _open(path, limit) as img:
            return _to_rgb(img, draft)
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageError(f"{type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image, draft: Optional[Tuple[int, int]]) -> Image.Image:
    if draft is not None and img.format == "JPEG":
        turn = orientation(img)  # JPEG EXIF is parsed with the header: no decode needed to know it
        img.draft(None, tuple(draft[::-1]) if turn in (5, 6, 7, 8) else tuple(draft))
    img.load()
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        return _on_white(img)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    return img.convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    """Composite onto white: ``out = (c a + 255 (255 - a)) / 255``, rounded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Palette images with Transparency expressed in bytes"
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """8-bit greyscale of a 16-bit, 32-bit integer or float image (rules in the module docstring)."""
    if mode.startswith("I;16"):
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535:
        return ((values.astype(np.int64) + 128) // 257).astype(np.uint8)
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    if mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        return np.floor(values * 255 + 0.5).astype(np.uint8)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = np.floor((values - low) * (255 / (high - low)) + 0.5)
    return np.where(finite, scaled, 0).astype(np.uint8)
