"""IRT's training stream: an endless, resumable sequence of batches, one per optimizer step.

The original loop re-created its DataLoader on ``StopIteration`` and had no epochs. Here batch ``t`` is a pure
function of (seed, t): pass ``p = t // batches_per_pass`` draws its order from a sampler seeded with (seed, p), and
each sample's augmentation runs under a torch seed derived from (seed, t, position). A run resumed at step t
therefore sees exactly the batches and crops of an uninterrupted run, whatever ``--num-workers`` is.
"""

import math
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.data.datasets import RetrievalDataset, eval_splits, load_splits
from common.data.index import load_index
from common.data.registry import ALIASES, DATASET_NAMES
from common.distributed import RankBatchSampler
from common.errors import UserError
from common.presets import build_transform

__all__ = [
    "DATASET_ALIASES",
    "ORIGINAL_NAMES",
    "RandomBatchSampler",
    "MPerClassSampler",
    "StepStream",
    "SeededAugment",
    "build_datasets",
    "train_loader",
]

# the original's names -> the common processed-data names, and back (the original's ``--output-dir`` sub-folder)
DATASET_ALIASES = ALIASES
ORIGINAL_NAMES = {name: {"cub": "cub200", "isc": "inshop"}.get(name, name) for name in DATASET_NAMES}


class RandomBatchSampler(Sampler[List[int]]):
    """A seeded random permutation per pass cut into batches, the last one short (RandomSampler, drop_last=False)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0):
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        for i in range(0, self.num_samples, self.batch_size):
            yield order[i : i + self.batch_size]


class MPerClassSampler(Sampler[List[int]]):
    """pytorch-metric-learning's ``MPerClassSampler(labels, m, batch_size)``, which the original used for ``--m``.

    Every batch is drawn on its own: shuffle the classes, take the first ``batch_size / m``, and draw ``m`` images of
    each, without replacement, or *with* replacement when the class has fewer than ``m`` images. So a batch always
    holds exactly ``batch_size / m`` classes (SOP's 2-image classes at m = 4 repeat images rather than letting more
    classes in). ``m`` must divide ``batch_size`` and ``m * classes >= batch_size``, as PML asserts. A pass is
    ``length_before_new_iter // batch_size`` batches (PML's default 100000); batches are i.i.d., so the pass length
    only sets where the seeded generator is re-seeded (``set_epoch``), which makes a resumed run exact.
    """

    def __init__(
        self, labels: Sequence[int], batch_size: int, m: int, seed: int = 0, length_before_new_iter: int = 100_000
    ):
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        if m < 1 or batch_size % m:
            raise ValueError(f"m={m} must divide the batch size {batch_size}")
        if m * len(self.classes) < batch_size:
            raise ValueError(
                f"m * (number of classes) = {m} * {len(self.classes)} must be >= the batch size {batch_size}"
            )
        if length_before_new_iter < batch_size:
            raise ValueError(f"length_before_new_iter {length_before_new_iter} < batch size {batch_size}")
        self.by_class = {c: np.flatnonzero(labels == c) for c in self.classes}
        self.batch_size, self.m, self.seed, self.epoch = batch_size, m, seed, 0
        self.num_batches = length_before_new_iter // batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.num_batches):
            batch: List[int] = []
            for c in rng.permutation(self.classes)[: self.batch_size // self.m]:
                members = self.by_class[c]
                batch.extend(rng.choice(members, self.m, replace=len(members) < self.m).tolist())
            yield batch


def sample_seed(seed: int, step: int, position: int) -> int:
    return ((seed * 1_000_003 + step) * 4096 + position) % (2**62)


class StepStream(Sampler[List[Tuple[int, int]]]):
    """Endless batches of (dataset index, augmentation seed) from ``start_step`` on; passes re-seed the sampler."""

    def __init__(self, batch_sampler, seed: int, start_step: int = 0):
        self.batch_sampler, self.seed, self.start_step = batch_sampler, seed, start_step
        self.per_pass = len(batch_sampler)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        skip = step % self.per_pass
        for epoch in range(step // self.per_pass, 2**62):
            self.batch_sampler.set_epoch(epoch)
            for b, batch in enumerate(self.batch_sampler):
                if b < skip:
                    continue
                yield [(int(i), sample_seed(self.seed, step, pos)) for pos, i in enumerate(batch)]
                step += 1
            skip = 0


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
    data_path: str, data_name: str, crop_type: str, input_size: int, train: bool = True
) -> Dict[str, RetrievalDataset]:
    """train (random crops) and the evaluation splits (centre crops) of the processed dataset (made sure of with
    ``ensure_dataset_main_first`` by the caller)."""
    index = load_index(data_path, data_name, crop_type)
    evaluation = tuple(dict.fromkeys(eval_splits(data_name, data_path)))
    transforms = {s: build_transform("irt", False, data_name, crop_type, input_size) for s in evaluation}
    if train:
        transforms["train"] = build_transform("irt", True, data_name, crop_type, input_size)
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
            sampler = MPerClassSampler(dataset.labels, batch_size, m, seed=seed)
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
