"""The processed index: one small JSON file per dataset and crop type, ``<data_path>/<name>/<crop_type>_index.json``.

``{"format": 1, "dataset": name, "crop_type": crop_type, "splits": {split: [[path, label], ...]}}``, where ``path``
is relative to ``<data_path>/<name>/`` (own data outside ``--data_path`` is stored absolute) and ``label`` is the
raw label string. Own data's index also stores ``eval_splits`` (which split is ranked against which) and
``source`` (the CSV or folder it came from). Nothing is unpickled: an index is plain JSON.

A script reads an index once: :func:`read_index` keeps the parsed file for as long as it is unchanged on disk.
"""

import functools
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

from common.data.registry import BENCHMARKS, DATASET_NAMES
from common.errors import UserError

__all__ = [
    "INDEX_FORMAT",
    "CUSTOM_PREPARE",
    "index_path",
    "errors_path",
    "read_index",
    "load_index",
    "own_index",
    "own_protocol",
    "label_key",
]

INDEX_FORMAT = 1
CUSTOM_PREPARE = (
    "python data_utils.py --data_path {data_path} --data_name {name} --from_folder DIR (or --from_csv FILE)"
)


def index_path(data_path: os.PathLike, name: str, crop_type: str) -> Path:
    """Where the index of one dataset / crop type lives (one place, so readers and writers agree)."""
    return Path(data_path) / name / f"{crop_type}_index.json"


def errors_path(data_path: os.PathLike, name: str, crop_type: str) -> Path:
    """Where the unreadable images of one dataset / crop type are listed."""
    return Path(data_path) / name / f"{crop_type}_errors.log"


def read_index(path: os.PathLike) -> Dict[str, Any]:
    """The parsed index file; parsed once while the file keeps its inode, size and modification time (the callers only
    read it). Raises ``OSError`` / ``ValueError`` like ``json.loads(path.read_text())``."""
    stat = os.stat(path)
    return _parsed(os.path.abspath(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parsed(path: str, inode: int, mtime_ns: int, size: int) -> Dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_index(data_path: os.PathLike, data_name: str, crop_type: str = "uncropped") -> Dict[str, List[Tuple[str, str]]]:
    """Split -> [(image path, raw label)] of a processed index, the paths joined to the dataset folder."""
    path = index_path(data_path, data_name, crop_type)
    if not path.is_file():
        if data_name not in DATASET_NAMES:
            own_index(data_path, data_name, crop_type)  # one line naming the path and the command for own data
        raise UserError(
            f"processed dataset not found: {path}; run `python data_utils.py --data_path {data_path} "
            f"--data_name {data_name}` first"
        )
    try:
        index = read_index(path)
        root = path.parent
        return {
            split: [(_join(root, rel), str(label)) for rel, label in items] for split, items in index["splits"].items()
        }
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt dataset index {path} ({e}); re-run data_utils.py with --force") from None


def _join(root: Path, rel: str) -> str:
    """Image path: ``root/rel``; own datasets store images elsewhere in --data_path as ``../<folder>/...``, which is
    folded so result files show ``data/<folder>/...``; absolute paths (images outside --data_path) stay as they are."""
    path = root / rel
    return os.path.normpath(path) if rel.startswith("../") else str(path)


def own_index(data_path: os.PathLike, name: str, crop_type: str) -> Path:
    """The index of a dataset that is not a benchmark, or one line saying where it was expected and how to make it."""
    path, base = index_path(data_path, name, crop_type), index_path(data_path, name, "uncropped")
    if path.is_file():
        return path
    if base.is_file():
        raise UserError(
            f"no {crop_type} index for {name} at {path}: it is built only from a CSV with "
            f"x_1,y_1,x_2,y_2 boxes (available: uncropped)"
        )
    raise UserError(
        f"unknown dataset {name!r}: not a benchmark ({', '.join(BENCHMARKS)}) and no processed index "
        f"at {base}; create it with: {CUSTOM_PREPARE.format(data_path=data_path, name=name)}"
    )


def own_protocol(data_path: os.PathLike, name: str) -> Tuple[str, str]:
    """(query split, gallery split) stored in an own dataset's index by ``common.data.own.prepare_custom``."""
    path = own_index(data_path, name, "uncropped")
    try:
        doc = read_index(path)
        query, gallery = doc.get("eval_splits") or (("query", "gallery") if "query" in doc["splits"] else ("test",) * 2)
        return str(query), str(gallery)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"corrupt dataset index {path} ({e}); rebuild it with: "
            f"{CUSTOM_PREPARE.format(data_path=data_path, name=name)}"
        ) from None


def label_key(label: str) -> Tuple[int, int, str]:
    """Numeric order for numeric labels ('2' < '10'), text order otherwise."""
    return (0, int(label), "") if label.isdigit() else (1, 0, label)
