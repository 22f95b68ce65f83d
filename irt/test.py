"""Evaluate a trained IRT run: Recall@K, MAP@R and R-precision on its test split (In-shop: query vs gallery),
saved as ``results/irt/<run>_test_metrics.csv`` (the shared contract, ``common.scripts.test``). The original had no
test script (its issues #3 and #5 asked for one).

    python irt/test.py --data_base <run>_data_base.pth
    python irt/test.py --model_file results/irt/<run>_model.pth      # --checkpoint is accepted too
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.test import run_test, test_parser
from irt.spec import SPEC

get_args_parser, main = script(test_parser, run_test, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
