"""IRT's training stream: an endless, resumable sequence of batches, one per optimizer step.

The original loop re-created its DataLoader on ``StopIteration`` and had no epochs. Here batch ``t`` is a pure
function of (seed, t): pass ``p = t // batches_per_pass`` draws its order from a sampler seeded with (seed, p), and
each sample's augmentation runs under a torch seed derived from (seed, t, position). A run resumed at step t
therefore sees exactly the batches and crops of an uninterrupted run, whatever ``--num-workers`` is (the batches:
``common.samplers.StepStream``; the crops: :class:`SeededAugment`).
"""

from typing import Callable, Dict, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from common.data.datasets import RetrievalDataset, eval_splits, load_splits
from common.data.index import load_index
from common.data.registry import ALIASES, DATASET_NAMES
from common.errors import UserError
from common.samplers import ExactMPerClassSampler, RandomBatchSampler, RankBatchSampler, StepStream

__all__ = [
    "DATASET_ALIASES",
    "ORIGINAL_NAMES",
    "SeededAugment",
    "build_datasets",
    "train_loader",
]

# the original's names -> the common processed-data names, and back (the original's ``--output-dir`` sub-folder)
DATASET_ALIASES = ALIASES
ORIGINAL_NAMES = {name: {"cub": "cub200", "isc": "inshop"}.get(name, name) for name in DATASET_NAMES}


class SeededAugment(Dataset):
    """``dataset[(i, seed)]`` -> (image, label, i) with the random transform run under ``seed`` (reproducible crops)."""

    def __init__(self, dataset: RetrievalDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        i, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image, label = self.dataset[i]
        return image, label, i


def build_datasets(
    data_path: str, data_name: str, crop_type: str, transform: Callable[[bool], Callable], train: bool = True
) -> Dict[str, RetrievalDataset]:
    """train (``transform(True)``, random crops) and the evaluation splits (``transform(False)``, centre crops) of
    the processed dataset (made sure of with ``ensure_dataset_main_first`` by the caller)."""
    index = load_index(data_path, data_name, crop_type)
    evaluation = tuple(dict.fromkeys(eval_splits(data_name, data_path)))
    transforms = {s: transform(False) for s in evaluation}
    if train:
        transforms["train"] = transform(True)
    missing = [s for s in transforms if s not in index]
    if missing:
        raise UserError(f"the {data_name} index has no '{missing[0]}' split")
    return load_splits(data_path, data_name, crop_type, transforms)


def train_loader(
    dataset: RetrievalDataset,
    batch_size: int,
    m: int,
    seed: int,
    start_step: int,
    num_workers: int,
    pin_memory: bool,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """PML m-per-class batches when m > 0 (the repo's SOP/In-shop recipe), plain random batches otherwise (CUB).

    ``batch_size`` is the global batch; under DDP rank r loads its slice (class groups intact), with the
    augmentation seeds of the global positions, so N processes see exactly the 1-process batches and crops."""
    if m > 0:
        try:
            sampler = ExactMPerClassSampler(dataset.labels, batch_size, m, seed=seed)
        except ValueError as e:
            raise UserError(f"--m {m} --batch-size {batch_size}: {e}") from None
    else:
        sampler = RandomBatchSampler(len(dataset), batch_size, seed)
    return DataLoader(
        SeededAugment(dataset),
        batch_sampler=RankBatchSampler(StepStream(sampler, seed, start_step), rank, world_size, dataset.labels),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
