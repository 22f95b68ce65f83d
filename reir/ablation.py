"""Compare two REIR databases query by query (default: fixed vs random meta-class assignment).

AR@K of each (mean precision@K over queries with a hit), GE Rate@K (share of queries where the better one is at
least as good) and Better Ratio@K (wins / losses; ``inf`` without losses), saved as
``results/reir/<better>----<worse>_ablation.csv``; ``--save_results`` draws every query the better database wins
under ``results/reir/<better run>----<worse run>/<query path relative to the images' folder, '/' -> '__'>/``.

    python reir/ablation.py --save_results
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.ablation import ablation_parser, run_ablation
from reir.spec import SPEC

BETTER = "car_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth"
WORSE = "car_uncropped_random_unrandom_layer1_resnet18_48_12_data_base.pth"

get_args_parser, main = script(ablation_parser, run_ablation, SPEC, BETTER, WORSE)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
