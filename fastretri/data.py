"""FastRetri data: transforms from the config, the datasets and the global-batch sampler."""

from typing import Dict, Tuple

import torch

from common.data.datasets import RetrievalDataset, eval_splits, label_space
from common.data.index import load_index
from common.data.prepare import ensure_dataset
from common.presets import fastretri_transform
from fastretri.config import data_name

__all__ = ["build_transforms", "build_datasets", "GlobalBatchSampler"]


def build_transforms(cfg: Dict) -> Tuple:
    i = cfg["INPUT"]
    cj = i["CJ"]
    common = dict(crop_size=i["CROP"]["SIZE"][0], crop=i["CROP"]["ENABLED"])
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


class GlobalBatchSampler(torch.utils.data.Sampler):
    """fast-reid ``TrainingSampler`` per epoch: one seeded shuffle shared by all ranks, cut into global batches
    (drop_last); rank r takes slice r of every global batch, so N processes see exactly the 1-process batches."""

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.global_batch, self.rank, self.world, self.seed = num_samples, global_batch, rank, world_size, seed
        self.per_rank, self.epoch = global_batch // world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.global_batch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000003 + self.epoch))
        for b in range(len(self)):
            start = b * self.global_batch + self.rank * self.per_rank
            yield perm[start : start + self.per_rank].tolist()
