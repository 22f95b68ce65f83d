"""Compare two CGD databases query by query (e.g. gd_config SG vs MG) with REIR's ablation metrics.

AR@K of each database (mean precision@K over queries with a hit), GE Rate@K (share of queries where the first is
at least as good) and Better Ratio@K (wins / losses); saved as ``results/cgd/<better>----<worse>_ablation.csv``;
``--save_results`` renders every query the better database wins.

    python cgd/ablation.py --better_data_base car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_data_base.pth \\
        --worse_data_base car_uncropped_resnet50_MG_1536_0.1_0.5_0.1_128_data_base.pth --save_results
"""

from cgd.spec import SPEC
from common.cli import script
from common.errors import run_cli
from common.scripts.ablation import ablation_parser, run_ablation

BETTER = "car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_data_base.pth"
WORSE = "car_uncropped_resnet50_MG_1536_0.1_0.5_0.1_128_data_base.pth"


get_args_parser, main = script(ablation_parser, run_ablation, SPEC, BETTER, WORSE)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
