"""Train CGD (Combination of multiple Global Descriptors, Jun et al. 2019) as leftthomas/CGD did.

M-per-class batches (m = 4), Adam lr 1e-4, lr x0.1 at 60 % and 80 % of the epochs, loss = label-smoothing
cross-entropy (auxiliary classifier) + batch-hard triplet (combined embedding). After every epoch: Recall@K on
the test split (In-shop: query vs gallery), CSV + plot, a checkpoint for ``--resume``; the best R@1 model and its
database go to ``results/cgd/<run name>_{model,data_base}.pth``.

    python cgd/train.py --feature_dim 512 --gd_config SM
"""
import argparse
from typing import Dict

import torch
from torch import nn
from thop import clever_format
from torch.utils.data import DataLoader
from tqdm import tqdm

from cgd.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropyLoss
from cgd.model import BACKBONE_TYPES, GD_CONFIGS, MODEL_KEYS, Model, count_flops, embed, freeze_bn
from common.cli import bool_pair, common_parser, validate_args
from common.database import Split
from common.datasets import eval_splits, load_splits
from common.device import autocast, channels_last, data_parallel, main_device, parse_gpu_ids
from common.engine import Evaluation, RunFiles, check_finite, eval_recalls, extract_features, fit
from common.errors import UserError, run_cli
from common.preprocess import ensure_dataset
from common.presets import build_transform
from common.runio import plain_config, results_dir, run_name, set_seed
from common.samplers import MPerClassSampler

M_PER_CLASS = 4  # images per class in a batch (the original's MPerClassSampler m)
# Keys a resumed run must share with its checkpoint (besides the model-defining ones).
RESUME_KEYS = MODEL_KEYS + ("smoothing", "temperature", "margin", "batch_size", "num_epochs", "seed", "freeze_bn",
                             "lr")


def train_one_epoch(model: nn.Module, criteria: Dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    loader: DataLoader, device: torch.device, epoch: int, num_epochs: int, *,
                    amp: bool = False, frozen_bn: bool = True) -> Dict[str, float]:
    """One pass over the sampler's batches; returns the mean loss and the auxiliary classifier's accuracy (%)."""
    model.train()
    if frozen_bn:
        freeze_bn(model)
    total_loss, total_correct, total_num = 0.0, 0, 0
    bar = tqdm(loader, dynamic_ncols=True)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            embeddings, logits = model(images)
        loss = criteria["class"](logits.float(), labels) + criteria["triplet"](embeddings.float(), labels)
        check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.numel()
        total_num += n
        total_loss += loss.item() * n
        total_correct += (logits.argmax(dim=-1) == labels).sum().item()
        bar.set_description(f"Train Epoch {epoch}/{num_epochs} Loss:{total_loss / total_num:.4f} "
                            f"Acc:{100.0 * total_correct / total_num:.2f}%")
    return {"train_loss": total_loss / max(1, total_num), "train_accuracy": 100.0 * total_correct / max(1, total_num)}


def evaluate(model: nn.Module, loaders: Dict[str, DataLoader], query: str, gallery: str, device: torch.device,
             ranks, amp: bool = False) -> Evaluation:
    """Recall@K of the query split against the gallery split (the same split, self excluded, except In-shop)."""
    splits = {}
    for name, loader in loaders.items():
        features = extract_features(model, loader, device, amp, embed=embed, desc=f"{name} features")
        splits[name] = Split(loader.dataset.images, loader.dataset.labels, features)
    metrics = eval_recalls(splits[query], splits[gallery], ranks, same_set=query == gallery)
    return Evaluation(metrics, splits)


def build_data(args: argparse.Namespace):
    """Train loader (m-per-class batches) and one sequential loader per evaluation split."""
    ensure_dataset(args.data_path, args.data_name, args.crop_type)
    query, gallery = eval_splits(args.data_name)
    test_tf = build_transform("cgd", False, args.data_name, args.crop_type, args.image_size)
    transforms = {"train": build_transform("cgd", True, args.data_name, args.crop_type, args.image_size),
                  query: test_tf, gallery: test_tf}
    datasets = load_splits(args.data_path, args.data_name, args.crop_type, transforms)
    validate_args(args, gallery_size=len(datasets[gallery]), self_excluded=query == gallery)
    try:
        sampler = MPerClassSampler(datasets["train"].labels, args.batch_size, M_PER_CLASS, seed=args.seed)
    except ValueError as e:
        raise UserError(f"--batch_size {args.batch_size}: {e}")
    pin = torch.cuda.is_available()
    train_loader = DataLoader(datasets["train"], batch_sampler=sampler, num_workers=args.num_workers,
                              pin_memory=pin)
    eval_loaders = {name: DataLoader(datasets[name], batch_size=args.batch_size, shuffle=False,
                                     num_workers=args.num_workers, pin_memory=pin)
                    for name in dict.fromkeys((query, gallery))}
    return train_loader, eval_loaders, query, gallery


def main(args: argparse.Namespace) -> None:
    if args.batch_size % M_PER_CLASS != 0:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of {M_PER_CLASS} (images per class)")
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())), flush=True)
    if args.freeze_bn and args.pretrained == "none" and not args.resume:
        print("note: --freeze_bn with --pretrained none keeps the BatchNorm statistics of a random network "
              "(mean 0, var 1); use --no-freeze_bn when training from scratch", flush=True)
    set_seed(args.seed)
    gpu_ids = parse_gpu_ids(args.gpu_ids)
    device = main_device(gpu_ids)
    train_loader, eval_loaders, query, gallery = build_data(args)
    num_classes = train_loader.dataset.num_classes

    # ---- model
    model = Model(args.backbone_type, args.gd_config, args.feature_dim, num_classes,
                  pretrained="none" if args.resume else args.pretrained)
    params, flops = count_flops(model, args.image_size or 224)
    print("# Model Params: {} FLOPs: {}".format(*clever_format([params, flops])), flush=True)
    model = data_parallel(channels_last(model, device), gpu_ids)

    # ---- optimisation
    criteria = {"class": LabelSmoothingCrossEntropyLoss(args.smoothing, args.temperature),
                "triplet": BatchHardTripletLoss(args.margin)}
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    milestones = [int(0.6 * args.num_epochs), int(0.8 * args.num_epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    # ---- epochs
    config = {**plain_config(args), "num_classes": num_classes, "method": "cgd"}
    name = run_name(args.data_name, args.crop_type, args.backbone_type, args.gd_config, args.feature_dim,
                    args.smoothing, args.temperature, args.margin, args.batch_size)

    def one_epoch(epoch: int) -> Dict[str, float]:
        train_loader.batch_sampler.set_epoch(epoch)
        return train_one_epoch(model, criteria, optimizer, train_loader, device, epoch, args.num_epochs,
                               amp=args.amp, frozen_bn=args.freeze_bn)

    fit(RunFiles(results_dir("cgd"), name), model=model, config=config, config_keys=RESUME_KEYS,
        num_epochs=args.num_epochs, train_one_epoch=one_epoch,
        evaluate=lambda: evaluate(model, eval_loaders, query, gallery, device, args.recalls, args.amp),
        optimizer=optimizer, scheduler=scheduler, resume=args.resume, method="cgd",
        database_kwargs={"metric": "euclidean", "query": query, "gallery": gallery})


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train CGD", add_help=add_help,
                                     parents=[common_parser(data_name="car", batch_size=128, num_epochs=20,
                                                            recalls="1,2,4,8")])
    g = parser.add_argument_group("CGD model")
    g.add_argument("--backbone_type", default="resnet50", type=str, choices=BACKBONE_TYPES,
                   help="backbone network type (default: resnet50; resnet18/34 are additions for small runs)")
    g.add_argument("--gd_config", default="SG", type=str, choices=GD_CONFIGS,
                   help="global descriptors in order, S=SPoC M=MAC G=GeM; the first feeds the classifier "
                        "(default: SG)")
    g.add_argument("--feature_dim", default=1536, type=int,
                   help="embedding size, divisible by the number of descriptors (default: 1536)")
    bool_pair(g, "freeze_bn", True, "keep the backbone BatchNorm2d running statistics frozen, as leftthomas/CGD")
    g = parser.add_argument_group("CGD loss")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing epsilon (default: 0.1)")
    g.add_argument("--temperature", default=0.5, type=float, help="softmax temperature (default: 0.5)")
    g.add_argument("--margin", default=0.1, type=float, help="triplet margin m (default: 0.1)")
    g = parser.add_argument_group("optimizer")
    g.add_argument("--lr", default=1e-4, type=float,
                   help="Adam learning rate, x0.1 at 60%% and 80%% of the epochs (default: 1e-4, the original's)")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
