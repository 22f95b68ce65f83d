"""Export a trained SREML run's embedding network to ONNX and TorchScript (the shared ``common.export``): RGB
floats in [0, 1] at the evaluation size -> the ensemble embedding SREML retrieves with (the E per-learner unit vectors
concatenated and divided by sqrt(E), so a plain inner product is the mean per-learner cosine), normalisation inside
the graph, and ``embedding.json`` beside it (resize / crop rule, size, mean / std, embedding size, similarity, the
run's config).

    python sreml/export.py --data_base <run>_data_base.pth          # -> results/sreml/export/<run>/
    python sreml/export.py --model_file results/sreml/<run>_model.pth --format onnx --output DIR
"""

from common.cli import script
from common.errors import run_cli
from common.export import export_parser, run_export
from sreml.spec import SPEC

get_args_parser, main = script(export_parser, run_export, SPEC)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
