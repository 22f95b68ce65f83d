"""Compare two SREML databases query by query: ``reir/ablation.py`` for runs under results/sreml/
(e.g. a resnet18 against a resnet34 run of the same dataset and crop type).

    python sreml/ablation.py --better_data_base car_uncropped_resnet34_data_base.pth --save_results
"""
from functools import partial

from common.errors import run_cli
from reir.ablation import get_args_parser as _parser
from reir.ablation import main

get_args_parser = partial(_parser, method="sreml", better="car_uncropped_resnet34_data_base.pth",
                          worse="car_uncropped_resnet18_data_base.pth")

if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
