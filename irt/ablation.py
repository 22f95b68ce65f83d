"""Compare two IRT databases query by query (e.g. IRT_R vs IRT_L): AR@K, GE Rate@K and Better Ratio@K, saved as
``results/irt/<better>----<worse>_ablation.csv``; ``--save_results`` renders the queries the first one wins.

    python irt/ablation.py --better-db <IRT_R run>_data_base.pth --worse-db <IRT_L run>_data_base.pth
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.ablation import ablation_parser, run_ablation
from irt.spec import SPEC

get_args_parser, main = script(ablation_parser, run_ablation, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
