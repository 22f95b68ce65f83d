"""Compare two FastRetri databases query by query (common.compare: AR@K, GE Rate@K, Better Ratio@K).

Example: GeM (p=3) against average pooling (GeM with p=1 = SPoC), the first thing FastRetri adds over
dml_cross_entropy:

    python fastretri/train.py --config-file fastretri/configs/cub.yml
    python fastretri/train.py --config-file fastretri/configs/cub.yml MODEL.HEADS.GEM_P 1 OUTPUT_NAME cub_avgpool
    python fastretri/ablation.py --better_data_base cub_uncropped_resnet50_data_base.pth \
        --worse_data_base cub_avgpool_data_base.pth --save_results
"""
import argparse

from common.compare import compare_runs
from common.errors import run_cli

BETTER = "cub_uncropped_resnet50_data_base.pth"
WORSE = "cub_avgpool_data_base.pth"


def main(args: argparse.Namespace):
    return compare_runs(args.better_data_base, args.worse_data_base, "fastretri",
                        ("DATASETS.NAMES", "DATASETS.CROP_TYPE"), "test", args.retrieval_num, args.save_results)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("FastRetri ablation: compare two databases", add_help=add_help)
    parser.add_argument("--better_data_base", default=BETTER, type=str, help=f"better database (default: {BETTER})")
    parser.add_argument("--worse_data_base", default=WORSE, type=str, help=f"worse database (default: {WORSE})")
    parser.add_argument("--retrieval_num", default=8, type=int, help="retrieval number (default: 8)")
    parser.add_argument("--save_results", action="store_true", help="save the queries the better one wins")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
