"""Compare two CGD databases query by query (e.g. gd_config SG vs MG) with REIR's ablation metrics.

AR@K of each database (mean precision@K over queries with a hit), GE Rate@K (share of queries where the first is
at least as good) and Better Ratio@K (wins / losses). Prints them and saves
``results/cgd/<better>----<worse>_ablation.csv``; with ``--save_results`` also every query the better database
wins, rendered with both rankings, into ``results/cgd/<better>----<worse>/<query stem>/``.

    python cgd/ablation.py --better_data_base car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_data_base.pth \
        --worse_data_base car_uncropped_resnet50_MG_1536_0.1_0.5_0.1_128_data_base.pth --save_results
"""
import argparse
from typing import Dict

import pandas as pd

from common.compare import compare_databases
from common.errors import UserError, run_cli
from common.retrieval import DB_SUFFIX, open_database
from common.runio import results_dir


def main(args: argparse.Namespace) -> Dict[str, float]:
    better_path, better = open_database(args.better_data_base, "cgd")
    worse_path, worse = open_database(args.worse_data_base, "cgd")
    for key in ("data_name", "crop_type"):
        if better.config.get(key) != worse.config.get(key):
            raise UserError(f"the databases were built on different data: {key} {better.config.get(key)!r} vs "
                            f"{worse.config.get(key)!r}")
    name = f"{better_path.name.removesuffix(DB_SUFFIX)}----{worse_path.name.removesuffix(DB_SUFFIX)}"
    save_dir = results_dir("cgd") / name if args.save_results else None
    metrics = compare_databases(better, worse, args.data_type, args.retrieval_num, save_dir)
    k = args.retrieval_num
    print(f"better data base AR@{k}: {metrics[f'better_AR@{k}']:.2f}% | worse data base AR@{k}: "
          f"{metrics[f'worse_AR@{k}']:.2f}% | GE Rate@{k}: {metrics[f'GE_Rate@{k}']:.2f}% | "
          f"Better Ratio@{k}: {metrics[f'Better_Ratio@{k}']:.2f} "
          f"({metrics['wins']} wins, {metrics['ties']} ties, {metrics['losses']} losses)")
    csv = results_dir("cgd") / f"{name}_ablation.csv"
    pd.DataFrame([metrics]).to_csv(csv, index=False)
    print(f"saved {csv}" + (f" and the won queries under {save_dir}" if save_dir else ""))
    return metrics


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare two CGD databases (ablation)", add_help=add_help)
    parser.add_argument("--better_data_base", default="car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_data_base.pth",
                        type=str, help="the database expected to be better (path or name under results/cgd/)")
    parser.add_argument("--worse_data_base", default="car_uncropped_resnet50_MG_1536_0.1_0.5_0.1_128_data_base.pth",
                        type=str, help="the database it is compared with (path or name under results/cgd/)")
    parser.add_argument("--data_type", default="test", choices=["test"],
                        help="split compared: the database's query vs gallery (default: test)")
    parser.add_argument("--retrieval_num", default=8, type=int, help="K of the top-K lists (default: 8)")
    parser.add_argument("--save_results", action="store_true", help="render every query the better database wins")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
