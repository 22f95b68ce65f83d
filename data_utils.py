"""Prepare the retrieval datasets: verify every image, crop where asked, and write one JSON index per crop type.

python data_utils.py --data_path data                      # every dataset folder present (car cub sop isc)
python data_utils.py --data_path data --data_name cub sop  # only these
python data_utils.py --data_path data --data_name demo     # synthetic demo, no download needed
python data_utils.py --data_path data --data_name mine --from_folder photos/      # photos/<class>/<image>
python data_utils.py --data_path data --data_name mine --from_csv photos/df.csv   # path,label,split[,...]
"""

import argparse
import os
from pathlib import Path

from common.errors import UserError, run_cli
from common.preprocess import (
    DATASET_NAMES,
    check_custom_name,
    prepare,
    prepare_custom,
    read_custom_csv,
    read_custom_folder,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


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
        help="folder holding car/ cub/ sop/ isc/ (raw downloads); indexes are written next to them",
    )
    parser.add_argument(
        "--data_name",
        nargs="+",
        default=None,
        help=f"datasets to process: {' '.join(DATASET_NAMES)} (default: every one of car cub sop isc "
        f"found under --data_path), or one new name with --from_csv / --from_folder",
    )
    parser.add_argument(
        "--num_workers",
        type=_positive_int,
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


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
