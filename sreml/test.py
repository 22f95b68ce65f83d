"""Test a trained SREML model (``reir/test.py`` with SREML's defaults): Recall@K, MAP@R, R-precision, CSV, database.

    python sreml/test.py --data_base car_uncropped_resnet18_data_base.pth
"""
from functools import partial

from common.errors import run_cli
from reir.test import get_args_parser as _parser
from reir.test import main

DEFAULT_DATA_BASE = "car_uncropped_resnet18_data_base.pth"
get_args_parser = partial(_parser, method="sreml", default_data_base=DEFAULT_DATA_BASE)

if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
