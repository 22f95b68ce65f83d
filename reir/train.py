"""Train REIR (Randomized Ensembles for Image Retrieval): E learners on a shared trunk, each a meta-class classifier.

Every training class is mapped, per learner, to one of M meta-classes (``reir.meta_classes``); the loss is the
cross-entropy over meta-classes averaged over samples and learners; Adam 1e-4, lr x0.1 at 50 % and 70 % of the
epochs. Embedding = per-learner L2-normalised logits, concatenated ([N, E*M]); similarity = their mean cosine.
After every epoch: Recall@K, CSV + plot, a checkpoint for ``--resume``; the best R@1 model and database (train,
test and, for In-shop, query and gallery features) go to ``results/reir/<run name>_{model,data_base}.pth``.

    python reir/train.py --data_name cub --crop_type cropped --model_type resnet34 --num_epochs 50
"""
import argparse
import random
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.cli import bool_pair, common_parser, validate_args
from common.database import Split
from common.datasets import RetrievalDataset, eval_splits, load_splits
from common.device import autocast, get_devices, parse_gpu_ids
from common.engine import Evaluation, RunFiles, check_finite, eval_recalls, extract_features, fit
from common.errors import run_cli
from common.preprocess import ensure_dataset
from common.presets import build_transform
from common.runio import plain_config, results_dir, run_name, set_seed
from reir.meta_classes import LABEL_TYPES, meta_class_ids
from reir.model import IMPLS, MODEL_TYPES, SHARE_TYPES, Model

CLASS_CAP = 300  # images per training class, as in the originals
# Configuration a model file / database must match to be used with these flags.
MODEL_KEYS = ("method", "data_name", "crop_type", "label_type", "with_random", "share_type", "model_type",
              "ensemble_size", "meta_class_size", "image_size")
RESUME_KEYS = MODEL_KEYS + ("batch_size", "num_epochs", "seed", "learner_blocks", "load_ids", "lr")


class MetaLabelled(Dataset):
    """Training images with their meta-labels in every learner: (image, LongTensor[E])."""

    def __init__(self, dataset: RetrievalDataset, ids: torch.Tensor, indices: Sequence[int]):
        self.dataset, self.ids, self.indices = dataset, ids, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.dataset[self.indices[i]]
        return image, self.ids[:, label]


def capped_indices(labels: Sequence[int], cap: int, seed: int) -> List[int]:
    """At most ``cap`` random images per class (drawn once, seeded)."""
    rng, by_class = random.Random(seed), {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    out = []
    for members in by_class.values():
        out += sorted(rng.sample(members, cap)) if len(members) > cap else members
    return sorted(out)


class LazySplit:
    """A database split whose features are only computed when the database is actually saved (best epoch)."""

    def __init__(self, dataset: RetrievalDataset, compute):
        self.images, self.labels, self._compute, self._features = dataset.images, dataset.labels, compute, None

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            self._features = self._compute()
        return self._features


def ensemble_embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return Model.embed(model(_memory_format(images)))


def _memory_format(images: torch.Tensor) -> torch.Tensor:
    """Channels-last on CUDA (the model is converted in ``build_model``), unchanged on CPU."""
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, device: torch.device,
                    epoch: int, num_epochs: int, amp: bool = False) -> Dict[str, float]:
    """Mean cross-entropy over samples and learners; accuracy = share of (sample, learner) pairs right."""
    model.train()
    total_loss, total_correct, total_num = 0.0, 0, 0
    bar = tqdm(loader, dynamic_ncols=True)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(_memory_format(images))
        loss = F.cross_entropy(logits.float().permute(0, 2, 1), labels)
        check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_num += labels.shape[0]
        total_loss += loss.item() * labels.shape[0]
        total_correct += (logits.argmax(dim=-1) == labels).sum().item()
        bar.set_description(f"Epoch {epoch}/{num_epochs} - Loss:{total_loss / total_num:.4f} - "
                            f"Acc:{100.0 * total_correct / (total_num * labels.shape[1]):.2f}%")
    e = model.ensemble_size
    return {"train_loss": total_loss / max(1, total_num), "train_accuracy": 100.0 * total_correct / max(1, total_num * e)}


def evaluate(model: nn.Module, loaders: Dict[str, DataLoader], query: str, gallery: str, device: torch.device,
             ranks: Sequence[int], amp: bool = False) -> Evaluation:
    """Recall@K of query vs gallery; the train split's features are computed only if the database is saved."""
    splits = {}
    for name, loader in loaders.items():
        if name == "train":
            continue
        features = extract_features(model, loader, device, amp, embed=ensemble_embed, desc=f"{name} features")
        splits[name] = Split(loader.dataset.images, loader.dataset.labels, features)
    metrics = eval_recalls(splits[query], splits[gallery], ranks, same_set=query == gallery)
    if "train" in loaders:
        splits["train"] = LazySplit(loaders["train"].dataset, lambda: extract_features(
            model, loaders["train"], device, amp, embed=ensemble_embed, desc="train features"))
    return Evaluation(metrics, splits)


def eval_loaders(args: argparse.Namespace, with_train: bool = True):
    """One sequential loader per evaluation split (plus the full training split for the database)."""
    ensure_dataset(args.data_path, args.data_name, args.crop_type)
    query, gallery = eval_splits(args.data_name)
    tf = build_transform(args.method, False, args.data_name, args.crop_type, args.image_size)
    names = list(dict.fromkeys(((["train"] if with_train else []) + [query, gallery])))
    datasets = load_splits(args.data_path, args.data_name, args.crop_type, {n: tf for n in names})
    validate_args(args, gallery_size=len(datasets[gallery]), self_excluded=query == gallery)
    loaders = {n: DataLoader(d, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                             pin_memory=torch.cuda.is_available()) for n, d in datasets.items()}
    return loaders, query, gallery


def run_files(args: argparse.Namespace) -> RunFiles:
    """The originals' run names: REIR ``<data>_<crop>_<label>_<random|unrandom>_<share>_<model>_<E>_<M>``,
    SREML ``<data>_<crop>_<model>``."""
    if args.method == "sreml":
        return RunFiles(results_dir("sreml"), run_name(args.data_name, args.crop_type, args.model_type))
    return RunFiles(results_dir("reir"), run_name(args.data_name, args.crop_type, args.label_type,
                                                  "random" if args.with_random else "unrandom", args.share_type,
                                                  args.model_type, args.ensemble_size, args.meta_class_size))


def build_model(config, gpu_ids: Sequence[int], impl: str = "auto", pretrained: str = "none") -> Model:
    """The ensemble for a run configuration (args or a stored config dict), placed on its devices."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    model = Model(get("model_type"), get("share_type"), get("ensemble_size"), get("meta_class_size"),
                  with_random=get("with_random"), pretrained=pretrained, devices=get_devices(gpu_ids), impl=impl)
    model.place()
    if model.devices[0].type == "cuda":
        model.to(memory_format=torch.channels_last)
    print(f"# trainable common feature parameters: {sum(p.numel() for p in model.common_extractor.parameters()):,}")
    print(f"# trainable parameters: {sum(p.numel() for p in model.parameters()):,} "
          f"({len(model.sizes)} learner block(s), {model.impl} ensemble)")
    return model


def main(args: argparse.Namespace) -> None:
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())), flush=True)
    set_seed(args.seed)
    gpu_ids = parse_gpu_ids(args.gpu_ids)
    device = get_devices(gpu_ids)[0]
    loaders, query, gallery = eval_loaders(args)
    train_set = load_splits(args.data_path, args.data_name, args.crop_type, {
        "train": build_transform(args.method, True, args.data_name, args.crop_type, args.image_size)})["train"]
    num_classes = len(set(train_set.labels))
    ids = meta_class_ids(results_dir(args.method), args.data_name, args.crop_type, args.label_type,
                         args.ensemble_size, args.meta_class_size, num_classes, args.seed, args.load_ids)
    train_loader = DataLoader(MetaLabelled(train_set, ids, capped_indices(train_set.labels, CLASS_CAP, args.seed)),
                              batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                              pin_memory=torch.cuda.is_available())
    model = build_model(args, gpu_ids, args.ensemble_impl, "none" if args.resume else args.pretrained)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    milestones = [int(0.5 * args.num_epochs), int(0.7 * args.num_epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    config = {**plain_config(args), "num_classes": num_classes, "learner_blocks": len(model.sizes)}
    fit(run_files(args), model=model, config=config, config_keys=RESUME_KEYS, num_epochs=args.num_epochs,
        train_one_epoch=lambda epoch: train_one_epoch(model, optimizer, train_loader, device, epoch,
                                                      args.num_epochs, args.amp),
        evaluate=lambda: evaluate(model, loaders, query, gallery, device, args.recalls, args.amp),
        optimizer=optimizer, scheduler=scheduler, resume=args.resume, method=args.method,
        database_kwargs={"metric": "cosine", "scale": float(args.ensemble_size), "query": query,
                         "gallery": gallery},
        extra_state=lambda: {"ids": ids}, load_extra=lambda state: ids.copy_(state["ids"]))


def add_model_args(parser: argparse.ArgumentParser, method: str = "reir") -> None:
    """Ensemble flags; SREML fixes share type, label type and branch weights (the "squeezed" setting)."""
    g = parser.add_argument_group(f"{method.upper()} model")
    g.add_argument("--model_type", default="resnet18", choices=MODEL_TYPES, help="backbone type (default: resnet18)")
    g.add_argument("--ensemble_size", default=48, type=int, help="ensemble model size E (default: 48)")
    g.add_argument("--meta_class_size", default=12, type=int, help="meta class size M (default: 12)")
    g.add_argument("--ensemble_impl", default="auto", choices=IMPLS,
                   help="run the learners as one grouped network or one after another; same weights and outputs "
                        "(default: auto = grouped on CUDA, loop on CPU)")
    if method == "reir":
        g.add_argument("--label_type", default="fixed", choices=LABEL_TYPES,
                       help="assign meta-labels with the random or fixed (unique codes) method (default: fixed)")
        g.add_argument("--share_type", default="layer1", choices=SHARE_TYPES, help="shared module type (default: layer1)")
        bool_pair(g, "with_random", False, "with branch random weight")
    else:
        parser.set_defaults(label_type="random", share_type="layer1", with_random=False)
    g.add_argument("--lr", default=1e-4, type=float, help="Adam learning rate (default: 1e-4, the original's fixed value)")
    bool_pair(g, "load_ids", False, "load already generated meta-class ids instead of drawing (and saving) new ones")
    parser.set_defaults(method=method)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train REIR", add_help=add_help,
                                     parents=[common_parser(data_name="car", batch_size=10, num_epochs=20,
                                                            recalls="1,2,4,8")])
    add_model_args(parser, "reir")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
