"""Train REIR (Randomized Ensembles for Image Retrieval): E learners on a shared trunk, each a meta-class classifier.

Every training class is mapped, per learner, to one of M meta-classes (``reir.meta_classes``); the loss is the
cross-entropy over meta-classes averaged over samples and learners; Adam 1e-4, lr x0.1 at 50 % and 70 % of the
epochs. Embedding = per-learner L2-normalised logits, concatenated ([N, E*M]); similarity = their mean cosine.
After every epoch: Recall@K, CSV + plot, a checkpoint for ``--resume``; the best model on the first requested rank
and its database go to ``results/reir/<run name>_{model,data_base}.pth``. The data, model and epoch loop are
``reir.engine.train`` (shared with the settings that reuse REIR, which pass their own ``Setting``).

    python reir/train.py --data_name cub --crop_type cropped --model_type resnet34 --num_epochs 50
    torchrun --standalone --nproc_per_node 2 reir/train.py --data_name cub   # DDP, same global batch of 10
"""

import argparse

from common.cli import parse_args_with_config
from common.errors import run_cli
from reir.engine import get_args_parser as engine_parser
from reir.engine import train
from reir.spec import REIR

# --data_name demo: the flags not given take these values (ResNet-18 from scratch on 32-px crops, 4 learners)
DEMO = (
    "--crop_type cropped --pretrained none --ensemble_size 4 --meta_class_size 16 --image_size 32 --batch_size 32 "
    "--num_epochs 5 --lr 1e-3 --num_workers 0"
).split()


def main(args: argparse.Namespace) -> None:
    train(args, REIR)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return engine_parser(REIR, add_help)


if __name__ == "__main__":
    run_cli(main, parse_args_with_config(get_args_parser(), demo=DEMO))
