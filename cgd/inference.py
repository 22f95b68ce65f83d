"""Retrieve the nearest gallery images of a query with a trained CGD run (Euclidean distance, smaller first).

The query is a new image file (embedded with the run's ``<run>_model.pth`` beside the database), an image of the
database (its stored feature; excluded from its own results), or a folder of images. Each query writes
query_img.jpg, retrieval_img_<rank>_<distance>.jpg, grid.png and ranking.csv into results/cgd/<query stem>/.

    python cgd/inference.py --query_img_name data/car/car_ims/008055.jpg --retrieval_num 10
"""

from cgd.spec import SPEC
from common.cli import script
from common.errors import run_cli
from common.scripts.inference import inference_parser, run_inference

get_args_parser, main = script(inference_parser, run_inference, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
