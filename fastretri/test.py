"""Test a trained FastRetri run: Recall@K, MAP@R and R-precision (cosine) on its evaluation splits, saved as
``results/fastretri/<run>_test_metrics.csv`` (the shared contract, ``common.scripts.test``).

    python fastretri/test.py --data_base cub_uncropped_resnet50_data_base.pth
    python fastretri/test.py --model_file results/fastretri/cub_uncropped_resnet50_model.pth

fast-reid's own spelling works too: ``python fastretri/train.py --config-file ... --eval-only MODEL.WEIGHTS FILE``.
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.test import run_test, test_parser
from fastretri.spec import SPEC

get_args_parser, main = script(test_parser, run_test, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
