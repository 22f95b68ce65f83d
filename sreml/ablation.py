"""Compare two SREML databases query by query (e.g. a resnet34 against a resnet18 run of the same data); saved as
``results/sreml/<better>----<worse>_ablation.csv``.

    python sreml/ablation.py --better_data_base car_uncropped_resnet34_data_base.pth --save_results
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.ablation import ablation_parser, run_ablation
from sreml.spec import SPEC

BETTER = "car_uncropped_resnet34_data_base.pth"
WORSE = "car_uncropped_resnet18_data_base.pth"

get_args_parser, main = script(ablation_parser, run_ablation, SPEC, BETTER, WORSE)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
