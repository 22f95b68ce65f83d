"""Search the gallery of a trained IRT run (cosine) with a query: a new image file (embedded now, centre crop as
in evaluation), a database image, or a folder; each query writes query_img.jpg, retrieval_img_<rank>_<score>.jpg,
grid.png and ranking.csv into results/irt/<query stem>/.

    python irt/inference.py --data_base <run>_data_base.pth --query_img_name my_photo.jpg
"""

from common.cli import script
from common.errors import run_cli
from common.scripts.inference import inference_parser, run_inference
from irt.spec import SPEC

get_args_parser, main = script(inference_parser, run_inference, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
