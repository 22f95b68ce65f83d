"""Prepare the retrieval datasets: verify every image, crop where asked, and write one JSON index per crop type.

    python data_utils.py --data_path data                      # every dataset folder present (car cub sop isc)
    python data_utils.py --data_path data --data_name cub sop  # only these
    python data_utils.py --data_path data --data_name demo     # synthetic demo, no download needed
"""
import argparse
import os

from common.errors import run_cli
from common.preprocess import DATASET_NAMES, prepare


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options; kept separate from main() so tests and other scripts can reuse them."""
    parser = argparse.ArgumentParser(description="Index (and crop) CARS-196, CUB-200-2011, SOP, In-shop or the demo.")
    parser.add_argument("--data_path", default="data",
                        help="folder holding car/ cub/ sop/ isc/ (raw downloads); indexes are written next to them")
    parser.add_argument("--data_name", nargs="+", choices=DATASET_NAMES, default=None,
                        help="datasets to process (default: every one of car cub sop isc found under --data_path)")
    parser.add_argument("--num_workers", type=_positive_int, default=os.cpu_count() or 1,
                        help="processes used to decode/crop images (default: all cores)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild indexes and crops even if they are up to date")
    return parser


def main(args: argparse.Namespace) -> int:
    """Process the requested datasets; problems the user can fix surface as common.errors.UserError."""
    prepare(args.data_path, args.data_name, args.num_workers, args.force)
    return 0


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
