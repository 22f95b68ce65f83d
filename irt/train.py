"""Train IRT: a Vision Transformer fine-tuned with a contrastive loss, a cross-batch memory and KoLeo.

El-Nouby et al., "Training Vision Transformers for Image Retrieval", arXiv 2102.05644 (2021); flags and defaults of
the unofficial implementation jhgan00/image-retrieval-transformers (``main.py``). ``--max-iter`` optimizer steps at a
constant learning rate; every ``--eval-freq`` steps (one row of the statistics CSV) the test Recall@K is measured, a
checkpoint is written for ``--resume`` and the best model + database are kept. ``--max-iter 0`` = IRT_O
(off-the-shelf), ``--lambda-reg 0`` = IRT_L, default = IRT_R.
"""

import argparse
import functools
import math
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn
from tqdm import tqdm

from common.cli import (
    add_check_flags,
    add_config_flag,
    add_model_selection,
    add_speed_flags,
    bool_pair,
    dataset_name,
    default_workers,
    non_negative_float,
    non_negative_int,
    parse_args_with_config,
    parse_recalls,
    positive_int,
    run_summary,
    write_args_yaml,
)
from common.data.datasets import eval_splits
from common.data.prepare import ensure_dataset_main_first
from common.device import Precision, maybe_compile, upcast
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
from irt.data import DATASET_ALIASES, ORIGINAL_NAMES, build_datasets, train_loader
from irt.losses import REDUCTIONS, ContrastiveLoss, KoLeo
from irt.model import DISTILLED_EMBEDDINGS, save_original_encoder
from irt.spec import MODEL_KEYS, SPEC, embed, irt_run_name, model_from_config
from irt.xbm import XBM, MomentumEncoder

# a checkpoint is only resumed for the same network (MODEL_KEYS) and training recipe
DATA_KEYS = ("data_name", "crop_type")
RESUME_KEYS = (
    MODEL_KEYS
    + DATA_KEYS
    + (
        "batch_size",
        "lr",
        "weight_decay",
        "opt",
        "m",
        "lambda_reg",
        "margin",
        "memory_ratio",
        "encoder_momentum",
        "loss_reduction",
        "eval_freq",
        "seed",
        "float64",
        "drop",
        "drop_path",
    )
)
NO_DECAY = ("pos_embed", "cls_token", "dist_token")
# --dataset demo: the flags not given take these values (XCiT-nano, 4 blocks, from scratch on 48-px images; a plain
# ViT does not learn from 960 images)
DEMO = (
    "--model xcit_nano_12_p8_224 --model-kwargs depth=4 --input-size 48 --pretrained none "
    "--max-iter 400 --eval-freq 200 --batch-size 32 --m 4 --lr 4e-4 --lambda-reg 0.1 --num-workers 0"
).split()


def resolve_device(text: Optional[str]) -> torch.device:
    """``cuda:N`` when it exists, CPU (with a note) when CUDA is absent, a one-line error for a missing GPU."""
    if text in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {text}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"note: --device {text} given but no CUDA device is available; running on CPU")
        return torch.device("cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW (or SGD) without weight decay on biases, norms, the position embedding and the tokens (timm rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY
        (no_decay if skip else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.weight_decay}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    betas = tuple(args.opt_betas) if args.opt_betas else (0.9, 0.999)
    return torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps, betas=betas)


def train_one_epoch(
    model: nn.Module,
    criterion: ContrastiveLoss,
    koleo: KoLeo,
    optimizer,
    batches,
    device,
    steps: range,
    *,
    lambda_reg: float,
    xbm: Optional[XBM] = None,
    key_encoder: Optional[MomentumEncoder] = None,
    clip_grad: Optional[float] = None,
    precision: Optional[Precision] = None,
    logging_freq: int = 50,
    max_iter: int = 0,
    dtype: torch.dtype = torch.float32,
    log_step: Optional[Callable[..., None]] = None,
) -> Dict[str, float]:
    """Optimizer steps ``steps`` (one evaluation period): L = contrastive(batch) + contrastive(batch, XBM)
    + lambda * KoLeo(batch). The batch is enqueued before the memory term (the original's order). ``precision``:
    autocast and scaler (default: full precision); ``log_step(loss, lr, contrastive=, koleo=)`` after every step.

    Under DDP every term sees the global batch: the embeddings are gathered with gradients (each rank computes the
    same loss; DDP's averaging then gives the 1-process gradient), labels and keys without, so the memory of every
    rank holds the same global batches, row i of the global batch at the slot ``enqueue`` returns for it."""
    precision = precision or Precision(device)
    model.train()
    sums = torch.zeros(3, dtype=torch.float64)
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(
        steps,
        desc=f"iter {steps.start + 1}-{steps.stop}",
        leave=False,
        dynamic_ncols=True,
        disable=not is_main_process(),
    )
    for step in bar:
        images, labels, _ = next(batches)
        images, labels = images.to(device, dtype, non_blocking=True), labels.to(device, non_blocking=True)
        with precision.autocast():
            z_local = model(images)
        z, labels = all_gather_with_grad(upcast(z_local)), all_gather_no_grad(labels)
        contrastive = criterion(z, labels)
        if xbm is not None:
            if key_encoder is not None:
                with torch.no_grad(), precision.autocast():
                    keys = all_gather_no_grad(upcast(key_encoder(images)))
            else:
                keys = z.detach()
            slots = xbm.enqueue(keys.to(xbm.feats.dtype), labels)
            feats, mem_labels = xbm.get()
            ignore = xbm.self_pairs(slots, momentum_encoder=key_encoder is not None)
            contrastive = contrastive + criterion(z, labels, feats, mem_labels, ignore)
        regulariser = koleo(z)
        loss = contrastive + lambda_reg * regulariser
        check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        clip = (lambda: nn.utils.clip_grad_norm_(model.parameters(), clip_grad)) if clip_grad else None
        precision.step(loss, optimizer, clip)
        if key_encoder is not None:
            key_encoder.update(model.module if hasattr(model, "module") else model)
        values = torch.stack([contrastive.detach(), regulariser.detach(), loss.detach()]).double().cpu()
        sums += values  # the same on every rank: the loss is computed on the global batch
        if log_step is not None:
            log_step(values[2], lr, contrastive=values[0], koleo=values[1])
        bar.set_postfix(loss=f"{float(values[2]):.4f}")
        if logging_freq and ((step + 1) % logging_freq == 0 or step + 1 == max_iter) and is_main_process():
            tqdm.write(
                f"Iteration [{step + 1}/{max_iter}] contrastive: {float(values[0]):.4f} "
                f"regularization: {float(values[1]):.4f}(x{lambda_reg}) total_loss: {float(values[2]):.4f}"
            )
    sums = all_reduce_mean(sums) / max(1, len(steps))
    return {**{f"train_{k}": float(v) for k, v in zip(("contrastive", "koleo", "loss"), sums)}, "lr": lr}


def log_dir(args, files: RunFiles) -> Optional[Path]:
    """TensorBoard folder: the original's ``--log-dir``, ``DIR/<dataset>/`` (one sub-folder per run), or None for
    the run's own beside its CSV."""
    if not args.log_dir:
        return None
    data = DATASET_ALIASES.get(args.data_name, args.data_name)
    return Path(args.log_dir) / ORIGINAL_NAMES.get(data, data) / files.name


def run_files(args) -> RunFiles:
    """``results/irt/<dataset>_<crop>_<model>_<size>_<iters>_<bs>_<lambda>_<margin>_<m>_<memory>_<momentum>``,
    or the original's ``--output-dir``: ``<dir>/<dataset>/``."""
    data = DATASET_ALIASES.get(args.data_name, args.data_name)
    name = irt_run_name({**vars(args), "data_name": data})
    if args.output_dir:
        directory = Path(args.output_dir) / ORIGINAL_NAMES.get(data, data)
        directory.mkdir(parents=True, exist_ok=True)
        return RunFiles(directory, name)
    return RunFiles(results_dir("irt"), name)


def prepare_args(args) -> argparse.Namespace:
    """Map the original's dataset names onto the processed ones and reject bad values in one line."""
    args.data_name = DATASET_ALIASES.get(args.data_name, args.data_name)
    if args.batch_size < 2:
        raise UserError("--batch-size must be at least 2 (pairs and KoLeo need two samples)")
    if args.max_iter < 0 or args.eval_freq < 1:
        raise UserError("--max-iter must be >= 0 and --eval-freq >= 1")
    if args.memory_ratio < 0 or args.m < 0:
        raise UserError("--memory-ratio and --m must be >= 0")
    return args


def setup(args) -> DistInfo:
    """Join the process group under torchrun (GPU LOCAL_RANK with NCCL, else gloo on CPU)."""
    wants_cuda = (args.device or "auto").startswith("cuda") or args.device in (None, "", "auto")
    info = init_distributed(use_cuda=wants_cuda and torch.cuda.is_available())
    if not info.distributed:
        info.device = resolve_device(args.device)
    if args.batch_size % info.world_size:
        raise UserError(
            f"--batch-size {args.batch_size} (the global batch) is not divisible by the {info.world_size} processes"
        )
    return info


def main(args):
    args = prepare_args(args)
    info = setup(args)
    device, dtype = info.device, (torch.float64 if args.float64 else torch.float32)
    set_seed(args.seed)
    pin = args.pin_mem and device.type == "cuda"
    ensure_dataset_main_first(args.data_path, args.data_name, args.crop_type)
    transform = functools.partial(SPEC.transform, vars(args))  # transform(train)
    datasets = build_datasets(args.data_path, args.data_name, args.crop_type, transform)
    if not args.augment:
        datasets["train"].transform = datasets[next(s for s in datasets if s != "train")].transform
    query, gallery = eval_splits(args.data_name, args.data_path)
    limit = len(datasets[gallery]) - (query == gallery)
    if max(args.rank) > limit:
        raise UserError(f"--rank {max(args.rank)} is larger than the gallery ({limit} images to rank)")
    config = plain_config(args)
    if info.rank == 0:
        print("\n".join(f"{k}: {v}" for k, v in sorted(config.items())))

    # ---- model (DDP under torchrun), memory, key encoder, optimizer
    model = model_from_config(config, args.pretrained).to(device, dtype)
    precision = Precision.build(device, args.amp, args.amp_dtype, cnn=False, float64=args.float64, main=info.rank == 0)
    ddp_model = wrap_ddp(model, info)
    train_set = datasets["train"]
    xbm = (
        XBM(max(1, int(args.memory_ratio * len(train_set))), model.embed_dim).to(device, dtype)
        if args.memory_ratio > 0
        else None
    )
    key_encoder = (
        MomentumEncoder(model, args.encoder_momentum).to(device) if args.encoder_momentum is not None else None
    )
    maybe_compile(model, args.compile, device)  # in place, after the key encoder copied the plain model
    if key_encoder is not None:
        maybe_compile(key_encoder.encoder, args.compile, device)
    optimizer = build_optimizer(model, args)
    criterion, koleo = ContrastiveLoss(args.margin, reduction=args.loss_reduction), KoLeo()
    periods = math.ceil(args.max_iter / args.eval_freq)
    files = run_files(args)
    run = Run(
        files,
        config,
        RESUME_KEYS,
        "irt",
        periods,
        recalls=args.rank,
        selection=args.model_selection,
        database={"metric": "cosine", "query": query, "gallery": gallery},
        log_dir=log_dir(args, files),
    )
    if info.rank == 0:
        print(
            f"{run.files.name}: {len(train_set)} training images, {args.max_iter} iterations, XBM "
            f"{xbm.size if xbm is not None else 0} entries, {info.world_size} process(es) on {device}"
        )
    if info.rank == 0:
        write_args_yaml(args, run.files.path("args.yaml"), "irt/train.py")
    start, state = run.resume(args.resume, model, optimizer, scaler=precision.scaler)
    if state and xbm is not None:
        xbm.load_state_dict(state["xbm"])
    if state and key_encoder is not None:
        key_encoder.encoder.load_state_dict(state["key_encoder"])

    def evaluate_now() -> Evaluation:
        return evaluate(
            ddp_model,
            datasets,
            query,
            gallery,
            args.rank,
            device,
            embed=embed,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            amp=args.amp,
        )

    # ---- periods of --eval-freq steps; the endless batch stream starts where the (resumed) run stands
    if start == 1:
        run.log(0, {}, evaluate_now(), model)
    batches = (
        iter(
            train_loader(
                train_set,
                args.batch_size,
                args.m,
                args.seed,
                (start - 1) * args.eval_freq,
                args.num_workers,
                pin,
                info.rank,
                info.world_size,
            )
        )
        if start <= periods
        else None
    )
    for period in range(start, periods + 1):
        steps = range((period - 1) * args.eval_freq, min(period * args.eval_freq, args.max_iter))
        train_stats = train_one_epoch(
            ddp_model,
            criterion,
            koleo,
            optimizer,
            batches,
            device,
            steps,
            lambda_reg=args.lambda_reg,
            xbm=xbm,
            key_encoder=key_encoder,
            clip_grad=args.clip_grad,
            precision=precision,
            logging_freq=args.logging_freq,
            max_iter=args.max_iter,
            dtype=dtype,
            log_step=run.log_step,
        )
        run.log(period, train_stats, evaluate_now(), model)
        run.checkpoint(
            period,
            model,
            optimizer,
            scaler=precision.scaler,
            xbm=xbm.state_dict() if xbm is not None else {},
            key_encoder=key_encoder.state() if key_encoder is not None else {},
        )
    stats = run.finish()
    if args.output_dir and info.rank == 0:
        save_original_encoder(model, run.files.directory / "encoder.pth")
    last = stats.rows[max(stats.rows)] if stats.rows else {}
    if info.rank == 0 and last:
        print(
            " ".join(f"Recall@{k} : {last[f'test_recall@{k}']:.2f}%" for k in args.rank if f"test_recall@{k}" in last)
        )
        print(run_summary(run, lambda row: f"iteration {min(row * args.eval_freq, args.max_iter)}"), flush=True)
    return stats


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("IRT training (hyphenated flags as in the original main.py)", add_help=add_help)
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="deit_small_distilled_patch16_224",
        type=str,
        help="timm Vision Transformer name (default: deit_small_distilled_patch16_224)",
    )
    g.add_argument(
        "--input-size",
        "--image_size",
        dest="input_size",
        default=224,
        type=positive_int,
        help="image and model input size in px; the train/test resize is 256/224 of it (default: 224)",
    )
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra timm.create_model kwargs, e.g. patch_size=8 depth=2 (default: none)",
    )
    g.add_argument(
        "--distilled-embedding",
        default="original",
        choices=DISTILLED_EMBEDDINGS,
        help="distilled models: original = CLS token in training (and the key encoder), mean of CLS and "
        "distillation tokens in evaluation; mean or cls = one rule everywhere (default: original)",
    )
    g.add_argument(
        "--pretrained",
        default="imagenet",
        help="imagenet (timm download/cache), none, or a state-dict PATH (default: imagenet)",
    )
    g.add_argument("--drop", default=0.0, type=float, help="dropout rate (default: 0.0)")
    g.add_argument("--drop-path", default=0.1, type=float, metavar="PCT", help="drop-path rate (default: 0.1)")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument(
        "--max-iter", default=2000, type=non_negative_int, help="optimizer steps; 0 = IRT_O evaluation (default: 2000)"
    )
    g.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        default=64,
        type=positive_int,
        help="batch size (default: 64)",
    )
    g.add_argument("--lr", default=3e-5, type=non_negative_float, help="constant learning rate (default: 3e-5)")
    g.add_argument("--opt", default="adamw", choices=["adamw", "sgd"], help="optimizer (default: adamw)")
    g.add_argument("--opt-eps", default=1e-8, type=float, help="optimizer epsilon (default: 1e-8)")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", help="AdamW betas (default: 0.9 0.999)")
    g.add_argument("--momentum", default=0.9, type=float, help="SGD momentum (default: 0.9; unused by adamw)")
    g.add_argument(
        "--weight-decay",
        default=5e-4,
        type=float,
        help="decoupled weight decay, none on biases/norms/pos_embed/tokens (default: 5e-4)",
    )
    g.add_argument("--clip-grad", default=None, type=float, help="clip the gradient norm (default: no clipping)")
    g = p.add_argument_group("loss, memory and sampling")
    g.add_argument("--lambda-reg", default=0.7, type=float, help="KoLeo weight; 0 = IRT_L (default: 0.7)")
    g.add_argument(
        "--margin", default=0.5, type=float, help="negative margin beta of the contrastive loss (default: 0.5)"
    )
    g.add_argument(
        "--loss-reduction",
        default="nonzero",
        choices=REDUCTIONS,
        help="nonzero: mean over non-zero pair losses, positives and negatives apart (original code); "
        "paper: sum over pairs / batch size (Eq. 1) (default: nonzero)",
    )
    g.add_argument(
        "--memory-ratio",
        default=1.0,
        type=float,
        help="XBM size as a fraction of the training set; 0 disables it (default: 1.0)",
    )
    g.add_argument(
        "--encoder-momentum",
        default=None,
        type=float,
        help="momentum key encoder for the memory, 0.999 for In-shop (default: none)",
    )
    g.add_argument(
        "--m",
        "--m_per_class",
        "--m-per-class",
        dest="m",
        default=0,
        type=int,
        help="images per class in a batch; 0 = random batches; under torchrun spell it --m_per_class "
        "(torchrun's own parser takes --m as an abbreviation of its options) (default: 0)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        "--data_name",
        dest="data_name",
        default="cub200",
        type=dataset_name,
        help="cub200 | sop | inshop | car | demo (cub, isc accepted), or a dataset of your own processed "
        "by data_utils.py (default: cub200)",
    )
    g.add_argument(
        "--data-path",
        "--data_path",
        dest="data_path",
        default="data",
        type=str,
        help="root holding the processed <dataset>/ folders written by data_utils.py (default: data)",
    )
    g.add_argument(
        "--crop_type",
        "--crop-type",
        dest="crop_type",
        default="uncropped",
        choices=["uncropped", "cropped"],
        help="bounding-box crops, car/cub only (default: uncropped)",
    )
    g.add_argument(
        "--num-workers",
        "--num_workers",
        dest="num_workers",
        default=default_workers(16),
        type=non_negative_int,
        help=f"DataLoader workers (default: min(16, cores available) = {default_workers(16)})",
    )
    bool_pair(g, "pin-mem", True, "pin host memory on CUDA")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--rank", default=[1, 2, 4, 8], type=int, nargs="+", help="compute Recall@K (default: 1 2 4 8)")
    g.add_argument("--recalls", dest="rank", type=parse_recalls, help="same as --rank, comma separated")
    g.add_argument(
        "--eval-freq",
        default=1000,
        type=int,
        help="evaluate, checkpoint and log a CSV row every N iterations (default: 1000)",
    )
    g.add_argument("--logging-freq", default=50, type=int, help="print the losses every N iterations (default: 50)")
    g.add_argument(
        "--log-dir",
        default=None,
        help="TensorBoard events in DIR/<dataset>/<run name>/ (the original's folder) instead of beside the run's "
        "CSV under results/irt/ (default: none)",
    )
    g.add_argument(
        "--output-dir",
        default=None,
        help="the original's output folder: the run's files go to DIR/<dataset>/ instead of results/irt/, "
        "with the last model also as DIR/<dataset>/encoder.pth, the original's file (default: none)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue this run from its last checkpoint, or from the given checkpoint path",
    )
    add_model_selection(g, "last", "the original saved its final encoder", "--rank")
    g = p.add_argument_group("device")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:0 if available, else cpu)")
    g.add_argument("--seed", default=0, type=int, help="seed for python, numpy, torch and the batches (default: 0)")
    add_speed_flags(g)
    add_check_flags(p)
    add_config_flag(p)
    return p


if __name__ == "__main__":
    run_cli(main, parse_args_with_config(get_args_parser(), demo=DEMO))
