"""Retrieve the top K images of a query from a REIR database and draw them as the original did.

The query is a new image file (embedded with the run's ``<run>_model.pth`` beside the database), an image of the
database (its stored feature; excluded from its own results when query and gallery are one split), or a folder
of images. Each query writes ``results/reir/<query stem>/``: query_img.jpg, retrieval_img_<rank>_<score>.jpg
(256x256, 8-px frame, green = same label, red = different; score = mean per-learner cosine), grid.png and
ranking.csv. ``--data_type train`` searches the train split.

    python reir/inference.py --query_img_name data/car/car_ims/008055.jpg --retrieval_num 10 --data_type train
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.inference import inference_parser, run_inference
from reir.spec import SPEC

get_args_parser, main = script(inference_parser, run_inference, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
