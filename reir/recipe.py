"""The pieces of REIR's training that ``reir/train.py`` and ``sreml/train.py`` both assemble in their ``main``: the
flags, the data (meta-labelled, capped, seeded global batches), the ensemble and its precision, the step and the
run's files, each written once for any :class:`common.spec.MethodSpec` of REIR's model (REIR's own, SREML's).

E learners on a shared trunk, each a meta-class classifier: every training class is mapped, per learner, to one of
M meta-classes (``reir.meta_classes``); the loss is the cross-entropy over meta-classes averaged over samples and
learners. One process spreads the learners over ``--gpu_ids`` (the originals' behaviour); under ``torchrun`` every
process holds the whole ensemble on its own device (DDP) and trains on its slice of the same global batches one
process would see, with global-batch BatchNorm statistics, so N processes train what one does.
"""

import argparse
import functools
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from common.backbones import backbone_choice, is_timm
from common.cli import (
    add_config_flag,
    add_model_selection,
    bool_pair,
    common_parser,
    non_negative_float,
    positive_int,
    validate_args,
    write_args_yaml,
)
from common.data.datasets import RetrievalDataset, eval_splits, load_splits
from common.data.prepare import ensure_dataset_main_first
from common.device import Precision, get_devices, maybe_compile, parse_gpu_ids, unwrap, upcast
from common.distributed import (
    DistInfo,
    all_reduce_mean,
    get_world_size,
    is_main_process,
)
from common.engine import Evaluation, Run, check_finite, evaluate
from common.errors import UserError
from common.runio import plain_config, set_seed
from common.runs import RunFiles, results_dir
from common.samplers import RandomBatchSampler, RankBatchSampler
from common.spec import MethodSpec
from reir.meta_classes import LABEL_TYPES, meta_class_ids
from reir.model import IMPLS, MODEL_TYPES, SHARE_TYPES, TIMM_SHARE_TYPE, Model, check_share_type, ensemble_embed
from reir.spec import MODEL_KEYS

__all__ = [
    "CLASS_CAP",
    "RESUME_KEYS",
    "MetaLabelled",
    "capped_indices",
    "SliceCollate",
    "train_one_epoch",
    "build_data",
    "resolve_share_type",
    "prepare",
    "build_model",
    "build_optimizer",
    "build_run",
    "evaluator",
    "add_model_args",
    "get_args_parser",
]

CLASS_CAP = 300  # images per training class, as in the originals
# Keys a resumed run must share with its checkpoint (besides the model-defining ones).
RESUME_KEYS = MODEL_KEYS + (
    "batch_size",
    "num_epochs",
    "seed",
    "learner_blocks",
    "load_ids",
    "lr",
    "float64",
    "augment",
)


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


class SliceCollate:
    """``default_collate``; an empty slice (a last global batch smaller than the number of processes) becomes
    zero-size tensors, so that rank still joins the step's collectives with a zero loss."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __call__(self, batch):
        if batch:
            return default_collate(batch)
        image, ids = self.dataset[0]
        return image.new_empty((0, *image.shape)), ids.new_empty((0, *ids.shape))


def _global_sum(values: List[float], device: torch.device) -> torch.Tensor:
    """Sum over ranks of a few float64 numbers (on the process group's device), returned on CPU."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return (all_reduce_mean(t) * get_world_size()).cpu()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    num_epochs: int,
    *,
    precision: Optional[Precision] = None,
    dtype: torch.dtype = torch.float32,
    log_step: Optional[Callable[..., None]] = None,
) -> Dict[str, float]:
    """Mean cross-entropy over samples and learners; accuracy = share of (sample, learner) pairs right; the
    learning rate. ``precision``: autocast / scaler / channels-last (default: full precision); ``log_step(loss,
    lr)`` after every step with the global batch's loss (``Run.log_step``).

    Each rank's loss is its cross-entropy sum over the global batch's sample count (x world size): DDP's average
    then gives the gradient of the global batch mean, also when the ranks' slices differ in size."""
    precision = precision or Precision(device)
    model.train()
    world = get_world_size()
    lr = optimizer.param_groups[0]["lr"]
    sums = torch.zeros(3, dtype=torch.float64)  # cross-entropy sum, correct (sample, learner) pairs, samples
    bar = tqdm(loader, dynamic_ncols=True, disable=not is_main_process())
    for images, labels in bar:
        images, labels = images.to(device, dtype, non_blocking=True), labels.to(device, non_blocking=True)
        e = labels.shape[1]
        n_global = float(_global_sum([labels.shape[0]], device)[0])
        with precision.autocast():
            logits = model(precision.images(images))
        ce = F.cross_entropy(upcast(logits).permute(0, 2, 1), labels, reduction="sum")
        loss = ce * (world / (n_global * e))
        check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer)
        correct = (logits.argmax(dim=-1) == labels).sum()
        step_sums = _global_sum([ce.item(), correct.item(), labels.shape[0]], device)
        sums += step_sums
        if log_step is not None:
            log_step(step_sums[0] / max(1.0, float(step_sums[2]) * e), lr)
        seen = max(1.0, float(sums[2]) * e)
        bar.set_description(
            f"Epoch {epoch}/{num_epochs} - Loss:{sums[0] / seen:.4f} - Acc:{100.0 * sums[1] / seen:.2f}%"
        )
    e = unwrap(model).ensemble_size
    seen = max(1.0, float(sums[2]) * e)
    return {"train_loss": float(sums[0] / seen), "train_accuracy": 100.0 * float(sums[1] / seen), "lr": lr}


def build_data(args: argparse.Namespace, info: DistInfo, spec: MethodSpec):
    """Evaluation datasets (full train split too, for the database) and the train loader: seeded global batches
    of ``--batch_size``, each rank taking its contiguous slice; plus the meta-class ids [E, C]."""
    ensure_dataset_main_first(args.data_path, args.data_name, args.crop_type)
    query, gallery = eval_splits(args.data_name, args.data_path)
    test_tf = spec.transform(vars(args), False)
    datasets = load_splits(
        args.data_path, args.data_name, args.crop_type, {"train": test_tf, query: test_tf, gallery: test_tf}
    )
    validate_args(args, gallery_size=len(datasets[gallery]), self_excluded=query == gallery)
    train_set = datasets["train"]
    if args.augment:
        train_tf = spec.transform(vars(args), True)
        train_set = load_splits(args.data_path, args.data_name, args.crop_type, {"train": train_tf})["train"]
    num_classes = len(set(train_set.labels))
    ids = meta_class_ids(
        results_dir(spec.name),
        args.data_name,
        args.crop_type,
        args.label_type,
        args.ensemble_size,
        args.meta_class_size,
        num_classes,
        args.seed,
        args.load_ids,
        main=info.rank == 0,
    )
    labelled = MetaLabelled(train_set, ids, capped_indices(train_set.labels, CLASS_CAP, args.seed))
    sampler = RankBatchSampler(
        RandomBatchSampler(len(labelled), args.batch_size, args.seed), info.rank, info.world_size
    )
    loader = DataLoader(
        labelled,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=SliceCollate(labelled),
        pin_memory=torch.cuda.is_available(),
    )
    return loader, datasets, query, gallery, ids, num_classes


def resolve_share_type(args: argparse.Namespace, spec: MethodSpec) -> None:
    """A timm backbone is shared whole (``reir.model.TIMM_SHARE_TYPE``). A spec that fixes its share type for
    ResNets (SREML: layer1) gets that rule for a timm backbone, with a note; a ``--share_type`` flag is checked
    before any data is read (one ``error:`` line naming the flag to give)."""
    if "share_type" not in spec.fixed:
        check_share_type(args.model_type, args.share_type)
    elif is_timm(args.model_type) and args.share_type != TIMM_SHARE_TYPE:
        if is_main_process():
            print(
                f"note: {spec.display} shares {args.share_type} of a ResNet; a timm backbone is shared whole "
                f"(share_type {TIMM_SHARE_TYPE}: the learners are heads on its pooled features)",
                flush=True,
            )
        args.share_type = TIMM_SHARE_TYPE


def prepare(args: argparse.Namespace, info: DistInfo, spec: MethodSpec) -> List[torch.device]:
    """Checks before any data is read, the flags printed, every RNG seeded; the learners' devices: one process
    spreads them over ``--gpu_ids`` (all visible by default), under torchrun each holds the whole ensemble."""
    if args.batch_size < info.world_size:
        raise UserError(
            f"--batch_size {args.batch_size} (the global batch) is smaller than the {info.world_size} processes"
        )
    resolve_share_type(args, spec)
    if info.rank == 0:
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())), flush=True)
    set_seed(args.seed)
    return [info.device] if info.distributed else get_devices(parse_gpu_ids(args.gpu_ids))


def build_model(
    args: argparse.Namespace, info: DistInfo, devices: List[torch.device], dtype: torch.dtype
) -> Tuple[Model, Precision]:
    """The ensemble placed on ``devices`` (compiled with ``--compile``) and its precision (``--amp``,
    ``--float64``); rank 0 prints its parameter counts."""
    model = (
        Model(
            args.model_type,
            args.share_type,
            args.ensemble_size,
            args.meta_class_size,
            with_random=args.with_random,
            pretrained="none" if args.resume else args.pretrained,
            devices=devices,
            impl=args.ensemble_impl,
        )
        .to(dtype)
        .place()
    )
    precision = Precision.build(devices[0], args.amp, args.amp_dtype, float64=args.float64, main=info.rank == 0)
    maybe_compile(precision.model(model), args.compile, devices[0], len(devices))
    if info.rank == 0:
        print(
            f"# trainable common feature parameters: "
            f"{sum(p.numel() for p in model.common_extractor.parameters()):,}\n"
            f"# trainable parameters: {sum(p.numel() for p in model.parameters()):,} "
            f"({len(model.sizes)} learner block(s), {model.impl} ensemble)",
            flush=True,
        )
    return model, precision


def build_optimizer(
    model: nn.Module, args: argparse.Namespace
) -> Tuple[torch.optim.Adam, torch.optim.lr_scheduler.MultiStepLR]:
    """Adam at ``--lr``, x0.1 at 50 % and 70 % of the epochs (the originals')."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    milestones = [int(0.5 * args.num_epochs), int(0.7 * args.num_epochs)]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def build_run(
    args: argparse.Namespace, spec: MethodSpec, num_classes: int, learner_blocks: int, query: str, gallery: str
) -> Run:
    """The run's files under ``results/<spec name>/<run name>_*`` (its database: cosine with scale E), and the
    resolved flags as ``args.yaml``."""
    config = {**plain_config(args), "num_classes": num_classes, "learner_blocks": learner_blocks, "method": spec.name}
    run = Run(
        RunFiles(results_dir(spec.name), spec.run_name(config)),
        config,
        RESUME_KEYS,
        spec.name,
        args.num_epochs,
        recalls=args.recalls,
        selection=args.model_selection,
        database={"metric": "cosine", "scale": float(args.ensemble_size), "query": query, "gallery": gallery},
    )
    if is_main_process():
        write_args_yaml(args, run.files.path("args.yaml"), f"{spec.name}/train.py")
    return run


def evaluator(
    model: nn.Module,
    datasets: Dict[str, RetrievalDataset],
    query: str,
    gallery: str,
    device: torch.device,
    args: argparse.Namespace,
) -> Callable[[], Evaluation]:
    """The evaluation after every epoch (``common.engine.evaluate``): Recall@K of the ensemble embedding, query vs
    gallery; the train split's features, which the database also holds, are computed only if it is saved."""
    return functools.partial(
        evaluate,
        model,
        datasets,
        query,
        gallery,
        args.recalls,
        device,
        embed=ensemble_embed,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        amp=args.amp,
        lazy=("train",),
    )


def add_model_args(parser: argparse.ArgumentParser, spec: MethodSpec) -> None:
    """Ensemble and optimiser flags; the spec's ``fixed`` flags are not offered and keep their fixed values."""
    g = parser.add_argument_group(f"{spec.display} model")
    g.add_argument(
        "--model_type",
        default="resnet18",
        type=backbone_choice(MODEL_TYPES),
        metavar="{" + ",".join(MODEL_TYPES) + ",timm:NAME}",
        help="backbone type: a ResNet, or any timm model as timm:NAME, shared whole by the learners "
        f"(share_type {TIMM_SHARE_TYPE}) (default: resnet18)",
    )
    g.add_argument("--ensemble_size", default=48, type=positive_int, help="ensemble model size E (default: 48)")
    g.add_argument("--meta_class_size", default=12, type=positive_int, help="meta class size M (default: 12)")
    g.add_argument(
        "--ensemble_impl",
        default="auto",
        choices=IMPLS,
        help="run the learners as one grouped network or one after another; same weights and outputs "
        "(default: auto = grouped on CUDA, loop on CPU)",
    )
    if "label_type" not in spec.fixed:
        g.add_argument(
            "--label_type",
            default="fixed",
            choices=LABEL_TYPES,
            help="assign meta-labels with the random or fixed (unique codes) method (default: fixed)",
        )
    if "share_type" not in spec.fixed:
        g.add_argument(
            "--share_type",
            default="layer1",
            choices=SHARE_TYPES,
            help=f"shared module type; {TIMM_SHARE_TYPE} with a timm backbone (default: layer1)",
        )
    if "with_random" not in spec.fixed:
        bool_pair(g, "with_random", False, "with branch random weight")
    bool_pair(g, "load_ids", False, "load already generated meta-class ids instead of drawing (and saving) new ones")
    g = parser.add_argument_group("optimizer")
    g.add_argument(
        "--lr",
        default=1e-4,
        type=non_negative_float,
        help="Adam learning rate, x0.1 at 50%% and 70%% of the epochs (default: 1e-4, the original's)",
    )
    add_model_selection(g, "best", "the original kept the best R@1", "--recalls")
    parser.set_defaults(**spec.fixed, method=spec.name)


def get_args_parser(spec: MethodSpec, add_help: bool = True, **defaults: Any) -> argparse.ArgumentParser:
    """``train.py``'s flags for a spec: the shared ones with the script's ``defaults`` (``common_parser``'s
    keywords), plus the ensemble's."""
    parser = argparse.ArgumentParser(
        description=f"Train {spec.display}", add_help=add_help, parents=[common_parser(**defaults)]
    )
    add_model_args(parser, spec)
    add_config_flag(parser)
    return parser
