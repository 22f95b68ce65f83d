"""SREML retrieval demo: ``reir/inference.py`` with SREML's database name (outputs under results/sreml/).

    python sreml/inference.py --retrieval_num 10 --data_type train
"""
from functools import partial

from common.errors import run_cli
from reir.inference import get_args_parser as _parser
from reir.inference import main

DEFAULT_DATA_BASE = "car_uncropped_resnet18_data_base.pth"
get_args_parser = partial(_parser, method="sreml", default_data_base=DEFAULT_DATA_BASE)

if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
