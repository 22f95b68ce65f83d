"""Test a trained CGD run: Recall@K, MAP@R and R-precision of its test split, recomputed from the images, saved as
``results/cgd/<run>_test_metrics.csv``; with ``--query_img_name`` one query is also rendered as leftthomas/CGD's
test.py did (query_img.jpg + retrieval_img_<rank>_<Euclidean distance>.jpg, green/red frames, grid.png,
ranking.csv in results/cgd/<query stem>/).

    python cgd/test.py --data_base car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_data_base.pth \\
        --query_img_name data/car/car_ims/008055.jpg --retrieval_num 8
"""

from cgd.spec import SPEC
from common.cli import script
from common.errors import run_cli
from common.scripts.test import run_test, test_parser

get_args_parser, main = script(test_parser, run_test, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
