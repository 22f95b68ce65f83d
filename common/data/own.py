"""The user's own images: an open-metric-learning style CSV or a folder tree, checked, then indexed like a benchmark.

``read_custom_csv`` / ``read_custom_folder`` turn the source into :class:`Sample` rows, :func:`check_custom` rejects
what would make training or evaluation meaningless, and :func:`prepare_custom` verifies every image (cropping
where boxed) and writes ``<data_path>/<name>/<crop_type>_index.json`` with the evaluation protocol.
"""

import csv
import hashlib
import io
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple

from common.data.archives import Box
from common.data.files import dataset_root, read_text_file, refuse_links_out, write_text_inside
from common.data.images import IMAGE_EXTENSIONS
from common.data.index import INDEX_FORMAT, errors_path, index_path, label_key
from common.data.registry import BENCHMARKS, OWN_NAME
from common.data.verify import Summary, check_images
from common.errors import UserError

__all__ = [
    "CSV_COLUMNS",
    "CSV_FLAGS",
    "CSV_BOX",
    "CSV_SPLITS",
    "Sample",
    "check_custom_name",
    "read_custom_csv",
    "read_custom_folder",
    "check_custom",
    "prepare_custom",
]

CSV_COLUMNS = ("path", "label", "split")  # open-metric-learning's names, so a CSV moves between the two toolkits
CSV_FLAGS = ("is_query", "is_gallery")
CSV_BOX = ("x_1", "y_1", "x_2", "y_2")  # PIL (left, upper, right, lower), as OML crops them
CSV_SPLITS = {"train": "train", "test": "test", "validation": "test"}  # OML names its evaluation split validation
_TRUE, _FALSE = ("true", "1", "yes", "t", "y"), ("false", "0", "no", "f", "n")


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
    if name in BENCHMARKS:
        raise UserError(f"{name!r} is a benchmark name; choose another --data_name for your own data")
    if not OWN_NAME.match(name):
        raise UserError(f"--data_name {name!r}: use letters, digits, '_', '-', '.' (it names the folder data/<name>)")
    return name


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
    both = sorted(train & {s.label for s in samples if s.split != "train"}, key=label_key)
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
        single = sorted((c for c, n in sizes.items() if n == 1), key=label_key)
        if single:
            warnings.append(
                f"{len(single)} test classes have a single image (e.g. {single[0]!r}): no positive to "
                f"find, each counts as a miss in Recall@K"
            )
    return warnings


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
        errors = check_images([t for _, t in tasks], num_workers or os.cpu_count() or 1, f"{name} {crop_type}")
        kept[crop_type] = [s for (s, _), e in zip(tasks, errors) if e is None]
        failures[crop_type] = missing + [e for e in errors if e is not None]
    folder.mkdir(parents=True, exist_ok=True)
    for crop_type in crop_types:
        log = errors_path(data_path, name, crop_type)
        if failures[crop_type]:
            write_text_inside(log, "".join(f"{line}\n" for line in failures[crop_type]))
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
        write_text_inside(index_path(data_path, name, crop_type), json.dumps(doc, indent=0))
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
