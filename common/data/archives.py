"""Readers of the benchmarks' raw annotation files (CARS-196, CUB-200-2011, SOP, In-shop; the demo uses CUB's
layout): each turns ``<data_path>/<name>/`` into a list of :class:`Entry` (split, image path, raw label, box)."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from common.data.files import read_text_file
from common.data.registry import BENCHMARKS
from common.errors import UserError

__all__ = ["Box", "Entry", "CARS_TRAIN_CLASSES", "READERS", "dataset_dir", "read_car", "read_cub", "read_sop", "read_isc"]

CARS_TRAIN_CLASSES = 98  # CARS-196 DML split: classes 1..98 train, 99..196 test

Box = Tuple[int, int, int, int]


@dataclass(frozen=True)
class Entry:
    """One annotated image. ``box`` is (left, upper, right, lower) in PIL convention, not yet clipped."""

    split: str
    path: str
    label: str
    box: Optional[Box] = None


def dataset_dir(data_path: os.PathLike, name: str) -> Path:
    """``<data_path>/<name>``, or one line saying what it should hold."""
    root = Path(data_path) / name
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found; it should hold {BENCHMARKS[name].expected}")
    return root


def _annotation(root: Path, name: str, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise UserError(f"{name}: annotation file {path} not found; {root} should hold {BENCHMARKS[name].expected}")
    return path


def _rows(
    path: Path, min_fields: int, skip: Callable[[List[str]], bool] = lambda f: False
) -> List[Tuple[int, List[str]]]:
    """Whitespace-split non-empty lines (In-shop pads columns and leaves trailing spaces, so never split(' '))."""
    rows = []
    for number, line in enumerate(read_text_file(path, "annotation file").splitlines(), 1):
        fields = line.split()
        if not fields or skip(fields):
            continue
        if len(fields) < min_fields:
            raise UserError(f"{path}:{number}: expected {min_fields} whitespace-separated fields, got {len(fields)}")
        rows.append((number, fields))
    return rows


def _scalar(value: object) -> int:
    """MATLAB numbers arrive as (1,1) uint8/uint16 arrays: take the scalar as a Python int before any arithmetic."""
    return int(np.asarray(value).reshape(-1)[0])


def read_car(root: Path) -> List[Entry]:
    """CARS-196 from cars_annos.mat; split by class (1..98 train), the mat's own `test` flag is ignored."""
    import scipy.io

    path = _annotation(root, "car", "cars_annos.mat")
    try:
        records = scipy.io.loadmat(str(path))["annotations"].reshape(-1)
    except Exception as e:  # corrupt file or a different .mat (e.g. the devkit's cars_train_annos.mat)
        raise UserError(f"cannot read annotations from {path}: {type(e).__name__}: {e}") from None
    needed = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")
    missing = [f for f in needed if f not in (records.dtype.names or ())]
    if missing:
        raise UserError(f"{path}: 'annotations' lacks the fields {', '.join(missing)}")
    entries = []
    for rec in records:
        rel = str(np.asarray(rec["relative_im_path"]).reshape(-1)[0])
        x1, y1, x2, y2, cls = (_scalar(rec[f]) for f in needed[1:])
        split = "train" if cls <= CARS_TRAIN_CLASSES else "test"
        entries.append(Entry(split, rel, str(cls), (x1, y1, x2, y2)))
    return entries


def read_cub(root: Path, name: str = "cub") -> List[Entry]:
    """CUB layout (also the demo's): the first half of the sorted class ids is train, the rest test."""
    files = [_annotation(root, name, rel) for rel in BENCHMARKS[name].annotations]
    images, labels, boxes = (_rows(p, n) for p, n in zip(files, (2, 2, 5)))
    label_of = {f[0]: f[1] for _, f in labels}
    box_of = {f[0]: f[1:5] for _, f in boxes}
    try:
        class_ids = sorted({int(v) for v in label_of.values()})
    except ValueError:
        raise UserError(f"{files[1]}: class ids must be integers") from None
    train_ids = set(class_ids[: (len(class_ids) + 1) // 2])
    entries = []
    for number, (image_id, rel) in ((n, f[:2]) for n, f in images):
        if image_id not in label_of:
            raise UserError(f"{files[0]}:{number}: image id {image_id} has no line in {files[1]}")
        box = None
        if image_id in box_of:  # CUB stores x y w h as floats ("60.0"); truncate each term like the reference
            try:
                x, y, w, h = (int(float(v)) for v in box_of[image_id])
            except ValueError:
                raise UserError(f"{files[2]}: image id {image_id} has a non-numeric box") from None
            box = (x, y, x + w, y + h)
        label = label_of[image_id]
        split = "train" if int(label) in train_ids else "test"
        entries.append(Entry(split, f"images/{rel}", label, box))
    return entries


def read_sop(root: Path) -> List[Entry]:
    """Stanford Online Products: the official Ebay_train.txt / Ebay_test.txt files, header line skipped."""
    entries = []
    for split, rel in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        for _, fields in _rows(_annotation(root, "sop", rel), 4, skip=lambda f: f[0] == "image_id"):
            entries.append(Entry(split, fields[3], fields[1]))
    return entries


def read_isc(root: Path) -> List[Entry]:
    """In-shop: split by evaluation_status (train/query/gallery), label = item id string (e.g. id_00000002)."""
    path = _annotation(root, "isc", "Eval/list_eval_partition.txt")
    entries = []
    count_or_header = lambda f: (len(f) == 1 and f[0].isdigit()) or f[0] == "image_name"  # noqa: E731
    for number, fields in _rows(path, 3, skip=count_or_header):
        image, item, status = fields[:3]
        if status not in BENCHMARKS["isc"].splits:
            raise UserError(f"{path}:{number}: unknown evaluation_status {status!r}")
        entries.append(Entry(status, f"Img/{image}", item))
    return entries


READERS: Dict[str, Callable[[Path], List[Entry]]] = {
    "car": read_car,
    "cub": read_cub,
    "demo": lambda root: read_cub(root, "demo"),
    "sop": read_sop,
    "isc": read_isc,
}
