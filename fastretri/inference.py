"""Retrieve the most similar gallery images (cosine) for a query with a trained FastRetri run: a new image file, a
database image, or a folder; each query writes query_img.jpg, retrieval_img_<rank>_<score>.jpg, grid.png and
ranking.csv into results/fastretri/<query stem>/.

    python fastretri/inference.py --data_base cub_uncropped_resnet50_data_base.pth --query_img_name my_bird.jpg
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.inference import inference_parser, run_inference
from fastretri.spec import SPEC

get_args_parser, main = script(inference_parser, run_inference, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
