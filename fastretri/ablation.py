"""Compare two FastRetri databases query by query (common.compare: AR@K, GE Rate@K, Better Ratio@K).

Example: GeM (p=3) against average pooling (GeM with p=1 = SPoC), the first thing FastRetri adds over
dml_cross_entropy:

    python fastretri/train.py --config-file fastretri/configs/cub.yml
    python fastretri/train.py --config-file fastretri/configs/cub.yml MODEL.HEADS.GEM_P 1 OUTPUT_NAME cub_avgpool
    python fastretri/ablation.py --better_data_base cub_uncropped_resnet50_data_base.pth \
        --worse_data_base cub_avgpool_data_base.pth --save_results
"""
import argparse

from common.compare import compare_databases
from common.errors import UserError, run_cli
from common.runio import results_dir
from fastretri.inference import DB_SUFFIX, open_database

BETTER = "cub_uncropped_resnet50_data_base.pth"
WORSE = "cub_avgpool_data_base.pth"


def main(args: argparse.Namespace):
    if args.retrieval_num < 1:
        raise UserError(f"--retrieval_num must be positive, got {args.retrieval_num}")
    better_path, better = open_database(args.better_data_base)
    worse_path, worse = open_database(args.worse_data_base)
    for key in ("DATASETS.NAMES", "DATASETS.CROP_TYPE"):
        if better.config.get(key) != worse.config.get(key):
            raise UserError(f"the databases differ in {key}: {better.config.get(key)} vs {worse.config.get(key)}")
    save_dir = None
    if args.save_results:
        prefix = [p.name[: -len(DB_SUFFIX)] for p in (better_path, worse_path)]
        save_dir = results_dir("fastretri") / f"{prefix[0]}----{prefix[1]}"
    result = compare_databases(better, worse, "test", args.retrieval_num, save_dir)
    k = args.retrieval_num
    print(f"better data base AR@{k}:{result[f'better_AR@{k}']:.2f}% | worse data base AR@{k}:"
          f"{result[f'worse_AR@{k}']:.2f}% | GE Rate@{k}:{result[f'GE_Rate@{k}']:.2f}% | "
          f"Better Ratio@{k}:{result[f'Better_Ratio@{k}']:.2f}")
    if save_dir is not None:
        print(f"wrote the {result['wins']} queries the better database wins to {save_dir}")
    return result


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("FastRetri ablation: compare two databases", add_help=add_help)
    parser.add_argument("--better_data_base", default=BETTER, type=str, help=f"better database (default: {BETTER})")
    parser.add_argument("--worse_data_base", default=WORSE, type=str, help=f"worse database (default: {WORSE})")
    parser.add_argument("--retrieval_num", default=8, type=int, help="retrieval number (default: 8)")
    parser.add_argument("--save_results", action="store_true", help="save the queries the better one wins")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
