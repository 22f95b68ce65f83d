"""Train SREML (Squeezed Randomized Ensembles for Metric Learning): REIR's model in its "squeezed" setting.

The stem and layer1 are shared, learners get balanced random meta-classes, no random branch weights; SREML's
own transform (Resize((256, 256)) + flip), batch 12 and long recall list (``sreml.spec.SETTING``). The model, loss
and epoch loop are ``reir.engine.train``'s; outputs go to ``results/sreml/<data>_<crop>_<model>_*``.

    python sreml/train.py --data_name cub --crop_type cropped --model_type resnet34 --num_epochs 30
    torchrun --standalone --nproc_per_node 2 sreml/train.py --data_name cub   # DDP, same global batch of 12
"""

import argparse

from common.cli import parse_args_with_config
from common.errors import run_cli
from reir.engine import get_args_parser as engine_parser
from reir.engine import train
from sreml.spec import SETTING

# --data_name demo: the flags not given take these values (ResNet-18 from scratch on 32-px crops, 4 learners; SREML's
# own batch of 12: at REIR's demo batch the two settings would compute the same on this data)
DEMO = (
    "--crop_type cropped --pretrained none --ensemble_size 4 --meta_class_size 16 --image_size 32 --num_epochs 5 "
    "--lr 1e-3 --num_workers 0 --recalls 1,2,4,8"
).split()


def main(args: argparse.Namespace) -> None:
    train(args, SETTING)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return engine_parser(SETTING, add_help)


if __name__ == "__main__":
    run_cli(main, parse_args_with_config(get_args_parser(), demo=DEMO))
