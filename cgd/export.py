"""Export a trained CGD run's embedding network to ONNX and TorchScript (the shared ``common.export``): RGB floats
in [0, 1] at the evaluation size -> the embedding CGD retrieves with, normalisation inside the graph, and
``embedding.json`` beside it (resize / crop rule, size, mean / std, embedding size, similarity, the run's config).

    python cgd/export.py --data_base <run>_data_base.pth          # -> results/cgd/export/<run>/
    python cgd/export.py --model_file results/cgd/<run>_model.pth --format onnx --output DIR
"""

from cgd.spec import SPEC
from common.cli import script
from common.errors import run_cli
from common.export import export_parser, run_export

get_args_parser, main = script(export_parser, run_export, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
