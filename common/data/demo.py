"""A small synthetic retrieval dataset, written in the raw CUB-200-2011 layout so it runs through the same code.

Why: every method in this repo should be runnable end to end in a minute on a laptop, without a 1-100 GB download.

Design: a class is a (shape, fill pattern) pair out of 8 shapes x 8 patterns = 64 classes. The pairs are split
like a chess board: (shape + pattern) even -> one of the 32 training classes (ids 1..32), odd -> one of the 32 test
classes (ids 33..64). Every shape and every pattern therefore occurs in both halves, but each test combination is
new: a network that has learnt "what shape" and "what pattern" from the training classes can tell the unseen test
classes apart. Everything else is a per-image nuisance -- background gradient colours, pattern colours, position,
scale, rotation (+-15 deg, small enough that stripe orientations stay distinct), stripe period/phase and pixel noise --
so an untrained network, which mostly reacts to colour, retrieves poorly. Generation is seeded per image and
deterministic; 64 x 30 images of 80x80 px take a few seconds.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

from common.data.files import OutsideDataset, write_inside
from common.errors import UserError

SHAPES = ("circle", "square", "triangle", "star", "cross", "crescent", "halfdisc", "ell")
PATTERNS = ("solid", "hstripes", "vstripes", "diagonal", "checker", "dots", "rings", "grid")
IMAGES_PER_CLASS = 30
IMAGE_SIZE = 80
SEED = 2024
_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt")


def demo_classes() -> List[Tuple[str, str]]:
    """(shape, pattern) of class id 1..64, training combinations first so CUB's first-half rule applies."""
    pairs = [(s, p) for s in range(len(SHAPES)) for p in range(len(PATTERNS))]
    ordered = [q for q in pairs if sum(q) % 2 == 0] + [q for q in pairs if sum(q) % 2 == 1]
    return [(SHAPES[s], PATTERNS[p]) for s, p in ordered]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape in local coordinates where the shape spans roughly [-1, 1]^2 (v points down)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 0.9
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.78
    if shape == "triangle":
        return (v <= 0.75) & (abs(u) <= (v + 0.95) * 0.58)
    if shape == "star":
        return np.sqrt(r2) <= 0.5 + 0.45 * np.cos(5 * np.arctan2(v, u))
    if shape == "cross":
        return ((abs(u) <= 0.32) & (abs(v) <= 0.95)) | ((abs(v) <= 0.32) & (abs(u) <= 0.95))
    if shape == "crescent":
        return (r2 <= 0.95) & ((u - 0.5) ** 2 + v * v > 0.55)
    if shape == "halfdisc":
        return (u * u + (v - 0.45) ** 2 <= 1.0) & (v <= 0.45)
    if shape == "ell":
        return ((u >= -0.8) & (u <= -0.2) & (abs(v) <= 0.9)) | ((abs(u) <= 0.8) & (v >= 0.3) & (v <= 0.9))
    raise ValueError(shape)


def _pattern(pattern: str, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    """Boolean texture (True -> second colour) in rotated pixel coordinates a (right), b (down)."""
    half = period / 2
    if pattern == "solid":
        return np.zeros(a.shape, dtype=bool)
    if pattern == "hstripes":
        return (b % period) < half
    if pattern == "vstripes":
        return (a % period) < half
    if pattern == "diagonal":
        return (((a + b) / np.sqrt(2)) % period) < half
    if pattern == "checker":
        return ((np.floor(a / half) + np.floor(b / half)) % 2) == 0
    if pattern == "dots":
        return ((a % period) - half) ** 2 + ((b % period) - half) ** 2 < (0.32 * period) ** 2
    if pattern == "rings":
        return (np.sqrt(a * a + b * b) % period) < half
    if pattern == "grid":
        return ((a % period) < 0.3 * period) | ((b % period) < 0.3 * period)
    raise ValueError(pattern)


def _colour(rng: np.random.Generator, avoid: List[np.ndarray], distance: float) -> np.ndarray:
    colour = rng.uniform(0, 255, 3)
    for _ in range(50):  # rejection sampling keeps the shape and its texture visible
        if all(np.linalg.norm(colour - c) >= distance for c in avoid):
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def render(
    shape: str, pattern: str, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> Tuple[np.ndarray, Tuple[int, int, int, int]]:
    """One RGB uint8 image of the class plus its bounding box (x, y, w, h) with a small annotation margin."""
    radius = rng.uniform(0.27, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = np.deg2rad(rng.uniform(-15, 15))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cos, sin = np.cos(angle), np.sin(angle)
    a = cos * (xs - cx) + sin * (ys - cy)
    b = -sin * (xs - cx) + cos * (ys - cy)
    mask = _shape_mask(shape, a / radius, b / radius)
    phase_a, phase_b = rng.uniform(0, 20, 2)
    texture = _pattern(pattern, a + phase_a, b + phase_b, rng.uniform(5.0, 8.0))

    bg0 = rng.uniform(0, 255, 3)
    bg1 = np.clip(bg0 + rng.uniform(-50, 50, 3), 0, 255)
    first = _colour(rng, [bg0, bg1], 110)
    second = _colour(rng, [bg0, bg1, first], 90)
    t = (xs * rng.uniform(-1, 1) + ys * rng.uniform(-1, 1))[..., None] / size
    image = bg0 + (bg1 - bg0) * (t - t.min()) / max(np.ptp(t), 1e-6)
    image[mask] = first
    image[mask & texture] = second
    image += rng.normal(0, 6, image.shape)

    rows, cols = np.nonzero(mask)
    margin = int(rng.integers(0, 4))
    x0, y0 = max(int(cols.min()) - margin, 0), max(int(rows.min()) - margin, 0)
    x1, y1 = min(int(cols.max()) + 1 + margin, size), min(int(rows.max()) + 1 + margin, size)
    return np.clip(image, 0, 255).astype(np.uint8), (x0, y0, x1 - x0, y1 - y0)


def demo_is_generated(root: Path) -> bool:
    """True when every annotation file of a generated demo exists (they are written last)."""
    return all((Path(root) / f).is_file() for f in _FILES)


def generate_demo(
    root: os.PathLike, images_per_class: int = IMAGES_PER_CLASS, size: int = IMAGE_SIZE, seed: int = SEED
) -> Path:
    """Write the raw demo (CUB layout) into root; annotation files go last so a partial run is not mistaken
    for a finished one."""
    try:
        return _generate(Path(root), images_per_class, size, seed)
    except OutsideDataset as e:
        raise UserError(f"demo: {e}; the demo is written only inside it: replace the link by a folder") from None


def _generate(root: Path, images_per_class: int, size: int, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    base = root.resolve()  # every file is written inside it, never through a link out of it

    def write(rel: str, data: bytes) -> None:
        write_inside(base, base / rel, lambda f: f.write(data))

    classes = demo_classes()
    half = len(classes) // 2
    images, labels, splits, boxes = [], [], [], []
    for class_id, (shape, pattern) in enumerate(classes, 1):
        folder = f"{class_id:03d}.{shape}_{pattern}"
        for k in range(1, images_per_class + 1):
            rng = np.random.default_rng([seed, class_id, k])
            pixels, (x, y, w, h) = render(shape, pattern, rng, size)
            rel = f"{folder}/{shape}_{pattern}_{k:04d}.jpg"
            jpeg = partial(Image.Image.save, Image.fromarray(pixels), format="JPEG", quality=95)
            write_inside(base, base / "images" / rel, jpeg)
            image_id = len(images) + 1
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            splits.append(f"{image_id} {int(class_id <= half)}")
            boxes.append(f"{image_id} {float(x):.1f} {float(y):.1f} {float(w):.1f} {float(h):.1f}")
    write("README", _readme(len(images), len(classes), images_per_class, size, seed).encode())
    write("classes.txt", "".join(f"{i} {i:03d}.{s}_{p}\n" for i, (s, p) in enumerate(classes, 1)).encode())
    for name, lines in zip(_FILES[1:], (labels, splits, None, boxes)):
        if lines is not None:
            write(name, "".join(f"{line}\n" for line in lines).encode())
    write("images.txt", "".join(f"{line}\n" for line in images).encode())
    return Path(root)


def _readme(n_images: int, n_classes: int, per_class: int, size: int, seed: int) -> str:
    return (
        "Synthetic retrieval demo generated by common/data/demo.py (same layout as CUB_200_2011/).\n"
        f"{n_images} images ({per_class} per class), {size}x{size} px, seed {seed}.\n"
        f"{n_classes} classes = {len(SHAPES)} shapes x {len(PATTERNS)} fill patterns; classes 1-{n_classes // 2} "
        f"train, {n_classes // 2 + 1}-{n_classes} test (unseen shape/pattern combinations).\n"
        "Colours, position, scale, rotation, stripe period and noise vary per image.\n"
        "Files: images.txt, image_class_labels.txt, train_test_split.txt (1 = training class), classes.txt,\n"
        "bounding_boxes.txt (x y w h as floats, around the shape), images/NNN.shape_pattern/*.jpg.\n"
    )
