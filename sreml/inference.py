"""SREML retrieval: rank a database's gallery for a query (a new image file, a database image, or a folder);
outputs under ``results/sreml/<query stem>/`` (query_img.jpg, retrieval_img_<rank>_<score>.jpg, grid.png,
ranking.csv).

    python sreml/inference.py --query_img_name data/car/car_ims/008055.jpg --retrieval_num 10 --data_type train
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.inference import inference_parser, run_inference
from sreml.spec import SPEC

get_args_parser, main = script(inference_parser, run_inference, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
