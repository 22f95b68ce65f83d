"""Turn the raw CARS-196 / CUB-200-2011 / SOP / In-shop downloads into one small JSON index per crop type.

The index (``<data_path>/<name>/<crop_type>_index.json``) lists, per split, ``[path, label]`` pairs where the
path is relative to ``<data_path>/<name>`` and the label is the raw dataset label string. Uncropped entries point
at the ORIGINAL image files (nothing is re-encoded, so no JPEG generation loss and no duplicated disk space);
bounding-box crops (car, cub, demo) are written once to ``<name>/cropped/<original sub-path>`` as JPEG quality 95
without chroma subsampling, which is visually lossless. Every image is decoded once here, so a corrupt or missing
file is found now (skipped, counted and logged) instead of crashing a training run hours later.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.errors import UserError

INDEX_FORMAT = 1
REAL_DATASETS = ("car", "cub", "sop", "isc")
DATASET_NAMES = REAL_DATASETS + ("demo",)
CROP_TYPES: Dict[str, Tuple[str, ...]] = {
    "car": ("uncropped", "cropped"), "cub": ("uncropped", "cropped"), "demo": ("uncropped", "cropped"),
    "sop": ("uncropped",), "isc": ("uncropped",),
}
SPLITS: Dict[str, Tuple[str, ...]] = {name: ("train", "test") for name in DATASET_NAMES}
SPLITS["isc"] = ("train", "query", "gallery")
CROP_JPEG = {"format": "JPEG", "quality": 95, "subsampling": 0}
CARS_TRAIN_CLASSES = 98  # CARS-196 DML split: classes 1..98 train, 99..196 test

_CUB_FILES = ("images.txt", "image_class_labels.txt", "bounding_boxes.txt")
ANNOTATIONS: Dict[str, Tuple[str, ...]] = {
    "car": ("cars_annos.mat",), "cub": _CUB_FILES, "demo": _CUB_FILES,
    "sop": ("Ebay_train.txt", "Ebay_test.txt"), "isc": ("Eval/list_eval_partition.txt",),
}
EXPECTED: Dict[str, str] = {
    "car": "cars_annos.mat and car_ims/ (the Stanford Cars DML download)",
    "cub": "the contents of CUB_200_2011/: images.txt, image_class_labels.txt, bounding_boxes.txt, images/",
    "demo": "images.txt, image_class_labels.txt, bounding_boxes.txt, images/ (regenerate with --data_name demo)",
    "sop": "the contents of Stanford_Online_Products/: Ebay_train.txt, Ebay_test.txt, <category>_final/",
    "isc": "Eval/list_eval_partition.txt and Img/img/ (In-shop Clothes Retrieval Benchmark)",
}

Box = Tuple[int, int, int, int]


@dataclass(frozen=True)
class Entry:
    """One annotated image. ``box`` is (left, upper, right, lower) in PIL convention, not yet clipped."""
    split: str
    path: str
    label: str
    box: Optional[Box] = None


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
            return (f"{self.name} {self.crop_type}: index {self.index} is up to date, skipping "
                    f"(use --force to rebuild)")
        counts = " / ".join(f"{n} {split}" for split, n in self.counts.items())
        tail = f" (see {self.log})" if self.log else ""
        return f"{self.name} {self.crop_type}: {counts} images, {self.skipped} skipped{tail}"


# ----------------------------------------------------------------------------------------------- paths

def index_path(data_path: os.PathLike, name: str, crop_type: str) -> Path:
    """Where the index of one dataset / crop type lives (one place, so readers and writers agree)."""
    return Path(data_path) / name / f"{crop_type}_index.json"


def errors_path(data_path: os.PathLike, name: str, crop_type: str) -> Path:
    """Where the unreadable images of one dataset / crop type are listed."""
    return Path(data_path) / name / f"{crop_type}_errors.log"


def _dataset_dir(data_path: Path, name: str) -> Path:
    root = data_path / name
    if not root.is_dir():
        raise UserError(f"dataset folder {root} not found; it should hold {EXPECTED[name]}")
    return root


def _annotation(root: Path, name: str, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise UserError(f"{name}: annotation file {path} not found; {root} should hold {EXPECTED[name]}")
    return path


# --------------------------------------------------------------------------------------------- readers

def _rows(path: Path, min_fields: int, skip: Callable[[List[str]], bool] = lambda f: False
          ) -> List[Tuple[int, List[str]]]:
    """Whitespace-split non-empty lines (In-shop pads columns and leaves trailing spaces, so never split(' '))."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or skip(fields):
                continue
            if len(fields) < min_fields:
                raise UserError(f"{path}:{number}: expected {min_fields} whitespace-separated fields, "
                                f"got {len(fields)}")
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
    files = [_annotation(root, name, rel) for rel in _CUB_FILES]
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
        if status not in SPLITS["isc"]:
            raise UserError(f"{path}:{number}: unknown evaluation_status {status!r}")
        entries.append(Entry(status, f"Img/{image}", item))
    return entries


READERS: Dict[str, Callable[[Path], List[Entry]]] = {
    "car": read_car, "cub": read_cub, "demo": lambda root: read_cub(root, "demo"), "sop": read_sop, "isc": read_isc,
}


# ---------------------------------------------------------------------------------------- image work

def clip_box(box: Box, size: Tuple[int, int]) -> Box:
    """Clip a (left, upper, right, lower) box to the image: PIL would silently pad outside pixels with black."""
    width, height = size
    left, right = (min(max(v, 0), width) for v in (box[0], box[2]))
    upper, lower = (min(max(v, 0), height) for v in (box[1], box[3]))
    if right <= left or lower <= upper:
        raise ValueError(f"bounding box {box} is empty inside the {width}x{height} image")
    return left, upper, right, lower


def _valid_crop(path: Path, size: Tuple[int, int]) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == size
    except Exception:
        return False


def _write_crop(src: Path, dst: Path, box: Box, force: bool) -> None:
    with Image.open(src) as im:
        clipped = clip_box(box, im.size)
        if not force and _valid_crop(dst, (clipped[2] - clipped[0], clipped[3] - clipped[1])):
            return
        crop = im.crop(clipped).convert("RGB")  # crop() decodes; convert handles L, CMYK, P, RGBA
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        crop.save(tmp, **CROP_JPEG)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _check_image(task: tuple) -> Optional[str]:
    """Pool worker: decode (and crop) one image; return None on success, else a one-line reason."""
    rel, src, dst, box, force, problem = task
    try:
        if problem:
            raise ValueError(problem)
        if dst is None:
            with Image.open(src) as im:
                im.load()
        elif box is None:
            raise ValueError("no bounding box annotated")
        else:
            _write_crop(src, dst, box, force)
        return None
    except Exception as e:  # anything unreadable is reported and skipped, never fatal
        return f"{rel}: {type(e).__name__}: {e}"


def _run(tasks: Sequence[tuple], num_workers: int, desc: str) -> List[Optional[str]]:
    workers = max(1, min(num_workers, len(tasks)))
    bar = dict(total=len(tasks), desc=desc, unit="img", dynamic_ncols=True)
    if workers == 1:
        return list(tqdm(map(_check_image, tasks), **bar))
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    with multiprocessing.Pool(workers) as pool:
        return list(tqdm(pool.imap(_check_image, tasks, chunksize=chunk), **bar))


# --------------------------------------------------------------------------------------------- index

def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _up_to_date(index: Path, sources: Sequence[Path], name: str, crop_type: str) -> bool:
    if not index.is_file() or not all(p.is_file() for p in sources):
        return False
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or (data.get("format"), data.get("dataset"), data.get("crop_type")) != (
            INDEX_FORMAT, name, crop_type):
        return False
    return index.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in sources)


def process_dataset(data_path: os.PathLike, name: str, crop_type: str,
                    num_workers: Optional[int] = None, force: bool = False) -> Summary:
    """Build (or keep, if newer than its annotations) the index of one dataset / crop type and print a summary."""
    if crop_type not in CROP_TYPES.get(name, ()):
        raise UserError(f"crop type {crop_type!r} is not available for {name!r} "
                        f"(available: {', '.join(CROP_TYPES.get(name, ()))})")
    data_path = Path(data_path)
    root = _dataset_dir(data_path, name)
    index = index_path(data_path, name, crop_type)
    summary = Summary(name, crop_type, index)
    if not force and _up_to_date(index, [root / a for a in ANNOTATIONS[name]], name, crop_type):
        summary.up_to_date = True
        print(summary.line())
        return summary
    entries = READERS[name](root)
    tasks = [_task(root, e, crop_type, force) for e in entries]
    errors = _run(tasks, num_workers or os.cpu_count() or 1, f"{name} {crop_type}")
    splits: Dict[str, List[List[str]]] = {split: [] for split in SPLITS[name]}
    for entry, error in zip(entries, errors):
        if error is None:
            rel = entry.path if crop_type == "uncropped" else f"cropped/{entry.path}"
            splits.setdefault(entry.split, []).append([rel, entry.label])
    failed = [e for e in errors if e is not None]
    log = errors_path(data_path, name, crop_type)
    if failed:
        _atomic_write(log, "".join(f"{line}\n" for line in failed))
        summary.log = log
        if len(failed) == len(entries):  # nothing readable: a layout mistake, not a few bad files
            raise UserError(f"{name} {crop_type}: none of the {len(entries)} images could be read (see {log}); "
                            f"{root} should hold {EXPECTED[name]}")
    else:
        log.unlink(missing_ok=True)  # a stale log from an earlier run would mislead
    doc = {"format": INDEX_FORMAT, "dataset": name, "crop_type": crop_type, "splits": splits}
    _atomic_write(index, json.dumps(doc, indent=0))
    summary.counts = {split: len(items) for split, items in splits.items()}
    summary.skipped = len(failed)
    print(summary.line())
    return summary


def _task(root: Path, entry: Entry, crop_type: str, force: bool) -> tuple:
    src = root / entry.path
    if crop_type == "uncropped":
        return entry.path, src, None, None, force, None
    rel = PurePosixPath(entry.path)
    if rel.is_absolute() or ".." in rel.parts:  # keep crops inside <name>/cropped/
        return entry.path, src, None, None, force, "path leaves the dataset folder"
    return entry.path, src, root / "cropped" / rel, entry.box, force, None


def ensure_dataset(data_path: os.PathLike, data_name: str, crop_type: str) -> Path:
    """Return the index path; build the demo on first use, otherwise tell the user the exact command to run."""
    if data_name not in CROP_TYPES:
        raise UserError(f"unknown dataset {data_name!r} (choose from {', '.join(DATASET_NAMES)})")
    if crop_type not in CROP_TYPES[data_name]:
        raise UserError(f"crop type {crop_type!r} is not available for {data_name!r} "
                        f"(available: {', '.join(CROP_TYPES[data_name])})")
    if data_name == "demo":
        from common.demo import ensure_demo  # local import: demo builds on this module
        ensure_demo(data_path)
    path = index_path(data_path, data_name, crop_type)
    if not path.is_file():
        raise UserError(f"no {crop_type} index for {data_name} at {path}; run: "
                        f"python data_utils.py --data_path {data_path} --data_name {data_name}")
    return path


def prepare(data_path: os.PathLike, names: Optional[Sequence[str]] = None,
            num_workers: Optional[int] = None, force: bool = False) -> List[Summary]:
    """Process the named datasets (all crop types), or every real dataset folder present when names is None."""
    data_path = Path(data_path)
    if not names:
        names = [n for n in REAL_DATASETS if (data_path / n).is_dir()]
        if not names:
            raise UserError(f"no dataset folder found under {data_path} (looked for "
                            f"{', '.join(n + '/' for n in REAL_DATASETS)}); extract a dataset there "
                            f"or use --data_name demo")
    summaries = []
    for name in dict.fromkeys(names):
        if name == "demo":
            from common.demo import generate_demo, demo_is_generated
            if force or not demo_is_generated(data_path / "demo"):
                print(f"generating the synthetic demo dataset in {data_path / 'demo'}")
                generate_demo(data_path / "demo")
        else:
            _dataset_dir(data_path, name)
        for crop_type in CROP_TYPES[name]:
            summaries.append(process_dataset(data_path, name, crop_type, num_workers, force))
    return summaries
