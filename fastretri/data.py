"""FastRetri data: transforms from the config, the datasets and fast-reid's training samplers."""

from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from common.data.datasets import RetrievalDataset, eval_splits, label_space
from common.data.index import load_index
from common.data.prepare import ensure_dataset
from common.samplers import StreamBatchSampler
from fastretri.config import data_name
from fastretri.transforms import fastretri_transform

__all__ = [
    "SAMPLERS",
    "build_transforms",
    "build_datasets",
    "training_stream",
    "naive_identity_stream",
    "balanced_identity_stream",
    "build_train_sampler",
]


def build_transforms(cfg: Dict) -> Tuple:
    i = cfg["INPUT"]
    cj = i["CJ"]
    size = i["CROP"]["SIZE"]  # fast-reid: [s] a square, [h, w] a rectangle
    common = dict(crop_size=size[0] if len(size) == 1 else tuple(size), crop=i["CROP"]["ENABLED"])
    train = fastretri_transform(
        True,
        i["SIZE_TRAIN"],
        scale=i["CROP"]["SCALE"],
        ratio=i["CROP"]["RATIO"],
        flip_prob=i["FLIP"]["PROB"] if i["FLIP"]["ENABLED"] else 0.0,
        jitter=[cj["BRIGHTNESS"], cj["CONTRAST"], cj["SATURATION"], cj["HUE"]] if cj["ENABLED"] else None,
        jitter_prob=cj["PROB"],
        **common,
    )
    return train, fastretri_transform(False, i["SIZE_TEST"], **common)


def build_datasets(cfg: Dict) -> Dict[str, RetrievalDataset]:
    """Train split plus the evaluation splits (test, or In-shop query + gallery)."""
    name, crop = data_name(cfg), cfg["DATASETS"]["CROP_TYPE"]
    ensure_dataset(cfg["DATASETS"]["ROOT"], name, crop)
    index = load_index(cfg["DATASETS"]["ROOT"], name, crop)
    train_tf, test_tf = build_transforms(cfg)
    out = {"train": RetrievalDataset(index["train"], label_space(index, "train"), train_tf)}
    for split in dict.fromkeys(eval_splits(name, cfg["DATASETS"]["ROOT"])):
        out[split] = RetrievalDataset(index[split], label_space(index, split), test_tf)
    return out


def training_stream(num_samples: int, seed: int) -> Iterator[int]:
    """fast-reid ``TrainingSampler``'s index stream: ``shuffle(range(N)) + shuffle(range(N)) + ...`` from one
    seeded generator (``np.random.seed(seed)`` then ``np.random.permutation(N)`` forever); nothing is dropped."""
    rng = np.random.RandomState(seed)
    while True:
        yield from rng.permutation(num_samples).tolist()


def _by_label(labels: Sequence[int]) -> Tuple[List[int], Dict[int, List[int]]]:
    index: Dict[int, List[int]] = {}
    for i, label in enumerate(labels):
        index.setdefault(int(label), []).append(i)
    return sorted(index), index


def naive_identity_stream(labels: Sequence[int], batch_size: int, num_instances: int, seed: int) -> Iterator[int]:
    """fast-reid ``NaiveIdentitySampler``: each pass over the identities draws ``batch_size / K`` identities at a
    time among those with at least K unused images left, K images each (classes with fewer than K images are
    topped up by drawing with replacement), until fewer identities than a batch needs remain; then a new pass."""
    pids, index = _by_label(labels)
    per_batch = batch_size // num_instances
    rng = np.random.RandomState(seed)
    while True:
        available, queues, batch = list(pids), {}, []
        while len(available) >= per_batch:
            for pid in rng.choice(available, per_batch, replace=False).tolist():
                if pid not in queues:
                    images = list(index[pid])
                    if len(images) < num_instances:
                        images = rng.choice(images, size=num_instances, replace=True).tolist()
                    rng.shuffle(images)
                    queues[pid] = images
                queue = queues[pid]
                batch += queue[:num_instances]
                del queue[:num_instances]
                if len(queue) < num_instances:
                    available.remove(pid)
            if len(batch) == batch_size:
                yield from batch
                batch = []


def balanced_identity_stream(labels: Sequence[int], batch_size: int, num_instances: int, seed: int) -> Iterator[int]:
    """fast-reid ``BalancedIdentitySampler`` with one camera (FastRetri's datasets give every image camera '0'):
    each pass shuffles the identities, drops the last ``#ids mod (batch_size / K)``, and takes one random image of
    each identity plus K - 1 of its other images (without replacement when it has at least K others, with
    replacement otherwise; an identity with a single image repeats it)."""
    pids, index = _by_label(labels)
    per_batch = batch_size // num_instances
    rng = np.random.RandomState(seed)
    while True:
        order = rng.permutation(len(pids))
        drop = len(pids) % per_batch
        batch: List[int] = []
        for k in order[: len(order) - drop] if drop else order:
            images = index[pids[k]]
            first = int(rng.choice(images))
            batch.append(first)
            others = [j for j, image in enumerate(images) if image != first]
            if not others:
                batch += [images[0]] * (num_instances - 1)
            else:
                picks = rng.choice(others, size=num_instances - 1, replace=len(others) < num_instances)
                batch += [images[j] for j in picks]
            if len(batch) == batch_size:
                yield from batch
                batch = []


SAMPLERS = ("TrainingSampler", "NaiveIdentitySampler", "BalancedIdentitySampler")


def build_train_sampler(cfg: Dict, labels: Sequence[int], rank: int = 0, world_size: int = 1) -> StreamBatchSampler:
    """``DATALOADER.SAMPLER_TRAIN`` over the training labels, seeded with ``SEED``; an epoch is
    ``len(labels) // SOLVER.IMS_PER_BATCH`` global batches, as fast-reid's ``iters_per_epoch``.

    The identity samplers draw each global batch as one process would (``IMS_PER_BATCH / NUM_INSTANCE``
    identities), whatever the number of processes, so N processes see the batches of one."""
    name, k = cfg["DATALOADER"]["SAMPLER_TRAIN"], cfg["DATALOADER"]["NUM_INSTANCE"]
    batch, seed = cfg["SOLVER"]["IMS_PER_BATCH"], cfg["SEED"]
    streams = {
        "TrainingSampler": lambda: training_stream(len(labels), seed),
        "NaiveIdentitySampler": lambda: naive_identity_stream(labels, batch, k, seed),
        "BalancedIdentitySampler": lambda: balanced_identity_stream(labels, batch, k, seed),
    }
    return StreamBatchSampler(
        streams[name], batch, len(labels) // batch, rank, world_size, interleave=name == "TrainingSampler"
    )
