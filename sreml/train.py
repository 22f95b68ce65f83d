"""Train SREML (Squeezed Randomized Ensembles for Metric Learning): REIR's model in its "squeezed" setting.

The stem and layer1 are shared, learners get balanced random meta-classes, no random branch weights (the spec's
``fixed`` flags); SREML's own transform (Resize((256, 256)) + flip), batch 12 and long recall list
(``sreml.spec.SPEC``). The data, model, step and run files are ``reir.recipe``'s; the loop, REIR's, is below;
outputs go to ``results/sreml/<data>_<crop>_<model>_*``.

    python sreml/train.py --data_name cub --crop_type cropped --model_type resnet34 --num_epochs 30
    torchrun --standalone --nproc_per_node 2 sreml/train.py --data_name cub   # DDP, same global batch of 12
"""

import argparse

import torch

from common.cli import parse_args_with_config, run_summary
from common.distributed import init_distributed, wrap_ddp
from common.errors import run_cli
from reir import recipe
from sreml.spec import SPEC

# --data_name demo: the flags not given take these values (ResNet-18 from scratch on 32-px crops, 4 learners; SREML's
# own batch of 12: at REIR's demo batch the two settings would compute the same on this data)
DEMO = (
    "--crop_type cropped --pretrained none --ensemble_size 4 --meta_class_size 16 --image_size 32 --num_epochs 5 "
    "--lr 1e-3 --num_workers 0 --recalls 1,2,4,8"
).split()


def main(args: argparse.Namespace) -> None:
    info = init_distributed(use_cuda=torch.cuda.is_available() and args.gpu_ids != "")
    devices = recipe.prepare(args, info, SPEC)
    device = devices[0]
    dtype = torch.float64 if args.float64 else torch.float32
    train_loader, datasets, query, gallery, ids, num_classes = recipe.build_data(args, info, SPEC)

    # ---- model: stem + layer1 shared, the learners spread over --gpu_ids or the whole ensemble per process
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
        SPEC, add_help, data_name="car", batch_size=12, num_epochs=20, recalls=SPEC.default_recalls
    )


if __name__ == "__main__":
    run_cli(main, parse_args_with_config(get_args_parser(), demo=DEMO))
