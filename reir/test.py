"""Test a trained REIR run: Recall@K, MAP@R and R-precision of its test split (ranking by the mean per-learner
cosine), recomputed from the images with ``<run>_model.pth``, saved as ``results/reir/<run>_test_metrics.csv``;
the training database is never overwritten. ``--query_img_name`` also renders one query.

    python reir/test.py --data_base car_uncropped_fixed_random_layer1_resnet18_48_12_data_base.pth
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.test import run_test, test_parser
from reir.spec import SPEC

get_args_parser, main = script(test_parser, run_test, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
