"""Train SREML (Squeezed Randomized Ensembles for Metric Learning): REIR's model in its "squeezed" setting.

The stem and layer1 are shared, learners get balanced random meta-classes, no random branch weights; SREML's
own transform (Resize((256, 256)) + flip), batch 12 and long recall list. The model, loss and loop are
``reir``'s; only the defaults differ. Outputs go to ``results/sreml/<data>_<crop>_<model>_*``.

    python sreml/train.py --data_name cub --crop_type cropped --model_type resnet34 --num_epochs 30
"""
import argparse

from common.cli import common_parser
from common.errors import run_cli
from reir.train import add_model_args, main

SREML_RECALLS = "1,2,4,8,10,20,30,40,50,100,1000"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train SREML", add_help=add_help,
                                     parents=[common_parser(data_name="car", batch_size=12, num_epochs=20,
                                                            recalls=SREML_RECALLS)])
    add_model_args(parser, "sreml")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
