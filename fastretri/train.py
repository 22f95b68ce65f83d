"""Train FastRetri (fast-reid projects/FastRetri): a classification baseline for fine-grained image retrieval.

    python fastretri/train.py --config-file fastretri/configs/cub.yml --num-gpus 4 [KEY VALUE ...]
    torchrun --standalone --nproc_per_node 4 fastretri/train.py --config-file fastretri/configs/cub.yml
    python fastretri/train.py --config-file fastretri/configs/cub.yml --eval-only MODEL.WEIGHTS path/to/model.pth

ResNet-50 with frozen BN and last stride 1, GeM, BNNeck and a bias-free classifier, trained with label-smoothed
cross-entropy (SGD, 1k-iteration warm-up, per-epoch cosine, global-norm gradient clipping, AMP on CPU and CUDA) on
fast-reid's endless shuffled stream of training images. One process per GPU with DistributedDataParallel, or CPU
processes with gloo (``--num-gpus N`` / ``--num-procs N`` start them through torchrun's launcher); the global batch
stays SOLVER.IMS_PER_BATCH. Evaluation always runs in float32.
"""

import argparse
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.cli import add_model_selection, common_parser, non_negative_int, positive_int, run_summary, validate_args
from common.data.datasets import eval_splits
from common.device import Precision, maybe_compile, parse_gpu_ids
from common.distributed import (
    all_reduce_mean,
    barrier,
    init_process,
    launch_elastic,
    launched_by_torchrun,
    share_cpu_cores,
    wrap_ddp,
)
from common.engine import Evaluation, Run, check_finite, evaluate
from common.errors import UserError, run_cli
from common.runio import atomic_save, set_seed
from common.scripts.test import run_test
from fastretri.config import (
    MODEL_KEYS,
    RESUME_FREE,
    config_dict,
    data_name,
    pretrained_source,
    resolve_config,
    run_files,
    write_config,
)
from fastretri.data import build_datasets, build_train_sampler, build_transforms
from fastretri.losses import FastRetriLoss
from fastretri.model import build_model
from fastretri.solver import build_optimizer, clipper_from_config, schedule_from_config, set_lr
from fastretri.spec import SPEC, embed


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    *,
    schedule,
    precision: Optional[Precision] = None,
    clip: Optional[Callable[[torch.optim.Optimizer], None]] = None,
    main: bool = True,
    dtype: torch.dtype = torch.float32,
    log_step: Optional[Callable[..., None]] = None,
) -> Dict[str, float]:
    """One epoch; ``schedule(global_iteration)`` sets the learning rate before every step, ``clip(optimizer)``
    clips the (unscaled) gradients before it. ``precision``: autocast / scaler / channels-last (default: full
    precision); ``log_step(loss, lr)`` after every step with the ranks' mean loss (``Run.log_step``)."""
    precision = precision or Precision(device)
    model.train()
    loader.batch_sampler.set_epoch(epoch)
    totals, n = torch.zeros(3), 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=not main)
    for i, (images, labels) in enumerate(bar):
        lr = schedule((epoch - 1) * len(loader) + i)
        set_lr(optimizer, lr)
        images, labels = images.to(device, dtype, non_blocking=True), labels.to(device, non_blocking=True)
        with precision.autocast():
            out = model(precision.images(images))
        loss, _ = criterion(out, labels)
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer, (lambda: clip(optimizer)) if clip is not None else None)
        acc = (out.logits.argmax(1) == labels).float().mean()
        stats = all_reduce_mean(torch.stack([loss.detach(), acc]).float().cpu())
        check_finite(stats[0])
        if log_step is not None:
            log_step(stats[0], lr)
        totals += torch.cat([stats, torch.tensor([lr])])
        n += 1
        bar.set_postfix(loss=f"{totals[0] / n:.4f}", acc=f"{100 * totals[1] / n:.2f}%", lr=f"{lr:.2e}")
    totals /= max(n, 1)
    return {"train_loss": float(totals[0]), "train_accuracy": 100.0 * float(totals[1]), "lr": float(totals[2])}


def training_model(cfg: Dict, num_classes: int) -> nn.Module:
    """The model to train; without CrossEntropyLoss no loss reads the classifier, which is then frozen (fast-reid's
    SGD skips its None gradient; frozen, DistributedDataParallel does not wait for one)."""
    model = build_model(cfg, num_classes, pretrained_source(cfg))
    if "CrossEntropyLoss" not in cfg["MODEL"]["LOSSES"]["NAME"]:
        model.classifier.weight.requires_grad_(False)
    return model


def precision_from_config(cfg: Dict, device: torch.device, float64: bool = False, main: bool = True) -> Precision:
    """SOLVER.AMP: autocast to SOLVER.AMP.DTYPE (float16 with a gradient scaler), on CPU as on CUDA (fast-reid's
    AMPTrainer, CUDA float16 only); channels-last where common.device.Precision uses it."""
    amp = cfg["SOLVER"]["AMP"]
    return Precision.build(device, amp["ENABLED"], amp["DTYPE"], float64=float64, main=main)


def compiles(cfg: Dict) -> bool:
    """SOLVER.COMPILE (or --compile): torch.compile the model (not a fast-reid key)."""
    return bool(cfg["SOLVER"]["COMPILE"])


def evaluates(cfg: Dict, epoch: int) -> bool:
    """Whether ``epoch`` is evaluated: the untrained model (0), every ``TEST.EVAL_PERIOD`` epochs and the last."""
    return epoch in (0, cfg["SOLVER"]["MAX_EPOCH"]) or epoch % cfg["TEST"]["EVAL_PERIOD"] == 0


def snapshots(cfg: Dict, epoch: int) -> bool:
    """fast-reid's ``PeriodicCheckpointer``: a model every ``SOLVER.CHECKPOINT_PERIOD`` epochs before the last (the
    last epoch's is ``model.pth``, fast-reid's ``model_final``)."""
    return 0 < epoch < cfg["SOLVER"]["MAX_EPOCH"] and epoch % cfg["SOLVER"]["CHECKPOINT_PERIOD"] == 0


def snapshot(cfg: Dict, epoch: int) -> Path:
    """``<run>_model_<epoch>.pth`` after 1-based ``epoch`` (fast-reid's ``model_<epoch - 1>.pth``); test.py,
    export.py and ``--eval-only MODEL.WEIGHTS`` take it like ``model.pth``."""
    return run_files(cfg).path(f"model_{epoch:04d}.pth")


def plan_processes(args: argparse.Namespace) -> Tuple[int, bool, Optional[List[int]]]:
    """(processes to launch, use CUDA, GPU ids) from --num-gpus / --num-procs / --gpu_ids / torchrun."""
    gpu_ids = parse_gpu_ids(args.gpu_ids) if args.num_gpus > 0 else []
    if launched_by_torchrun():  # one process of N: GPU gpu_ids[LOCAL_RANK]
        if gpu_ids and len(gpu_ids) < int(os.environ.get("LOCAL_WORLD_SIZE", 1)):
            raise UserError(f"{os.environ['LOCAL_WORLD_SIZE']} processes on this machine but {len(gpu_ids)} GPU(s)")
        return 1, bool(gpu_ids), gpu_ids or None
    if args.num_gpus > 0 and gpu_ids:
        if args.num_gpus > len(gpu_ids):
            raise UserError(f"--num-gpus {args.num_gpus} but only {len(gpu_ids)} GPU(s) available")
        return args.num_gpus, True, gpu_ids[: args.num_gpus]
    return args.num_procs, False, None


def check_setup(cfg: Dict, world_size: int) -> None:
    """Every user mistake is found here, in the launching process (torchrun: rank 0), before any process trains."""
    batch = cfg["SOLVER"]["IMS_PER_BATCH"]
    if batch % world_size:
        raise UserError(f"SOLVER.IMS_PER_BATCH {batch} is not divisible by the {world_size} processes")
    if cfg["MODEL"]["WEIGHTS"]:
        raise UserError(
            "MODEL.WEIGHTS is read by --eval-only only: training starts from MODEL.BACKBONE.PRETRAIN_PATH "
            "(or --resume continues a run); fine-tuning a whole model is not supported"
        )
    datasets = build_datasets(cfg)
    if len(datasets["train"]) < batch:
        raise UserError(
            f"the training split has {len(datasets['train'])} images, fewer than one global batch "
            f"(SOLVER.IMS_PER_BATCH {batch})"
        )
    sampler, k = cfg["DATALOADER"]["SAMPLER_TRAIN"], cfg["DATALOADER"]["NUM_INSTANCE"]
    identities = len(set(datasets["train"].labels))
    if sampler != "TrainingSampler" and identities < batch // k:
        raise UserError(
            f"{sampler} needs SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = {batch // k} classes per batch; "
            f"the training split has {identities}"
        )
    q, g = eval_splits(data_name(cfg), cfg["DATASETS"]["ROOT"])
    ns = argparse.Namespace(
        data_name=data_name(cfg),
        crop_type=cfg["DATASETS"]["CROP_TYPE"],
        batch_size=batch,
        num_epochs=cfg["SOLVER"]["MAX_EPOCH"],
        recalls=cfg["TEST"]["RECALLS"],
    )
    validate_args(ns, len(datasets[g]), self_excluded=q == g)
    build_model(cfg, 2, pretrained_source(cfg))  # weights found and matching before launching


def evaluate_only(args: argparse.Namespace, cfg: Dict) -> Dict[str, float]:
    """fast-reid's ``--eval-only``: the shared ``test.py`` on ``MODEL.WEIGHTS`` (default: this run's model file)."""
    weights = cfg["MODEL"]["WEIGHTS"] or str(run_files(cfg).model)
    test_args = argparse.Namespace(
        model_file=weights,
        data_base=None,
        data_path=cfg["DATASETS"]["ROOT"],
        recalls=cfg["TEST"]["RECALLS"],
        batch_size=cfg["TEST"]["IMS_PER_BATCH"],
        num_workers=cfg["DATALOADER"]["NUM_WORKERS"],
        gpu_ids=args.gpu_ids,
        save_data_base=None,
        query_img_name=None,
        retrieval_num=8,
        fastreid_cfg=cfg,
        expected_config={k: v for k, v in config_dict(cfg).items() if k in MODEL_KEYS},
    )
    return run_test(SPEC, test_args)


def main(args: argparse.Namespace) -> Optional[Dict[str, float]]:
    cfg = resolve_config(args, notes=int(os.environ.get("RANK", 0)) == 0)
    if args.eval_only:
        return evaluate_only(args, cfg)
    num_procs, use_cuda, gpu_ids = plan_processes(args)
    if num_procs > 1:  # fast-reid's --num-gpus N: torchrun's launcher runs this main in N processes
        check_setup(cfg, num_procs)
        return launch_elastic(main, (args,), num_procs)
    info = init_process(args.dist_backend, use_cuda, device_ids=gpu_ids)
    if info.rank == 0:  # under torchrun rank 0 alone checks and prepares the data
        check_setup(cfg, info.world_size)
    barrier()
    main_rank = info.rank == 0
    if info.device.type == "cpu" and info.distributed:
        share_cpu_cores(info.world_size)
    set_seed(cfg["SEED"] + info.rank)
    data, solver = data_name(cfg), cfg["SOLVER"]
    dtype = torch.float64 if args.float64 else torch.float32
    datasets = build_datasets(cfg)
    if not args.augment:
        datasets["train"].transform = build_transforms(cfg)[1]

    # ---- model: one process, or one DDP process per GPU / CPU process
    precision = precision_from_config(cfg, info.device, args.float64, main_rank)
    model = training_model(cfg, datasets["train"].num_classes).to(info.device, dtype)
    model_without_ddp = maybe_compile(precision.model(model), compiles(cfg), info.device)
    model = wrap_ddp(model_without_ddp, info, global_batchnorm=False)  # MODEL.BACKBONE.NORM decides

    # ---- data: this rank's share of fast-reid's global batches
    sampler = build_train_sampler(cfg, datasets["train"].labels, info.rank, info.world_size)
    workers = cfg["DATALOADER"]["NUM_WORKERS"]
    loader = DataLoader(
        datasets["train"],
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=info.device.type == "cuda",
        # workers restart each epoch and draw their seeds from the main process's RNG, which the checkpoint
        # restores: persistent workers would carry a state no checkpoint holds, and --resume would not be exact
        persistent_workers=False,
    )

    # ---- optimisation
    optimizer = build_optimizer(model_without_ddp, cfg)
    criterion = FastRetriLoss(cfg)
    schedule, clip = schedule_from_config(cfg, len(sampler)), clipper_from_config(cfg)

    # ---- epochs: the same loop on every rank; Run writes on rank 0 only
    files = run_files(cfg)
    config = {
        **config_dict(cfg),
        "num_classes": datasets["train"].num_classes,
        "method": "fastretri",
        "float64": args.float64,
        "augment": args.augment,
    }
    query, gallery = eval_splits(data, cfg["DATASETS"]["ROOT"])
    run = Run(
        files,
        config,
        [k for k in config if k not in RESUME_FREE],
        "fastretri",
        solver["MAX_EPOCH"],
        recalls=cfg["TEST"]["RECALLS"],
        selection=args.model_selection,
        database={"metric": "cosine", "query": query, "gallery": gallery},
    )
    if main_rank:
        print(
            f"FastRetri {data}: {len(datasets['train'])} training images, {len(sampler)} iterations/epoch, "
            f"{info.world_size} process(es) x {solver['IMS_PER_BATCH'] // info.world_size} images on "
            f"{info.device}; writing {files.path('*')}"
        )
        write_config(cfg, files.path("config.yaml"))
    start, _ = run.resume(args.resume, model, optimizer, scaler=precision.scaler)

    def evaluate_now(epoch: int) -> Evaluation:
        """Recall@K in float32 (also under AMP, as fast-reid's evaluator and test.py), on the epochs it is due."""
        if not evaluates(cfg, epoch):
            return Evaluation({})
        return evaluate(
            model,
            datasets,
            query,
            gallery,
            cfg["TEST"]["RECALLS"],
            info.device,
            embed=embed,
            batch_size=cfg["TEST"]["IMS_PER_BATCH"],
            num_workers=workers,
        )

    if start == 1:
        run.log(0, {}, evaluate_now(0), model)
    for epoch in range(start, solver["MAX_EPOCH"] + 1):
        train_stats = train_one_epoch(
            model,
            criterion,
            optimizer,
            loader,
            info.device,
            epoch,
            schedule=schedule,
            precision=precision,
            clip=clip,
            main=main_rank,
            dtype=dtype,
            log_step=run.log_step,
        )
        run.log(epoch, train_stats, evaluate_now(epoch), model)
        if main_rank and snapshots(cfg, epoch):
            state = {"model": model_without_ddp.state_dict(), "config": config, "epoch": epoch}
            atomic_save(state, snapshot(cfg, epoch))
        run.checkpoint(epoch, model, optimizer, scaler=precision.scaler)
    run.finish()
    if main_rank:
        print(run_summary(run), flush=True)
    return None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parent = common_parser(data_name="cub", batch_size=128, num_epochs=30, recalls="1,2,4,8,16,32")
    # the shared flags override the config only when given; by default the YAML decides
    parent.set_defaults(
        data_path=None,
        crop_type=None,
        num_workers=None,
        batch_size=None,
        num_epochs=None,
        seed=None,
        recalls=None,
        pretrained=None,
        amp=None,
        amp_dtype=None,
        compile=None,
        data_name=None,
    )
    parser = argparse.ArgumentParser("FastRetri training", parents=[parent], add_help=add_help)
    parser.add_argument(
        "--config-file",
        "--config",
        "-c",
        dest="config_file",
        default="fastretri/configs/cub.yml",
        metavar="FILE",
        help="YAML config, fast-reid's keys; a run writes its resolved one as <run>_config.yaml "
        "(default: fastretri/configs/cub.yml)",
    )
    g = parser.add_argument_group("distributed")
    g.add_argument(
        "--num-gpus",
        type=non_negative_int,
        default=1,
        help="GPUs = processes on this machine, one DDP process each (default: 1; 0 or no CUDA = CPU)",
    )
    g.add_argument(
        "--num-procs", type=positive_int, default=1, help="CPU processes (gloo DDP) when no GPU is used (default: 1)"
    )
    g.add_argument(
        "--dist-backend",
        default="auto",
        choices=["auto", "nccl", "gloo"],
        help="process-group backend (default: auto = nccl on GPU, gloo on CPU)",
    )
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--eval-only",
        "--eval_only",
        dest="eval_only",
        action="store_true",
        help="only evaluate MODEL.WEIGHTS (default: this run's model file), as fast-reid's train_net.py",
    )
    add_model_selection(g, "last", "fast-reid keeps model_final", "TEST.RECALLS")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. SOLVER.BASE_LR 0.01",
    )
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
