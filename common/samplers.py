"""Every batch sampler of the toolkit: seeded per epoch (``set_epoch``), so a resumed run draws what an
uninterrupted one would have, and global batches that :class:`RankBatchSampler` cuts into per-rank slices.

* :class:`MPerClassSampler` (CGD): classes drawn until the batch is full, up to ``m`` images each.
* :class:`ExactMPerClassSampler` (IRT ``--m``): exactly ``batch_size / m`` classes of exactly ``m`` images.
* :class:`RandomBatchSampler` (REIR, SREML, IRT ``--m 0``): ``DataLoader(shuffle=True)``'s batches, seeded.
* :class:`StepStream` (IRT): endless (index, augmentation seed) batches, one per optimizer step.
* :class:`StreamBatchSampler` (FastRetri): epochs cut from fast-reid's endless index streams.
"""

import collections
import itertools
import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = [
    "MPerClassSampler",
    "ExactMPerClassSampler",
    "RandomBatchSampler",
    "sample_seed",
    "StepStream",
    "StreamBatchSampler",
    "shard_batch",
    "RankBatchSampler",
]


class MPerClassSampler(Sampler[List[int]]):
    """Batches of classes drawn uniformly, ``m`` images each (fewer when a class has fewer than ``m``).

    The CGD recipe: a batch keeps drawing distinct classes until it holds ``batch_size`` indices; the last
    class may be cut. Classes with fewer than ``m`` images contribute all they have, so SOP's 2-image classes work.
    ``len`` = floor(N / batch_size) batches per epoch. Seeded per epoch (``set_epoch``), so a resumed run draws
    the same batches as an uninterrupted one.
    """

    def __init__(
        self, labels: Sequence[int], batch_size: int, m: int, seed: int = 0, num_batches: Optional[int] = None
    ):
        if m < 1 or batch_size < 1:
            raise ValueError("m and batch_size must be positive")
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        self.by_class = {c: np.flatnonzero(labels == c) for c in self.classes}
        if sum(min(m, len(v)) for v in self.by_class.values()) < batch_size:
            raise ValueError(f"batch_size {batch_size} needs more than {len(self.classes)} classes x m={m} images")
        self.batch_size, self.m, self.seed, self.epoch = batch_size, m, seed, 0
        self.num_batches = num_batches if num_batches is not None else max(1, len(labels) // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _batch(self, rng: np.random.Generator) -> List[int]:
        batch: List[int] = []
        for c in rng.permutation(self.classes):
            members = self.by_class[c]
            batch.extend(rng.permutation(members)[: self.m].tolist())
            if len(batch) >= self.batch_size:
                break
        batch = batch[: self.batch_size]
        rng.shuffle(batch)
        return batch

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.num_batches):
            yield self._batch(rng)


class ExactMPerClassSampler(Sampler[List[int]]):
    """pytorch-metric-learning's ``MPerClassSampler(labels, m, batch_size)``, which IRT's original used for ``--m``.

    Unlike :class:`MPerClassSampler`, every batch holds exactly ``batch_size / m`` classes of exactly ``m`` images:
    shuffle the classes, take the first ``batch_size / m``, and draw ``m`` images of each, without replacement, or
    *with* replacement when the class has fewer than ``m`` images (SOP's 2-image classes at m = 4 repeat images
    rather than letting more classes in). ``m`` must divide ``batch_size`` and ``m * classes >= batch_size``, as PML
    asserts. A pass is ``length_before_new_iter // batch_size`` batches (PML's default 100000); batches are i.i.d.,
    so the pass length only sets where the seeded generator is re-seeded (``set_epoch``), which makes a resumed run
    exact.
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


class RandomBatchSampler(Sampler[List[int]]):
    """The batches of ``DataLoader(shuffle=True, batch_size=B)`` (the originals'), cut from a permutation seeded per
    epoch instead of the global RNG, so every process cuts the same global batches; the last batch may be partial
    (no drop_last)."""

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


def sample_seed(seed: int, step: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of step ``step``'s global batch."""
    return ((seed * 1_000_003 + step) * 4096 + position) % (2**62)


class StepStream(Sampler[List[Tuple[int, int]]]):
    """Endless batches of (dataset index, augmentation seed) from ``start_step`` on; passes re-seed the sampler.

    Batch ``t`` is a pure function of (seed, t): pass ``t // len(batch_sampler)`` draws its order from
    ``batch_sampler`` at that epoch, so a run resumed at step t sees exactly an uninterrupted run's batches."""

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


class StreamBatchSampler(Sampler[List[int]]):
    """Epochs of ``iters_per_epoch`` global batches cut from one endless index stream (fast-reid trains on an
    infinite sampler and counts ``len(dataset) // IMS_PER_BATCH`` iterations as an epoch, so an epoch's batches
    continue where the last epoch's stopped and no image is dropped).

    Rank r of W takes fast-reid's share of each global batch: every W-th index from r for ``TrainingSampler``
    (``islice(stream, r, None, W)``), the r-th contiguous block for the identity samplers (whose ``reorder_index``
    keeps each identity on one rank). ``set_epoch(e)`` positions the stream at epoch ``e``'s first batch (1-based),
    so a resumed run draws what an uninterrupted one would have.
    """

    def __init__(
        self,
        make_stream: Callable[[], Iterator[int]],
        global_batch: int,
        iters_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        interleave: bool = True,
    ):
        self.make_stream, self.global_batch, self.iters = make_stream, global_batch, iters_per_epoch
        self.rank, self.world, self.interleave = rank, world_size, interleave
        self.per_rank = global_batch // world_size
        self.epoch, self._stream, self._position = 1, None, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.iters

    def __iter__(self) -> Iterator[List[int]]:
        target = (self.epoch - 1) * self.iters * self.global_batch
        if self._stream is None or self._position > target:
            self._stream, self._position = self.make_stream(), 0
        collections.deque(itertools.islice(self._stream, target - self._position), maxlen=0)  # skip ahead
        self._position = target
        for _ in range(self.iters):
            batch = list(itertools.islice(self._stream, self.global_batch))
            self._position += self.global_batch
            if self.interleave:
                yield batch[self.rank :: self.world]
            else:
                yield batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]


def shard_batch(batch: Sequence, labels: Optional[Sequence[int]], rank: int, world_size: int) -> List:
    """Rank ``rank``'s contiguous slice of a global batch; with ``labels`` the batch is first ordered by class (in
    order of first appearance) so each class group stays on one rank when the slice size is a multiple of m."""
    batch = list(batch)
    if labels is not None:

        def label(item) -> int:  # an index, or a key whose first element is the index (IRT's (index, seed))
            return labels[item[0] if isinstance(item, tuple) else item]

        first = {}
        for i in batch:
            first.setdefault(label(i), len(first))
        batch = sorted(batch, key=lambda i: first[label(i)])  # stable: order inside a class is kept
    bounds = [round(len(batch) * r / world_size) for r in range(world_size + 1)]
    return batch[bounds[rank] : bounds[rank + 1]]


class RankBatchSampler(Sampler):
    """This rank's slices of the global batches of ``batch_sampler`` (any sampler yielding index lists).

    N processes therefore train on exactly the batches one process would; ``labels`` keeps class groups together
    (m-per-class sampling).
    """

    def __init__(self, batch_sampler, rank: int = 0, world_size: int = 1, labels: Optional[Sequence[int]] = None):
        self.batch_sampler, self.rank, self.world_size, self.labels = batch_sampler, rank, world_size, labels

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            yield shard_batch(batch, self.labels, self.rank, self.world_size)
