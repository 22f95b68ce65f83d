"""Building the processed indexes: the benchmarks and the demo (:func:`prepare`), a dataset on first use
(:func:`ensure_dataset`, which the scripts call), and the command line of ``data_utils.py``.

An uncropped index points at the ORIGINAL image files (nothing is re-encoded, so no JPEG generation loss and no
duplicated disk space); a cropped one at the crops ``common.data.verify`` writes. Everything is written inside
``<data_path>/<name>/`` (``common.data.files.write_inside``).
"""

import argparse
import json
import os
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence

from common.cli import positive_int
from common.data.archives import READERS, Entry, dataset_dir
from common.data.demo import demo_is_generated, generate_demo
from common.data.files import dataset_root, refuse_links_out, write_text_inside
from common.data.index import INDEX_FORMAT, errors_path, index_path, own_index
from common.data.own import check_custom_name, prepare_custom, read_custom_csv, read_custom_folder
from common.data.registry import BENCHMARKS, DATASET_NAMES, REAL_DATASETS
from common.data.verify import Summary, check_images
from common.errors import UserError

__all__ = [
    "process_dataset",
    "prepare",
    "ensure_dataset",
    "ensure_dataset_main_first",
    "ensure_demo",
    "get_args_parser",
    "main",
]

# --------------------------------------------------------------------------------------------- benchmarks


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


def _crop_types(name: str) -> tuple:
    return BENCHMARKS[name].crop_types if name in BENCHMARKS else ()


def process_dataset(
    data_path: os.PathLike, name: str, crop_type: str, num_workers: Optional[int] = None, force: bool = False
) -> Summary:
    """Build (or keep, if newer than its annotations) the index of one dataset / crop type and print a summary."""
    if crop_type not in _crop_types(name):
        raise UserError(
            f"crop type {crop_type!r} is not available for {name!r} (available: {', '.join(_crop_types(name))})"
        )
    data_path = Path(data_path)
    root = dataset_dir(data_path, name)
    index = index_path(data_path, name, crop_type)
    summary = Summary(name, crop_type, index)
    if not force and _up_to_date(index, [root / a for a in BENCHMARKS[name].annotations], name, crop_type):
        summary.up_to_date = True
        print(summary.line())
        return summary
    entries = READERS[name](root)
    _check_annotated_splits(entries, name, root)
    base = dataset_root(data_path, name)
    tasks = [_task(root, base, e, crop_type, force) for e in entries]
    refuse_links_out(base, [t[2] for t in tasks if t[2] is not None], name)
    errors = check_images(tasks, num_workers or os.cpu_count() or 1, f"{name} {crop_type}")
    splits: Dict[str, List[List[str]]] = {split: [] for split in BENCHMARKS[name].splits}
    for entry, error in zip(entries, errors):
        if error is None:
            rel = entry.path if crop_type == "uncropped" else f"cropped/{entry.path}"
            splits.setdefault(entry.split, []).append([rel, entry.label])
    failed = [e for e in errors if e is not None]
    log = errors_path(data_path, name, crop_type)
    if failed:
        write_text_inside(log, "".join(f"{line}\n" for line in failed))
        summary.log = log
        if len(failed) == len(entries):  # nothing readable: a layout mistake, not a few bad files
            raise UserError(
                f"{name} {crop_type}: none of the {len(entries)} images could be read (see {log}); "
                f"{root} should hold {BENCHMARKS[name].expected}"
            )
        empty = [split for split, items in splits.items() if not items]
        if empty:
            raise UserError(
                f"{name} {crop_type}: the {empty[0]} split is empty once the unreadable images are skipped (see {log})"
            )
    else:
        log.unlink(missing_ok=True)  # a stale log from an earlier run would mislead
    doc = {"format": INDEX_FORMAT, "dataset": name, "crop_type": crop_type, "splits": splits}
    write_text_inside(index, json.dumps(doc, indent=0))
    summary.counts = {split: len(items) for split, items in splits.items()}
    summary.skipped = len(failed)
    print(summary.line())
    return summary


def _check_annotated_splits(entries: Sequence[Entry], name: str, root: Path) -> None:
    """One line when the annotations list no image at all, or none for a split (an empty or cut file)."""
    files = ", ".join(str(root / a) for a in BENCHMARKS[name].annotations)
    if not entries:
        raise UserError(f"{name}: the annotation files list no images ({files})")
    present = {e.split for e in entries}
    missing = [split for split in BENCHMARKS[name].splits if split not in present]
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
            if force or not demo_is_generated(data_path / "demo"):
                print(f"generating the synthetic demo dataset in {data_path / 'demo'}")
                generate_demo(data_path / "demo")
        else:
            dataset_dir(data_path, name)
        for crop_type in BENCHMARKS[name].crop_types:
            summaries.append(process_dataset(data_path, name, crop_type, num_workers, force))
    return summaries


# ------------------------------------------------------------------------------------------ first use


def ensure_demo(data_path: os.PathLike, num_workers: Optional[int] = None) -> None:
    """Generate and index the demo on first use, so `--data_name demo` needs no separate preparation step."""
    data_path = Path(data_path)
    crop_types = BENCHMARKS["demo"].crop_types
    if all(index_path(data_path, "demo", c).is_file() for c in crop_types):
        return
    if not demo_is_generated(data_path / "demo"):
        print(f"generating the synthetic demo dataset in {data_path / 'demo'}")
        generate_demo(data_path / "demo")
    for crop_type in crop_types:
        process_dataset(data_path, "demo", crop_type, num_workers)


def ensure_dataset(data_path: os.PathLike, data_name: str, crop_type: str) -> Path:
    """Return the index path; build the demo on first use, otherwise tell the user the exact command to run."""
    if data_name not in BENCHMARKS:
        return own_index(data_path, data_name, crop_type)
    crop_types = BENCHMARKS[data_name].crop_types
    if crop_type not in crop_types:
        raise UserError(
            f"crop type {crop_type!r} is not available for {data_name!r} (available: {', '.join(crop_types)})"
        )
    if data_name == "demo":
        ensure_demo(data_path)
    path = index_path(data_path, data_name, crop_type)
    if not path.is_file():
        raise UserError(
            f"no {crop_type} index for {data_name} at {path}; run: "
            f"python data_utils.py --data_path {data_path} --data_name {data_name}"
        )
    return path


def ensure_dataset_main_first(data_path: os.PathLike, data_name: str, crop_type: str) -> Path:
    """:func:`ensure_dataset` once in every process of a DDP run: rank 0 first, building a missing dataset (the
    demo) while the others wait, so two processes never write it at once."""
    from common.distributed import barrier, is_main_process  # torch only where training needs it

    if is_main_process():
        path = ensure_dataset(data_path, data_name, crop_type)
        barrier()
        return path
    barrier()
    return ensure_dataset(data_path, data_name, crop_type)


# ----------------------------------------------------------------------------------- data_utils.py


def _data_folder(text: str) -> str:
    """--data_path: a folder, or a path whose first existing part is a folder (it is created below it)."""
    path = Path(text)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise argparse.ArgumentTypeError(f"{part} is a file, not a folder")
            return text
    return text


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options; kept separate from main() so tests and other scripts can reuse them."""
    parser = argparse.ArgumentParser(
        description="Index (and crop) CARS-196, CUB-200-2011, SOP, In-shop, the demo, "
        "or your own images (--from_csv / --from_folder)."
    )
    parser.add_argument(
        "--data_path",
        type=_data_folder,
        default="data",
        help=f"folder holding {' '.join(n + '/' for n in REAL_DATASETS)} (raw downloads); indexes are written "
        "next to them",
    )
    parser.add_argument(
        "--data_name",
        nargs="+",
        default=None,
        help=f"datasets to process: {' '.join(DATASET_NAMES)} (default: every one of "
        f"{' '.join(REAL_DATASETS)} found under --data_path), or one new name with --from_csv / --from_folder",
    )
    parser.add_argument(
        "--num_workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="processes used to decode/crop images (default: all cores)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild indexes and crops even if they are up to date")
    own = parser.add_argument_group("your own data (written to <data_path>/<data_name>/)")
    source = own.add_mutually_exclusive_group()
    source.add_argument(
        "--from_csv",
        metavar="FILE",
        help="CSV with columns path,label,split (train/test), optional is_query,is_gallery and "
        "x_1,y_1,x_2,y_2 (open-metric-learning's format)",
    )
    source.add_argument(
        "--from_folder",
        metavar="DIR",
        help="DIR/<class>/<image> (split by class, see --test_ratio) or DIR/train|test/<class>/...",
    )
    own.add_argument(
        "--dataset_root",
        metavar="DIR",
        default=None,
        help="--from_csv: folder the CSV's relative paths start from (default: the CSV's folder)",
    )
    own.add_argument(
        "--test_ratio",
        type=float,
        default=None,
        help="--from_folder DIR/<class>/: fraction of the classes held out for test (default: 0.5)",
    )
    own.add_argument("--seed", type=int, default=0, help="--from_folder: seed of the class split (default: 0)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Process the requested datasets; problems the user can fix surface as common.errors.UserError."""
    own = args.from_csv or args.from_folder
    if not own:
        for flag in ("dataset_root", "test_ratio"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} needs --from_csv or --from_folder")
        unknown = [n for n in args.data_name or () if n not in DATASET_NAMES]
        if unknown:
            raise UserError(
                f"{unknown[0]!r} is not a benchmark ({' '.join(DATASET_NAMES)}); to index your own images "
                f"as {unknown[0]}, add --from_folder DIR or --from_csv FILE"
            )
        prepare(args.data_path, args.data_name, args.num_workers, args.force)
        return 0
    if not args.data_name or len(args.data_name) != 1:
        raise UserError("--from_csv / --from_folder need exactly one --data_name (the new dataset's name)")
    check_custom_name(args.data_name[0])
    if args.from_csv:
        if args.test_ratio is not None:
            raise UserError("--test_ratio applies to --from_folder; a CSV gives each row's split")
        samples, source = read_custom_csv(args.from_csv, args.dataset_root), f"csv:{os.path.abspath(args.from_csv)}"
    else:
        if args.dataset_root is not None:
            raise UserError("--dataset_root applies to --from_csv")
        samples = read_custom_folder(args.from_folder, args.test_ratio, args.seed)
        source = f"folder:{os.path.abspath(args.from_folder)} test_ratio={args.test_ratio} seed={args.seed}"
    prepare_custom(args.data_path, args.data_name[0], samples, source, args.num_workers, args.force)
    return 0
