"""Train REIR (Randomized Ensembles for Image Retrieval): E learners on a shared trunk, each a meta-class classifier.

Every training class is mapped, per learner, to one of M meta-classes (``reir.meta_classes``); the loss is the
cross-entropy over meta-classes averaged over samples and learners; Adam 1e-4, lr x0.1 at 50 % and 70 % of the
epochs. Embedding = per-learner L2-normalised logits, concatenated ([N, E*M]); similarity = their mean cosine.
After every epoch: Recall@K, CSV + plot, a checkpoint for ``--resume``; the best model on the first requested rank
and its database (train, test and, for In-shop, query and gallery features) go to
``results/reir/<run name>_{model,data_base}.pth``. The data, model, step and run files are ``reir.recipe``'s
(shared with ``sreml/train.py``); the loop is below.

    python reir/train.py --data_name cub --crop_type cropped --model_type resnet34 --num_epochs 50
    torchrun --standalone --nproc_per_node 2 reir/train.py --data_name cub   # DDP, same global batch of 10
"""

import argparse

import torch

from common.cli import parse_args_with_config, run_summary
from common.distributed import init_distributed, wrap_ddp
from common.errors import run_cli
from reir import recipe
from reir.spec import SPEC

# --data_name demo: the flags not given take these values (ResNet-18 from scratch on 32-px crops, 4 learners)
DEMO = (
    "--crop_type cropped --pretrained none --ensemble_size 4 --meta_class_size 16 --image_size 32 --batch_size 32 "
    "--num_epochs 5 --lr 1e-3 --num_workers 0"
).split()


def main(args: argparse.Namespace) -> None:
    info = init_distributed(use_cuda=torch.cuda.is_available() and args.gpu_ids != "")
    devices = recipe.prepare(args, info, SPEC)
    device = devices[0]
    dtype = torch.float64 if args.float64 else torch.float32
    train_loader, datasets, query, gallery, ids, num_classes = recipe.build_data(args, info, SPEC)

    # ---- model: the learners spread over --gpu_ids (one process) or the whole ensemble per torchrun process
    model, precision = recipe.build_model(args, info, devices, dtype)
    learner_blocks = len(model.sizes)
    model = wrap_ddp(model, info)

    # ---- optimisation: Adam, lr x0.1 at 50 % and 70 % of the epochs
    optimizer, scheduler = recipe.build_optimizer(model, args)

    # ---- epochs
    run = recipe.build_run(args, SPEC, num_classes, learner_blocks, query, gallery)
    start, state = run.resume(args.resume, model, optimizer, scheduler, precision.scaler)
    if "ids" in state:
        ids.copy_(state["ids"])

    evaluate_now = recipe.evaluator(model, datasets, query, gallery, device, args)
    if start == 1:
        run.log(0, {}, evaluate_now(), model)
    for epoch in range(start, args.num_epochs + 1):
        train_loader.batch_sampler.set_epoch(epoch)
        train_stats = recipe.train_one_epoch(
            model,
            optimizer,
            train_loader,
            device,
            epoch,
            args.num_epochs,
            precision=precision,
            dtype=dtype,
            log_step=run.log_step,
        )
        scheduler.step()
        run.log(epoch, train_stats, evaluate_now(), model)
        run.checkpoint(epoch, model, optimizer, scheduler, precision.scaler, ids=ids)
    run.finish()
    if info.rank == 0:
        print(run_summary(run), flush=True)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return recipe.get_args_parser(
        SPEC, add_help, data_name="car", batch_size=10, num_epochs=20, recalls=SPEC.default_recalls
    )


if __name__ == "__main__":
    run_cli(main, parse_args_with_config(get_args_parser(), demo=DEMO))
