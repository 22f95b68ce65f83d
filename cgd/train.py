"""Train CGD (Combination of multiple Global Descriptors, Jun et al. 2019) as leftthomas/CGD did.

M-per-class batches (m = 4), Adam lr 1e-4, lr x0.1 at 60 % and 80 % of the epochs, loss = label-smoothing
cross-entropy (auxiliary classifier) + batch-hard triplet (combined embedding). After every epoch: Recall@K on
the test split (In-shop: query vs gallery), CSV + plot, a checkpoint for ``--resume``; the best model on the first
requested rank (among trained epochs) and its database go to ``results/cgd/<run name>_{model,data_base}.pth``.

    python cgd/train.py --feature_dim 512 --gd_config SM
    torchrun --standalone --nproc_per_node 4 cgd/train.py --feature_dim 512   # DDP, same global batch of 128
"""

import argparse
from typing import Callable, Dict, Optional

import torch
from thop import clever_format
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cgd.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropyLoss
from cgd.model import BACKBONE_TYPES, GD_CONFIGS, MODEL_KEYS, Model, count_flops, embed, freeze_bn
from cgd.spec import SPEC, cgd_run_name
from common.backbones import backbone_choice
from common.cli import (
    add_config_flag,
    add_model_selection,
    bool_pair,
    common_parser,
    non_negative_float,
    parse_args_with_config,
    positive_float,
    positive_int,
    run_summary,
    validate_args,
    write_args_yaml,
)
from common.data.datasets import eval_splits, load_splits
from common.data.prepare import ensure_dataset_main_first
from common.device import Precision, data_parallel, first_device, main_device, maybe_compile, upcast
from common.distributed import (
    DistInfo,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_mean,
    init_distributed,
    is_main_process,
    wrap_ddp,
)
from common.engine import Evaluation, Run, check_finite, evaluate
from common.errors import UserError, run_cli
from common.runio import plain_config, set_seed
from common.runs import RunFiles, results_dir
from common.samplers import MPerClassSampler, RankBatchSampler

M_PER_CLASS = 4  # images per class in a batch (the original's MPerClassSampler m)
# --data_name demo: the flags not given take these values (ResNet-18 from scratch on 32-px crops, ~2 min on 2 cores)
DEMO = (
    "--crop_type cropped --backbone_type resnet18 --pretrained none --no-freeze_bn --lr 1e-3 --image_size 32 "
    "--batch_size 32 --num_epochs 15 --feature_dim 512 --num_workers 0"
).split()
# Keys a resumed run must share with its checkpoint (besides the model-defining ones).
RESUME_KEYS = MODEL_KEYS + (
    "smoothing",
    "temperature",
    "margin",
    "batch_size",
    "num_epochs",
    "seed",
    "freeze_bn",
    "lr",
    "float64",
    "augment",
)


def train_one_epoch(
    model: nn.Module,
    criteria: Dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    num_epochs: int,
    *,
    precision: Optional[Precision] = None,
    frozen_bn: bool = True,
    dtype: torch.dtype = torch.float32,
    log_step: Optional[Callable[..., None]] = None,
) -> Dict[str, float]:
    """One pass over the sampler's batches; returns the mean loss, the auxiliary classifier's accuracy (%) and the
    learning rate. ``precision``: autocast / scaler / channels-last (default: full precision); ``log_step(loss,
    lr)`` after every step (``Run.log_step``).

    Under DDP the batch-hard triplet loss sees the embeddings of the global batch (gathered with gradients), the
    cross-entropy its own slice (DDP averages it over ranks), so the step is the 1-process step."""
    precision = precision or Precision(device)
    model.train()
    if frozen_bn:
        freeze_bn(model)
    sums, steps = torch.zeros(2, dtype=torch.float64), 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, dynamic_ncols=True, disable=not is_main_process())
    for images, labels in bar:
        images, labels = images.to(device, dtype, non_blocking=True), labels.to(device, non_blocking=True)
        with precision.autocast():
            embeddings, logits = model(precision.images(images))
        triplet = criteria["triplet"](all_gather_with_grad(upcast(embeddings)), all_gather_no_grad(labels))
        loss = criteria["class"](upcast(logits), labels) + triplet
        check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer)
        accuracy = (logits.argmax(dim=-1) == labels).double().mean()
        step_stats = all_reduce_mean(torch.stack([loss.detach().double(), accuracy]).cpu())
        sums += step_stats
        steps += 1
        if log_step is not None:
            log_step(step_stats[0], lr)
        bar.set_description(
            f"Train Epoch {epoch}/{num_epochs} Loss:{sums[0] / steps:.4f} Acc:{100.0 * sums[1] / steps:.2f}%"
        )
    steps = max(1, steps)
    return {"train_loss": float(sums[0] / steps), "train_accuracy": 100.0 * float(sums[1] / steps), "lr": lr}


def build_data(args: argparse.Namespace, info: DistInfo):
    """Datasets, and the train loader: global m-per-class batches, each rank taking its slice (classes intact)."""
    ensure_dataset_main_first(args.data_path, args.data_name, args.crop_type)
    query, gallery = eval_splits(args.data_name, args.data_path)
    test_tf = SPEC.transform(vars(args), False)
    train_tf = SPEC.transform(vars(args), True) if args.augment else test_tf
    datasets = load_splits(
        args.data_path, args.data_name, args.crop_type, {"train": train_tf, query: test_tf, gallery: test_tf}
    )
    validate_args(args, gallery_size=len(datasets[gallery]), self_excluded=query == gallery)
    try:
        sampler = MPerClassSampler(datasets["train"].labels, args.batch_size, M_PER_CLASS, seed=args.seed)
    except ValueError as e:
        raise UserError(f"--batch_size {args.batch_size}: {e}") from None
    sampler = RankBatchSampler(sampler, info.rank, info.world_size, datasets["train"].labels)
    train_loader = DataLoader(
        datasets["train"], batch_sampler=sampler, num_workers=args.num_workers, pin_memory=torch.cuda.is_available()
    )
    return train_loader, datasets, query, gallery


def check_args(args: argparse.Namespace, info: DistInfo) -> None:
    if args.batch_size % M_PER_CLASS != 0:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of {M_PER_CLASS} (images per class)")
    if args.batch_size % (M_PER_CLASS * info.world_size) != 0:
        raise UserError(
            f"--batch_size {args.batch_size} (the global batch) must split into {info.world_size} "
            f"processes x a multiple of {M_PER_CLASS} images"
        )


def main(args: argparse.Namespace) -> None:
    info = init_distributed(use_cuda=torch.cuda.is_available() and args.gpu_ids != "")
    check_args(args, info)
    if info.rank == 0:
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())), flush=True)
        if args.freeze_bn and args.pretrained == "none" and not args.resume:
            print(
                "note: --freeze_bn with --pretrained none keeps the BatchNorm statistics of a random network "
                "(mean 0, var 1); use --no-freeze_bn when training from scratch",
                flush=True,
            )
    set_seed(args.seed)
    gpu_ids = [] if info.distributed else first_device(args.gpu_ids)
    device = info.device if info.distributed else main_device(gpu_ids)
    dtype = torch.float64 if args.float64 else torch.float32
    train_loader, datasets, query, gallery = build_data(args, info)
    num_classes = train_loader.dataset.num_classes

    # ---- model: one process (DataParallel over --gpu_ids) or one DDP process per GPU/CPU under torchrun
    model = Model(
        args.backbone_type,
        args.gd_config,
        args.feature_dim,
        num_classes,
        pretrained="none" if args.resume else args.pretrained,
    ).to(dtype)
    if info.rank == 0:
        params, flops = count_flops(model, args.image_size or 224)
        print("# Model Params: {} FLOPs: {}".format(*clever_format([params, flops])), flush=True)
    precision = Precision.build(device, args.amp, args.amp_dtype, float64=args.float64, main=info.rank == 0)
    model = maybe_compile(precision.model(model.to(device)), args.compile, device, len(gpu_ids))
    model = wrap_ddp(model, info) if info.distributed else data_parallel(model, gpu_ids)

    # ---- optimisation
    criteria = {
        "class": LabelSmoothingCrossEntropyLoss(args.smoothing, args.temperature),
        "triplet": BatchHardTripletLoss(args.margin),
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    milestones = [int(0.6 * args.num_epochs), int(0.8 * args.num_epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    # ---- epochs
    config = {**plain_config(args), "num_classes": num_classes, "method": "cgd"}
    run = Run(
        RunFiles(results_dir("cgd"), cgd_run_name(config)),
        config,
        RESUME_KEYS,
        "cgd",
        args.num_epochs,
        recalls=args.recalls,
        selection=args.model_selection,
        database={"metric": "euclidean", "query": query, "gallery": gallery},
    )
    if info.rank == 0:
        write_args_yaml(args, run.files.path("args.yaml"), "cgd/train.py")
    start, _ = run.resume(args.resume, model, optimizer, scheduler, precision.scaler)

    def evaluate_now() -> Evaluation:
        return evaluate(
            model,
            datasets,
            query,
            gallery,
            args.recalls,
            device,
            embed=embed,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            amp=args.amp,
        )

    if start == 1:
        run.log(0, {}, evaluate_now(), model)
    for epoch in range(start, args.num_epochs + 1):
        train_loader.batch_sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            model,
            criteria,
            optimizer,
            train_loader,
            device,
            epoch,
            args.num_epochs,
            precision=precision,
            frozen_bn=args.freeze_bn,
            dtype=dtype,
            log_step=run.log_step,
        )
        scheduler.step()
        run.log(epoch, train_stats, evaluate_now(), model)
        run.checkpoint(epoch, model, optimizer, scheduler, precision.scaler)
    run.finish()
    if info.rank == 0:
        print(run_summary(run), flush=True)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train CGD",
        add_help=add_help,
        parents=[common_parser(data_name="car", batch_size=128, num_epochs=20, recalls="1,2,4,8")],
    )
    g = parser.add_argument_group("CGD model")
    g.add_argument(
        "--backbone_type",
        default="resnet50",
        type=backbone_choice(BACKBONE_TYPES),
        metavar="{" + ",".join(BACKBONE_TYPES) + ",timm:NAME}",
        help="backbone network type: a ResNet, or any timm model as timm:NAME, e.g. timm:vit_small_patch16_224.dino "
        "(default: resnet50; resnet18/34 are additions for small runs)",
    )
    g.add_argument(
        "--gd_config",
        default="SG",
        type=str,
        choices=GD_CONFIGS,
        help="global descriptors in order, S=SPoC M=MAC G=GeM; the first feeds the classifier (default: SG)",
    )
    g.add_argument(
        "--feature_dim",
        default=1536,
        type=positive_int,
        help="embedding size, divisible by the number of descriptors (default: 1536)",
    )
    bool_pair(g, "freeze_bn", True, "keep the backbone BatchNorm2d running statistics frozen, as leftthomas/CGD")
    g = parser.add_argument_group("CGD loss")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing epsilon (default: 0.1)")
    g.add_argument("--temperature", default=0.5, type=positive_float, help="softmax temperature (default: 0.5)")
    g.add_argument("--margin", default=0.1, type=float, help="triplet margin m (default: 0.1)")
    g = parser.add_argument_group("optimizer")
    g.add_argument(
        "--lr",
        default=1e-4,
        type=non_negative_float,
        help="Adam learning rate, x0.1 at 60%% and 80%% of the epochs (default: 1e-4, the original's)",
    )
    add_model_selection(g, "best", "the original kept the best R@1", "--recalls")
    add_config_flag(parser)
    return parser


if __name__ == "__main__":
    run_cli(main, parse_args_with_config(get_args_parser(), demo=DEMO))
