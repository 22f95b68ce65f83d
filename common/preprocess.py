"""Turn the raw CARS-196 / CUB-200-2011 / SOP / In-shop downloads -- or the user's own images, from a CSV or a
folder tree (see :func:`prepare_custom`) -- into one small JSON index per crop type.

The index (``<data_path>/<name>/<crop_type>_index.json``) lists, per split, ``[path, label]`` pairs where the
path is relative to ``<data_path>/<name>`` and the label is the raw dataset label string. Uncropped entries point
at the ORIGINAL image files (nothing is re-encoded, so no JPEG generation loss and no duplicated disk space);
bounding-box crops (car, cub, demo) are written once to ``<name>/cropped/<original sub-path>`` as JPEG quality 95
without chroma subsampling, which is visually lossless. Every image is decoded once here with the opener every
reader uses (``common.images.open_image``: modes, EXIF orientation, pixel limit), so a corrupt, missing or oversized
file is found now (skipped, counted and logged) instead of crashing a training run hours later.

Everything is written inside ``<data_path>/<name>/`` (:func:`write_inside`): a link there that leads out of it is
refused before anything is written, never followed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.errors import UserError
from common.images import max_image_pixels, open_image

INDEX_FORMAT = 1
REAL_DATASETS = ("car", "cub", "sop", "isc")
DATASET_NAMES = REAL_DATASETS + ("demo",)
CROP_TYPES: Dict[str, Tuple[str, ...]] = {
    "car": ("uncropped", "cropped"),
    "cub": ("uncropped", "cropped"),
    "demo": ("uncropped", "cropped"),
    "sop": ("uncropped",),
    "isc": ("uncropped",),
}
SPLITS: Dict[str, Tuple[str, ...]] = {name: ("train", "test") for name in DATASET_NAMES}
SPLITS["isc"] = ("train", "query", "gallery")
CROP_JPEG = {"format": "JPEG", "quality": 95, "subsampling": 0}
CARS_TRAIN_CLASSES = 98  # CARS-196 DML split: classes 1..98 train, 99..196 test

_CUB_FILES = ("images.txt", "image_class_labels.txt", "bounding_boxes.txt")
ANNOTATIONS: Dict[str, Tuple[str, ...]] = {
    "car": ("cars_annos.mat",),
    "cub": _CUB_FILES,
    "demo": _CUB_FILES,
    "sop": ("Ebay_train.txt", "Ebay_test.txt"),
    "isc": ("Eval/list_eval_partition.txt",),
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
            return f"{self.name} {self.crop_type}: index {self.index} is up to date, skipping (use --force to rebuild)"
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


def read_text_file(path: os.PathLike, what: str = "file") -> str:
    """The text of an annotation, CSV or list file, which must be UTF-8 (a leading byte-order mark is dropped);
    anything else is one line naming the file, the line and the byte."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{what} {path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8; the file must be UTF-8 text "
            f"(re-save it as UTF-8)"
        ) from None


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
    "car": read_car,
    "cub": read_cub,
    "demo": lambda root: read_cub(root, "demo"),
    "sop": read_sop,
    "isc": read_isc,
}


# ------------------------------------------------------------------------------------- safe writing

_UMASK = os.umask(0)
os.umask(_UMASK)


class OutsideDataset(ValueError):
    """A write whose path leads out of the dataset folder (through a symbolic link)."""


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (all links followed) to ``root`` (a resolved folder) or below it."""
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def _leaving(root: Path, folder: Path) -> Optional[Path]:
    """The first existing component of ``folder`` (below ``root``) that resolves outside ``root``, else None."""
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        if not os.path.lexists(current):
            return None
        if not _inside(current, root):
            return current
    return None


def make_dirs_inside(root: Path, folder: Path) -> None:
    """``mkdir -p folder`` that never creates or enters anything outside ``root``: the existing components are
    checked first (a symbolic link out of ``root`` raises :class:`OutsideDataset`)."""
    link = _leaving(root, folder)
    if link is not None:
        raise OutsideDataset(f"{link} is a link to {link.resolve()}, outside {root}")
    folder.mkdir(parents=True, exist_ok=True)


def write_inside(root: Path, path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` (below ``root``, the resolved dataset folder) atomically: ``write(file)`` fills a new temp
    file in the checked folder, which then replaces ``path`` (a link there is replaced, never followed). The file
    gets the usual permissions (0666 minus the umask)."""
    make_dirs_inside(root, path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def dataset_root(data_path: os.PathLike, name: str) -> Path:
    """``<data_path>/<name>`` resolved: the one folder data preparation writes into (the folder itself may be a
    link, e.g. to another disk; links inside it may not lead out)."""
    return (Path(data_path) / name).resolve()


def refuse_links_out(root: Path, targets: Sequence[Path], name: str) -> None:
    """One ``error:`` line, before anything is written, when a folder that crops go into leads out of ``root``
    (e.g. ``cropped/`` or ``cropped/images/`` unpacked as a link); otherwise nothing."""
    for folder in dict.fromkeys(t.parent for t in targets):
        link = _leaving(root, folder)
        if link is not None:
            raise UserError(
                f"{name}: {link} is a link to {link.resolve()}, outside the dataset folder {root}; crops are "
                f"written only inside it: replace the link by a folder"
            )


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
    """Pool worker: decode (and crop) one image; return None on success, else a one-line reason."""
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


def _run(tasks: Sequence[tuple], num_workers: int, desc: str) -> List[Optional[str]]:
    max_image_pixels()  # a bad RETRIEVAL_MAX_IMAGE_PIXELS is one error line here, not one per image
    workers = max(1, min(num_workers, len(tasks)))
    bar = dict(total=len(tasks), desc=desc, unit="img", dynamic_ncols=True)
    if workers == 1:
        return list(tqdm(map(_check_image, tasks), **bar))
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    with multiprocessing.Pool(workers) as pool:
        return list(tqdm(pool.imap(_check_image, tasks, chunksize=chunk), **bar))


# --------------------------------------------------------------------------------------------- index


def _atomic_write(path: Path, text: str) -> None:
    """An index or log file of the dataset folder ``path.parent``, written atomically inside it."""
    root = path.parent.resolve()
    write_inside(root, root / path.name, lambda f: f.write(text.encode("utf-8")))


def _up_to_date(index: Path, sources: Sequence[Path], name: str, crop_type: str) -> bool:
    if not index.is_file() or not all(p.is_file() for p in sources):
        return False
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or (data.get("format"), data.get("dataset"), data.get("crop_type")) != (
        INDEX_FORMAT,
        name,
        crop_type,
    ):
        return False
    return index.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in sources)


def process_dataset(
    data_path: os.PathLike, name: str, crop_type: str, num_workers: Optional[int] = None, force: bool = False
) -> Summary:
    """Build (or keep, if newer than its annotations) the index of one dataset / crop type and print a summary."""
    if crop_type not in CROP_TYPES.get(name, ()):
        raise UserError(
            f"crop type {crop_type!r} is not available for {name!r} (available: {', '.join(CROP_TYPES.get(name, ()))})"
        )
    data_path = Path(data_path)
    root = _dataset_dir(data_path, name)
    index = index_path(data_path, name, crop_type)
    summary = Summary(name, crop_type, index)
    if not force and _up_to_date(index, [root / a for a in ANNOTATIONS[name]], name, crop_type):
        summary.up_to_date = True
        print(summary.line())
        return summary
    entries = READERS[name](root)
    _check_annotated_splits(entries, name, root)
    base = dataset_root(data_path, name)
    tasks = [_task(root, base, e, crop_type, force) for e in entries]
    refuse_links_out(base, [t[2] for t in tasks if t[2] is not None], name)
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
            raise UserError(
                f"{name} {crop_type}: none of the {len(entries)} images could be read (see {log}); "
                f"{root} should hold {EXPECTED[name]}"
            )
        empty = [split for split, items in splits.items() if not items]
        if empty:
            raise UserError(
                f"{name} {crop_type}: the {empty[0]} split is empty once the unreadable images are skipped (see {log})"
            )
    else:
        log.unlink(missing_ok=True)  # a stale log from an earlier run would mislead
    doc = {"format": INDEX_FORMAT, "dataset": name, "crop_type": crop_type, "splits": splits}
    _atomic_write(index, json.dumps(doc, indent=0))
    summary.counts = {split: len(items) for split, items in splits.items()}
    summary.skipped = len(failed)
    print(summary.line())
    return summary


def _check_annotated_splits(entries: Sequence[Entry], name: str, root: Path) -> None:
    """One line when the annotations list no image at all, or none for a split (an empty or cut file)."""
    files = ", ".join(str(root / a) for a in ANNOTATIONS[name])
    if not entries:
        raise UserError(f"{name}: the annotation files list no images ({files})")
    present = {e.split for e in entries}
    missing = [split for split in SPLITS[name] if split not in present]
    if missing:
        raise UserError(f"{name}: the annotation files list no {missing[0]} images ({files})")


def _task(root: Path, base: Path, entry: Entry, crop_type: str, force: bool) -> tuple:
    """(name in messages, source, crop target or None, box, force, problem, resolved dataset folder)."""
    src = root / entry.path
    if crop_type == "uncropped":
        return entry.path, src, None, None, force, None, base
    rel = PurePosixPath(entry.path)
    if rel.is_absolute() or ".." in rel.parts:  # keep crops inside <name>/cropped/
        return entry.path, src, None, None, force, "path leaves the dataset folder", base
    return entry.path, src, base / "cropped" / rel, entry.box, force, None, base


def ensure_dataset_main_first(data_path: os.PathLike, data_name: str, crop_type: str) -> Path:
    """:func:`ensure_dataset` for every rank of a DDP run: rank 0 builds a missing dataset (the demo) while the
    others wait, so two processes never write it at once; then every rank checks it."""
    from common.distributed import barrier, is_main_process  # torch only where training needs it

    if is_main_process():
        ensure_dataset(data_path, data_name, crop_type)
    barrier()
    return ensure_dataset(data_path, data_name, crop_type)


def ensure_dataset(data_path: os.PathLike, data_name: str, crop_type: str) -> Path:
    """Return the index path; build the demo on first use, otherwise tell the user the exact command to run."""
    if data_name not in CROP_TYPES:
        return _ensure_custom(data_path, data_name, crop_type)
    if crop_type not in CROP_TYPES[data_name]:
        raise UserError(
            f"crop type {crop_type!r} is not available for {data_name!r} "
            f"(available: {', '.join(CROP_TYPES[data_name])})"
        )
    if data_name == "demo":
        from common.demo import ensure_demo  # local import: demo builds on this module

        ensure_demo(data_path)
    path = index_path(data_path, data_name, crop_type)
    if not path.is_file():
        raise UserError(
            f"no {crop_type} index for {data_name} at {path}; run: "
            f"python data_utils.py --data_path {data_path} --data_name {data_name}"
        )
    return path


def prepare(
    data_path: os.PathLike,
    names: Optional[Sequence[str]] = None,
    num_workers: Optional[int] = None,
    force: bool = False,
) -> List[Summary]:
    """Process the named datasets (all crop types), or every real dataset folder present when names is None."""
    data_path = Path(data_path)
    if not names:
        names = [n for n in REAL_DATASETS if (data_path / n).is_dir()]
        if not names:
            raise UserError(
                f"no dataset folder found under {data_path} (looked for "
                f"{', '.join(n + '/' for n in REAL_DATASETS)}); extract a dataset there "
                f"or use --data_name demo"
            )
    summaries = []
    for name in dict.fromkeys(names):
        if name == "demo":
            from common.demo import demo_is_generated, generate_demo

            if force or not demo_is_generated(data_path / "demo"):
                print(f"generating the synthetic demo dataset in {data_path / 'demo'}")
                generate_demo(data_path / "demo")
        else:
            _dataset_dir(data_path, name)
        for crop_type in CROP_TYPES[name]:
            summaries.append(process_dataset(data_path, name, crop_type, num_workers, force))
    return summaries


# ------------------------------------------------------------------------------------------ own data

CUSTOM_PREPARE = (
    "python data_utils.py --data_path {data_path} --data_name {name} --from_folder DIR (or --from_csv FILE)"
)
CSV_COLUMNS = ("path", "label", "split")  # open-metric-learning's names, so a CSV moves between the two toolkits
CSV_FLAGS = ("is_query", "is_gallery")
CSV_BOX = ("x_1", "y_1", "x_2", "y_2")  # PIL (left, upper, right, lower), as OML crops them
CSV_SPLITS = {"train": "train", "test": "test", "validation": "test"}  # OML names its evaluation split validation
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
_TRUE, _FALSE = ("true", "1", "yes", "t", "y"), ("false", "0", "no", "f", "n")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class Sample:
    """One image of a custom dataset: absolute ``src``, ``where`` it came from (for messages), crop sub-path."""

    split: str
    src: Path
    label: str
    where: str
    box: Optional[Box] = None
    crop_rel: str = ""


def check_custom_name(name: str) -> str:
    """A custom dataset name is a folder name under --data_path and a run-name prefix: keep it plain."""
    if name in CROP_TYPES:
        raise UserError(f"{name!r} is a benchmark name; choose another --data_name for your own data")
    if not _NAME.match(name):
        raise UserError(f"--data_name {name!r}: use letters, digits, '_', '-', '.' (it names the folder data/<name>)")
    return name


def custom_protocol(data_path: os.PathLike, name: str) -> Tuple[str, str]:
    """(query split, gallery split) stored in a custom dataset's index by :func:`prepare_custom`."""
    path = _ensure_custom(data_path, name, "uncropped")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        query, gallery = doc.get("eval_splits") or (("query", "gallery") if "query" in doc["splits"] else ("test",) * 2)
        return str(query), str(gallery)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"corrupt dataset index {path} ({e}); rebuild it with: "
            f"{CUSTOM_PREPARE.format(data_path=data_path, name=name)}"
        ) from None


def _ensure_custom(data_path: os.PathLike, name: str, crop_type: str) -> Path:
    """The index of a dataset that is not a benchmark, or one line saying where it was expected and how to make it."""
    path, base = index_path(data_path, name, crop_type), index_path(data_path, name, "uncropped")
    if path.is_file():
        return path
    if base.is_file():
        raise UserError(
            f"no {crop_type} index for {name} at {path}: it is built only from a CSV with "
            f"{','.join(CSV_BOX)} boxes (available: uncropped)"
        )
    raise UserError(
        f"unknown dataset {name!r}: not a benchmark ({', '.join(DATASET_NAMES)}) and no processed index "
        f"at {base}; create it with: {CUSTOM_PREPARE.format(data_path=data_path, name=name)}"
    )


def _flag(value: str, where: str, column: str) -> Optional[bool]:
    text = value.strip().lower()
    if text in ("", "nan", "none"):
        return None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise UserError(f"{where}: {column} must be True or False, got {value!r}")


def _box(values: List[str], where: str) -> Optional[Box]:
    """x_1,y_1,x_2,y_2 as integers (OML's rule) with x_1 < x_2, y_1 < y_2, all >= 0; four empty cells = no box."""
    texts = [v.strip() for v in values]
    if all(t.lower() in ("", "nan") for t in texts):
        return None
    try:
        numbers = [float(t) for t in texts]
    except ValueError:
        raise UserError(f"{where}: box {','.join(texts)} must be four integers (or four empty cells)") from None
    if not all(n.is_integer() and n >= 0 for n in numbers):
        raise UserError(f"{where}: box {','.join(texts)} must be four non-negative integers")
    x1, y1, x2, y2 = (int(n) for n in numbers)
    if x1 >= x2 or y1 >= y2:
        raise UserError(f"{where}: box {','.join(texts)} needs x_1 < x_2 and y_1 < y_2")
    return x1, y1, x2, y2


def _crop_rel(src: Path, root: Path) -> str:
    """Crop sub-path: the image's path under the dataset root, or a hashed name for an image outside it."""
    try:
        return src.relative_to(root).as_posix()
    except ValueError:
        return f"_outside/{hashlib.sha1(str(src).encode()).hexdigest()[:12]}/{src.name}"


def read_custom_csv(csv_path: os.PathLike, dataset_root: Optional[os.PathLike] = None) -> List[Sample]:
    """Rows of an OML-style CSV: path,label,split (+ is_query,is_gallery) (+ x_1,y_1,x_2,y_2); other columns ignored.

    Relative paths are relative to ``dataset_root`` (default: the CSV's folder, where OML keeps its df.csv).
    Test rows that are both query and gallery (or have no flags) form a ``test`` split ranked against itself;
    rows that are query xor gallery form ``query`` / ``gallery`` splits (In-shop).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"CSV file {csv_path} not found")
    root = Path(os.path.abspath(dataset_root if dataset_root is not None else csv_path.parent))
    reader = csv.reader(io.StringIO(read_text_file(csv_path, "CSV file"), newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise UserError(
                f"{csv_path}: missing column {', '.join(missing)} (needs {','.join(CSV_COLUMNS)}; "
                f"optional {','.join(CSV_FLAGS)} and {','.join(CSV_BOX)}; header: {','.join(header)})"
            )
        for group in (CSV_FLAGS, CSV_BOX):
            present = [c for c in group if c in header]
            if present and len(present) < len(group):
                raise UserError(
                    f"{csv_path}: has {', '.join(present)} but not "
                    f"{', '.join(c for c in group if c not in present)} (give all or none)"
                )
        col = {name: i for i, name in enumerate(header)}
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{csv_path}:{reader.line_num}"
            if len(row) < len(header):
                raise UserError(f"{where}: {len(row)} fields, the header has {len(header)}")
            rows.append((where, {name: row[i] for name, i in col.items()}))
    except csv.Error as e:  # e.g. a field over csv's 128 KiB limit, a NUL byte: not a CSV of this format
        raise UserError(
            f"{csv_path}:{reader.line_num}: not a readable CSV ({e}); expected UTF-8 text with the "
            f"columns {','.join(CSV_COLUMNS)}"
        ) from None
    if not rows:
        raise UserError(f"{csv_path}: no rows below the header")
    samples, flags = [], []
    for where, cells in rows:
        path, label, split = cells["path"].strip(), cells["label"].strip(), cells["split"].strip().lower()
        if not path or not label:
            raise UserError(f"{where}: empty {'path' if not path else 'label'}")
        if split not in CSV_SPLITS:
            raise UserError(f"{where}: split must be train or test (or OML's validation), got {cells['split']!r}")
        split = CSV_SPLITS[split]
        q, g = (_flag(cells[c], where, c) if c in cells else None for c in CSV_FLAGS)
        if split == "train" and (q or g):
            raise UserError(f"{where}: is_query/is_gallery apply to test rows only (train rows leave them empty)")
        if split == "test" and "is_query" in cells and (q is None or g is None or not (q or g)):
            raise UserError(f"{where}: a test row needs is_query and/or is_gallery True")
        box = _box([cells[c] for c in CSV_BOX], where) if "x_1" in cells else None
        src = Path(os.path.abspath(root / path))
        samples.append(Sample(split, src, label, where, box, _crop_rel(src, root)))
        flags.append((q, g))
    return _query_gallery(samples, flags, csv_path)


def _query_gallery(
    samples: List[Sample], flags: List[Tuple[Optional[bool], Optional[bool]]], csv_path: Path
) -> List[Sample]:
    """Turn is_query/is_gallery into splits: all both -> test; each exactly one -> query / gallery."""
    test_flags = {(q, g) for s, (q, g) in zip(samples, flags) if s.split == "test" and q is not None}
    if not test_flags or test_flags == {(True, True)}:
        return samples
    if (True, True) in test_flags:
        raise UserError(
            f"{csv_path}: some test rows are both query and gallery and some only one: use one protocol "
            f"(all both = every test image ranked against the others, or each row query xor gallery)"
        )
    return [
        Sample("query" if q else "gallery", s.src, s.label, s.where, s.box, s.crop_rel) if s.split == "test" else s
        for s, (q, _) in zip(samples, flags)
    ]


def _images_under(folder: Path) -> Tuple[List[Path], int]:
    """Image files below ``folder`` (recursive, sorted, hidden entries skipped) and the number of other files."""
    images, others = [], 0
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            others += 1
    return images, others


def _subdirs(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_custom_folder(folder: os.PathLike, test_ratio: Optional[float] = None, seed: int = 0) -> List[Sample]:
    """``root/<class>/<images>`` split class-disjointly (a seeded ``test_ratio`` of the classes is test: the DML
    protocol, test classes unseen in training), or ``root/train|test/<class>/`` (or train|query|gallery) as given."""
    root = Path(os.path.abspath(folder))
    if not root.is_dir():
        raise UserError(
            f"image folder {folder} not found (expected {folder}/<class>/<image> "
            f"or {folder}/train/<class>/... + {folder}/test/<class>/...)"
        )
    top = _subdirs(root)
    names = {p.name for p in top}
    given = names in ({"train", "test"}, {"train", "query", "gallery"})
    if given and test_ratio is not None:
        raise UserError(
            f"{folder} is already split into {', '.join(sorted(names))}/; --test_ratio applies only to "
            f"a {folder}/<class>/ tree"
        )
    if not given and test_ratio is not None and not 0 < test_ratio < 1:
        raise UserError(f"--test_ratio must be between 0 and 1 (exclusive), got {test_ratio}")
    if not given and names & {"train", "test", "query", "gallery"} and len(names) <= 3:
        print(
            f"warning: {folder} has folders named {', '.join(sorted(names))}; they are read as classes "
            f"(a given split needs exactly train/ + test/ or train/ + query/ + gallery/)",
            file=sys.stderr,
        )
    if given:
        class_dirs = [(p.name, c) for p in top for c in _subdirs(p)]
    else:
        class_dirs = [("", c) for c in top]
    found, others = [], 0
    for split, class_dir in class_dirs:
        images, n_other = _images_under(class_dir)
        others += n_other
        if images:
            found.append((split, class_dir, images))
    if others:
        print(
            f"note: ignored {others} files in {folder} without an image extension ({' '.join(IMAGE_EXTENSIONS)})",
            file=sys.stderr,
        )
    if len(found) < len(class_dirs):
        print(f"note: ignored {len(class_dirs) - len(found)} class folders without images in {folder}", file=sys.stderr)
    if not given:
        found = _split_classes(found, folder, test_ratio, seed)
    samples = [
        Sample(split, p, class_dir.name, str(p), None, p.relative_to(root).as_posix())
        for split, class_dir, images in found
        for p in images
    ]
    if not samples:
        raise UserError(f"no images found under {folder} (expected {folder}/<class>/<image>)")
    return samples


def _split_classes(
    found: List[Tuple[str, Path, List[Path]]], folder: os.PathLike, test_ratio: Optional[float], seed: int
) -> List[Tuple[str, Path, List[Path]]]:
    """Class-disjoint split: shuffle the sorted class names with ``seed``; the first ``test_ratio`` of them are test."""
    ratio = 0.5 if test_ratio is None else test_ratio
    if len(found) < 2:
        raise UserError(f"{folder} needs at least two class folders <class>/ with images to split, found {len(found)}")
    order = sorted(class_dir.name for _, class_dir, _ in found)
    random.Random(seed).shuffle(order)
    test = set(order[: min(len(order) - 1, max(1, round(len(order) * ratio)))])
    return [("test" if class_dir.name in test else "train", class_dir, images) for _, class_dir, images in found]


def _splits_of(samples: Sequence[Sample]) -> Tuple[str, ...]:
    return (
        ("train", "query", "gallery")
        if any(s.split == "query" or s.split == "gallery" for s in samples)
        else ("train", "test")
    )


def check_custom(samples: Sequence[Sample], source: str) -> List[str]:
    """Reject what would make training or evaluation meaningless; return warnings for what Recall@K tolerates."""
    seen: Dict[str, str] = {}
    for s in samples:
        key = os.path.normcase(str(s.src))
        if key in seen:
            raise UserError(f"duplicate path {s.src}: {s.where} repeats {seen[key]} (one row per image)")
        seen[key] = s.where
    for split in _splits_of(samples):
        if not any(s.split == split for s in samples):
            raise UserError(f"{source}: the {split} split is empty")
    train = {s.label for s in samples if s.split == "train"}
    both = sorted(train & {s.label for s in samples if s.split != "train"}, key=_natural)
    if both:
        raise UserError(
            f"{source}: {len(both)} class(es) in both train and test (e.g. {both[0]!r}); the retrieval "
            f"protocol tests on classes unseen in training"
        )
    warnings = []
    if "query" in _splits_of(samples):
        gallery = {s.label for s in samples if s.split == "gallery"}
        lonely = [s for s in samples if s.split == "query" and s.label not in gallery]
        if lonely:
            warnings.append(
                f"{len(lonely)} query images have no gallery image of their class: no positive to "
                f"find, each counts as a miss in Recall@K"
            )
    else:
        sizes: Dict[str, int] = {}
        for s in samples:
            if s.split == "test":
                sizes[s.label] = sizes.get(s.label, 0) + 1
        single = sorted((c for c, n in sizes.items() if n == 1), key=_natural)
        if single:
            warnings.append(
                f"{len(single)} test classes have a single image (e.g. {single[0]!r}): no positive to "
                f"find, each counts as a miss in Recall@K"
            )
    return warnings


def _natural(label: str):
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _stored(src: Path, folder: Path, data_path: Path) -> str:
    """Index path: relative to data/<name>/ for images inside --data_path (the folder moves as one), else absolute."""
    data_abs = Path(os.path.abspath(data_path))
    try:
        src.relative_to(data_abs)
    except ValueError:
        return src.as_posix()
    return PurePosixPath(os.path.relpath(src, os.path.abspath(folder))).as_posix()


def prepare_custom(
    data_path: os.PathLike,
    name: str,
    samples: Sequence[Sample],
    source: str,
    num_workers: Optional[int] = None,
    force: bool = False,
) -> List[Summary]:
    """Verify every image (and crop where boxed), then write ``<data_path>/<name>/<crop_type>_index.json``.

    Nothing is written before every check passed; unreadable or missing images are skipped, counted and listed in
    the errors log like the benchmarks' corrupt files. The index also stores ``eval_splits`` so the methods know
    whether to rank test against itself or query against gallery.
    """
    check_custom_name(name)
    data_path = Path(data_path)
    folder = data_path / name
    warnings = check_custom(samples, source)
    crop_types = ("uncropped", "cropped") if any(s.box for s in samples) else ("uncropped",)
    splits_order = _splits_of(samples)
    kept: Dict[str, List[Sample]] = {}
    failures: Dict[str, List[str]] = {}
    if "cropped" in crop_types:  # crops are written while the images are checked
        folder.mkdir(parents=True, exist_ok=True)
    base = dataset_root(data_path, name)
    for crop_type in crop_types:
        tasks, missing = [], []
        for s in samples:
            if not s.src.is_file():
                missing.append(f"{s.where}: {s.src}: file not found")
                continue
            crop = crop_type == "cropped" and s.box is not None
            dst = base / "cropped" / s.crop_rel if crop else None
            tasks.append((s, (s.where, s.src, dst, s.box, force, None, base)))
        refuse_links_out(base, [t[2] for _, t in tasks if t[2] is not None], name)
        errors = _run([t for _, t in tasks], num_workers or os.cpu_count() or 1, f"{name} {crop_type}")
        kept[crop_type] = [s for (s, _), e in zip(tasks, errors) if e is None]
        failures[crop_type] = missing + [e for e in errors if e is not None]
    folder.mkdir(parents=True, exist_ok=True)
    for crop_type in crop_types:
        log = errors_path(data_path, name, crop_type)
        if failures[crop_type]:
            _atomic_write(log, "".join(f"{line}\n" for line in failures[crop_type]))
        left = {split: sum(s.split == split for s in kept[crop_type]) for split in splits_order}
        if not kept[crop_type]:
            raise UserError(f"{name} {crop_type}: none of the {len(samples)} images could be read (see {log})")
        empty = [split for split, n in left.items() if n == 0]
        if empty:
            raise UserError(
                f"{name} {crop_type}: the {empty[0]} split is empty once the unreadable images are skipped (see {log})"
            )
    if kept["uncropped"] != list(samples):
        warnings = check_custom(kept["uncropped"], source)
    eval_pair = ["query", "gallery"] if "query" in splits_order else ["test", "test"]
    summaries = []
    for crop_type in crop_types:
        splits: Dict[str, List[List[str]]] = {split: [] for split in splits_order}
        for s in kept[crop_type]:
            boxed = crop_type == "cropped" and s.box is not None
            rel = f"cropped/{s.crop_rel}" if boxed else _stored(s.src, folder, data_path)
            splits[s.split].append([rel, s.label])
        doc = {
            "format": INDEX_FORMAT,
            "dataset": name,
            "crop_type": crop_type,
            "splits": splits,
            "eval_splits": eval_pair,
            "source": source,
        }
        _atomic_write(index_path(data_path, name, crop_type), json.dumps(doc, indent=0))
        log = errors_path(data_path, name, crop_type)
        if not failures[crop_type]:
            log.unlink(missing_ok=True)
        summary = Summary(
            name,
            crop_type,
            index_path(data_path, name, crop_type),
            {k: len(v) for k, v in splits.items()},
            len(failures[crop_type]),
            log if failures[crop_type] else None,
        )
        print(summary.line())
        summaries.append(summary)
    if crop_types == ("uncropped",):  # a stale cropped index of an earlier CSV with boxes would mislead
        index_path(data_path, name, "cropped").unlink(missing_ok=True)
        errors_path(data_path, name, "cropped").unlink(missing_ok=True)
    classes = {split: len({s.label for s in kept["uncropped"] if s.split == split}) for split in splits_order}
    print(
        f"{name}: {' / '.join(f'{n} {split}' for split, n in classes.items())} classes; evaluation ranks "
        f"{eval_pair[0]} against {eval_pair[1]}{' (self excluded)' if eval_pair[0] == eval_pair[1] else ''}"
    )
    for line in warnings:
        print(f"warning: {name}: {line}", file=sys.stderr)
    return summaries
