"""Compare two FastRetri databases query by query (AR@K, GE Rate@K, Better Ratio@K).

Example: GeM (p=3) against average pooling (GeM with p=1 = SPoC), the first thing FastRetri adds over
dml_cross_entropy::

    python fastretri/train.py --config-file fastretri/configs/cub.yml
    python fastretri/train.py --config-file fastretri/configs/cub.yml MODEL.HEADS.GEM_P 1 OUTPUT_NAME cub_avgpool
    python fastretri/ablation.py --better_data_base cub_uncropped_resnet50_data_base.pth \\
        --worse_data_base cub_avgpool_data_base.pth --save_results
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.ablation import ablation_parser, run_ablation
from fastretri.spec import SPEC

BETTER = "cub_uncropped_resnet50_data_base.pth"
WORSE = "cub_avgpool_data_base.pth"


get_args_parser, main = script(ablation_parser, run_ablation, SPEC, BETTER, WORSE)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
