"""Compare two REIR databases query by query (default: fixed vs random meta-class assignment).

Prints AR@K (mean precision@K over queries with a hit) of each, GE Rate@K (share of queries where the better one
is at least as good) and Better Ratio@K (wins / losses; ``inf`` without losses, where the original divided by
zero). With ``--save_results`` every query the better database wins is drawn under
``results/reir/<better run>----<worse run>/<query stem>/`` (query_img.jpg, better/ and worse/ retrievals).
Self is excluded only when query and gallery are one split (the original's ``is`` string test is fixed).

    python reir/ablation.py --save_results
"""
import argparse
from pathlib import Path

from common.compare import compare_databases
from common.errors import UserError, run_cli
from common.runio import results_dir
from reir.retrieval import DB_SUFFIX, open_database

BETTER = "car_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth"
WORSE = "car_uncropped_random_unrandom_layer1_resnet18_48_12_data_base.pth"


def _prefix(path: Path) -> str:
    return path.name[: -len(DB_SUFFIX)] if path.name.endswith(DB_SUFFIX) else path.stem


def main(args: argparse.Namespace):
    if args.retrieval_num < 1:
        raise UserError(f"--retrieval_num must be positive, got {args.retrieval_num}")
    better_path, better = open_database(args.better_data_base, args.method)
    worse_path, worse = open_database(args.worse_data_base, args.method)
    for key in ("data_name", "crop_type"):
        if better.config.get(key) != worse.config.get(key):
            raise UserError(f"the databases differ in {key}: {better.config.get(key)} vs {worse.config.get(key)}")
    save_dir = None
    if args.save_results:
        save_dir = results_dir(args.method) / f"{_prefix(better_path)}----{_prefix(worse_path)}"
    result = compare_databases(better, worse, args.data_type, args.retrieval_num, save_dir, size=(256, 256))
    k = args.retrieval_num
    print(f"better data base AR@{k}:{result[f'better_AR@{k}']:.2f}% | worse data base AR@{k}:"
          f"{result[f'worse_AR@{k}']:.2f}% | GE Rate@{k}:{result[f'GE_Rate@{k}']:.2f}% | "
          f"Better Ratio@{k}:{result[f'Better_Ratio@{k}']:.2f}")
    if save_dir is not None:
        print(f"wrote the {result['wins']} queries the better database wins to {save_dir}")
    return result


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
