"""Compare two REIR databases query by query (default: fixed vs random meta-class assignment).

Prints AR@K (mean precision@K over queries with a hit) of each, GE Rate@K (share of queries where the better one
is at least as good) and Better Ratio@K (wins / losses; ``inf`` without losses, where the original divided by
zero). With ``--save_results`` every query the better database wins is drawn under
``results/reir/<better run>----<worse run>/<query stem>/`` (query_img.jpg, better/ and worse/ retrievals).
Self is excluded only when query and gallery are one split (the original's ``is`` string test is fixed).

    python reir/ablation.py --save_results
"""
import argparse

from common.compare import compare_runs
from common.errors import run_cli

BETTER = "car_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth"
WORSE = "car_uncropped_random_unrandom_layer1_resnet18_48_12_data_base.pth"


def main(args: argparse.Namespace):
    return compare_runs(args.better_data_base, args.worse_data_base, args.method, ("data_name", "crop_type"),
                        args.data_type, args.retrieval_num, args.save_results, size=(256, 256))


def get_args_parser(add_help: bool = True, method: str = "reir", better: str = BETTER,
                    worse: str = WORSE) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"{method.upper()} ablation: compare two databases",
                                     add_help=add_help)
    parser.add_argument("--better_data_base", default=better, type=str, help=f"better database (default: {better})")
    parser.add_argument("--worse_data_base", default=worse, type=str, help=f"worse database (default: {worse})")
    parser.add_argument("--data_type", default="test", choices=["train", "test"],
                        help="retrieval database type (default: test)")
    parser.add_argument("--retrieval_num", default=8, type=int, help="retrieval number (default: 8)")
    parser.add_argument("--save_results", action="store_true", help="save the queries the better one wins")
    parser.set_defaults(method=method)
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
