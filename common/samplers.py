"""Batch samplers for metric learning."""

from typing import Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["MPerClassSampler"]


class MPerClassSampler(Sampler[List[int]]):
    """Batches of classes drawn uniformly, ``m`` images each (fewer when a class has fewer than ``m``).

    The CGD/IRT recipe: a batch keeps drawing distinct classes until it holds ``batch_size`` indices; the last
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
