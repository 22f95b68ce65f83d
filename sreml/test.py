"""Test a trained SREML run (the shared contract with SREML's defaults): Recall@K, MAP@R, R-precision recomputed
from the images, saved as ``results/sreml/<run>_test_metrics.csv``; the training database is never overwritten.

    python sreml/test.py --data_base car_uncropped_resnet18_data_base.pth
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.test import run_test, test_parser
from sreml.spec import SPEC

get_args_parser, main = script(test_parser, run_test, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
