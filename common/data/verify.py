"""Decode every image once while an index is built (and write its crop), in a pool of processes.

Every image goes through the opener every reader uses (:func:`common.data.images.open_image`: modes, EXIF
orientation, pixel limit), so a corrupt, missing or oversized file is found now (skipped, counted and logged)
instead of crashing a training run hours later. Bounding-box crops are written once to
``<name>/cropped/<original sub-path>`` as JPEG quality 95 without chroma subsampling, which is visually lossless.
"""

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image
from tqdm import tqdm

from common.data.archives import Box
from common.data.files import write_inside
from common.data.images import max_image_pixels, open_image

__all__ = ["CROP_JPEG", "Summary", "clip_box", "check_images"]

CROP_JPEG = {"format": "JPEG", "quality": 95, "subsampling": 0}


@dataclass
class Summary:
    """Outcome of processing one dataset / crop type, printed as one line."""

    name: str
    crop_type: str
    index: Path
    counts: Dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    log: Optional[Path] = None
    up_to_date: bool = False

    def line(self) -> str:
        if self.up_to_date:
            return f"{self.name} {self.crop_type}: index {self.index} is up to date, skipping (use --force to rebuild)"
        counts = " / ".join(f"{n} {split}" for split, n in self.counts.items())
        tail = f" (see {self.log})" if self.log else ""
        return f"{self.name} {self.crop_type}: {counts} images, {self.skipped} skipped{tail}"


def clip_box(box: Box, size: Tuple[int, int]) -> Box:
    """Clip a (left, upper, right, lower) box to the image: PIL would silently pad outside pixels with black."""
    width, height = size
    left, right = (min(max(v, 0), width) for v in (box[0], box[2]))
    upper, lower = (min(max(v, 0), height) for v in (box[1], box[3]))
    if right <= left or lower <= upper:
        raise ValueError(f"bounding box {box} is empty inside the {width}x{height} image")
    return left, upper, right, lower


def _valid_crop(path: Path, size: Tuple[int, int]) -> bool:
    """An existing crop of the right size is kept (a link is not: it is replaced by a file)."""
    if path.is_symlink():
        return False
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == size
    except Exception:
        return False


def _write_crop(src: Path, dst: Path, box: Box, force: bool, root: Path) -> None:
    """Crop the image as :func:`open_image` shows it (EXIF orientation applied) and write it inside ``root``."""
    img = open_image(src)
    clipped = clip_box(box, img.size)
    if not force and _valid_crop(dst, (clipped[2] - clipped[0], clipped[3] - clipped[1])):
        return
    crop = img.crop(clipped)
    write_inside(root, dst, lambda f: crop.save(f, **CROP_JPEG))


def _check_image(task: tuple) -> Optional[str]:
    """Pool worker: decode (and crop) one image; return None on success, else a one-line reason.

    ``task`` = (name in messages, source, crop target or None, box, force, problem, resolved dataset folder)."""
    rel, src, dst, box, force, problem, root = task
    try:
        if problem:
            raise ValueError(problem)
        if dst is None:
            open_image(src)
        elif box is None:
            raise ValueError("no bounding box annotated")
        else:
            _write_crop(src, dst, box, force, root)
        return None
    except Exception as e:  # anything unreadable is reported and skipped, never fatal
        return f"{rel}: {type(e).__name__}: {e}"


def check_images(tasks: Sequence[tuple], num_workers: int, desc: str) -> List[Optional[str]]:
    """:func:`_check_image` of every task (in order) in ``num_workers`` processes, with a progress bar."""
    max_image_pixels()  # a bad RETRIEVAL_MAX_IMAGE_PIXELS is one error line here, not one per image
    workers = max(1, min(num_workers, len(tasks)))
    bar = dict(total=len(tasks), desc=desc, unit="img", dynamic_ncols=True)
    if workers == 1:
        return list(tqdm(map(_check_image, tasks), **bar))
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    with multiprocessing.Pool(workers) as pool:
        return list(tqdm(pool.imap(_check_image, tasks, chunksize=chunk), **bar))
