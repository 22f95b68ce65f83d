"""Datasets over a processed index (``common.data.index``), the evaluation protocol and label spaces.

Labels are mapped to integers once per *label space*: the training split has its own, and the evaluation splits
(test, or In-shop query + gallery together) share one, so a query item and its gallery images get the same integer
(the original CGD mapped query and gallery independently).
"""

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from common.data.images import max_image_pixels, open_image
from common.data.index import label_key, load_index, own_protocol
from common.data.registry import BENCHMARKS
from common.errors import UserError

__all__ = ["eval_splits", "label_space", "RetrievalDataset", "load_splits"]

# Splits that are ranked against each other share a label space.
_LABEL_SPACES = {"train": ("train",), "test": ("test",), "query": ("query", "gallery"), "gallery": ("query", "gallery")}


def eval_splits(data_name: str, data_path: os.PathLike = "data") -> Tuple[str, str]:
    """(query split, gallery split) used for evaluation: In-shop ranks query vs gallery, the other benchmarks test
    vs itself; an own dataset's protocol is stored in its index under ``data_path`` (pass the script's
    --data_path: the benchmarks never read it)."""
    if data_name in BENCHMARKS:
        return BENCHMARKS[data_name].eval_splits
    return own_protocol(data_path, data_name)


def label_space(index: Dict[str, List[Tuple[str, str]]], split: str) -> Dict[str, int]:
    """Raw label -> integer for the label space ``split`` belongs to (shared by In-shop query and gallery)."""
    members = [s for s in _LABEL_SPACES.get(split, (split,)) if s in index]
    labels = {label for s in members for _, label in index[s]}
    return {label: i for i, label in enumerate(sorted(labels, key=label_key))}


class RetrievalDataset(Dataset):
    """Images of one split with integer labels, opened with :func:`common.data.images.open_image`."""

    def __init__(
        self, items: Sequence[Tuple[str, str]], label_map: Dict[str, int], transform: Optional[Callable] = None
    ):
        max_image_pixels()  # a bad RETRIEVAL_MAX_IMAGE_PIXELS is one error line here, not in a worker
        self.images: List[str] = [path for path, _ in items]
        self.labels: List[int] = [label_map[label] for _, label in items]
        self.transform = transform
        self.num_classes = len(set(self.labels))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = open_image(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]


def load_splits(
    data_path: os.PathLike,
    data_name: str,
    crop_type: str,
    transforms: Dict[str, Callable],
    splits: Optional[Sequence[str]] = None,
) -> Dict[str, RetrievalDataset]:
    """Build the datasets named in ``transforms`` (split -> transform) from one index read."""
    index = load_index(data_path, data_name, crop_type)
    out = {}
    for split in splits or transforms.keys():
        if split not in index:
            raise UserError(f"split '{split}' not in the {data_name} index (has: {', '.join(index)})")
        if not index[split]:
            raise UserError(f"split '{split}' of {data_name} is empty")
        out[split] = RetrievalDataset(index[split], label_space(index, split), transforms.get(split))
    return out
