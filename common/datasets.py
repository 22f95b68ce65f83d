"""Datasets over the processed JSON index that ``data_utils.py`` writes.

Index: ``<data_path>/<name>/<crop_type>_index.json`` = ``{"splits": {split: [[relative_path, raw_label], ...]}}``.
Labels are mapped to integers once per *label space*: the training split has its own, and the evaluation splits
(test, or In-shop query + gallery together) share one, so a query item and its gallery images get the same integer
(the original CGD mapped query and gallery independently).
"""

import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common import images
from common.decode import env_draft
from common.errors import UserError
from common.preprocess import DATASET_NAMES, custom_protocol, ensure_dataset, index_path

__all__ = ["open_image", "load_index", "eval_splits", "label_space", "RetrievalDataset", "load_splits", "make_loader"]

# Splits that are ranked against each other share a label space.
_LABEL_SPACES = {"train": ("train",), "test": ("test",), "query": ("query", "gallery"), "gallery": ("query", "gallery")}


def open_image(path: str, draft: Optional[Tuple[int, int]] = None) -> Image.Image:
    """:func:`common.images.open_image` (8-bit RGB of any mode, EXIF orientation applied, pixel limit) with the
    opt-in reduced JPEG decode: ``draft`` = (w, h), or ``RETRIEVAL_JPEG_DRAFT=N`` for (N, N), lets libjpeg decode at
    1/2, 1/4 or 1/8 scale while both sides stay >= (w, h) (faster; the pixels differ from a full decode, see
    ``common.decode``). Raises :class:`common.images.ImageError` (an ``OSError``) for an unusable file."""
    return images.open_image(path, draft if draft is not None else env_draft())


def load_index(data_path: str, data_name: str, crop_type: str = "uncropped") -> Dict[str, List[Tuple[str, str]]]:
    """Read the processed index (plain JSON: nothing is unpickled); absolute image paths, raw labels."""
    path = index_path(data_path, data_name, crop_type)
    if not path.is_file():
        if data_name not in DATASET_NAMES:
            ensure_dataset(data_path, data_name, crop_type)  # one line naming the path and the command for own data
        raise UserError(
            f"processed dataset not found: {path}; run `python data_utils.py --data_path {data_path} "
            f"--data_name {data_name}` first"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        root = path.parent
        return {
            split: [(_join(root, rel), str(label)) for rel, label in items] for split, items in index["splits"].items()
        }
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"corrupt dataset index {path} ({e}); re-run data_utils.py with --force") from None


def _join(root: Path, rel: str) -> str:
    """Image path: ``root/rel``; custom datasets store images elsewhere in --data_path as ``../<folder>/...``, which is
    folded so result files show ``data/<folder>/...``; absolute paths (images outside --data_path) stay as they are."""
    path = root / rel
    return os.path.normpath(path) if rel.startswith("../") else str(path)


def eval_splits(data_name: str, data_path: str = "data") -> Tuple[str, str]:
    """(query split, gallery split) used for evaluation: In-shop ranks query vs gallery, the other benchmarks test
    vs itself; a custom dataset's protocol is stored in its index under ``data_path`` (pass the script's
    --data_path: the benchmarks never read it)."""
    if data_name in DATASET_NAMES:
        return ("query", "gallery") if data_name == "isc" else ("test", "test")
    return custom_protocol(data_path, data_name)


def _label_key(label: str):
    """Numeric order for numeric labels ('2' < '10'), text order otherwise."""
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def label_space(index: Dict[str, List[Tuple[str, str]]], split: str) -> Dict[str, int]:
    """Raw label -> integer for the label space ``split`` belongs to (shared by In-shop query and gallery)."""
    members = [s for s in _LABEL_SPACES.get(split, (split,)) if s in index]
    labels = {label for s in members for _, label in index[s]}
    return {label: i for i, label in enumerate(sorted(labels, key=_label_key))}


class RetrievalDataset(Dataset):
    """Images of one split with integer labels; ``return_index`` also yields the sample index (DINO style)."""

    def __init__(
        self,
        items: Sequence[Tuple[str, str]],
        label_map: Dict[str, int],
        transform: Optional[Callable] = None,
        return_index: bool = False,
    ):
        images.max_image_pixels()  # a bad RETRIEVAL_MAX_IMAGE_PIXELS is one error line here, not in a worker
        self.images: List[str] = [path for path, _ in items]
        self.labels: List[int] = [label_map[label] for _, label in items]
        self.transform = transform
        self.return_index = return_index
        self.num_classes = len(set(self.labels))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = open_image(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        if self.return_index:
            return img, self.labels[i], i
        return img, self.labels[i]


def load_splits(
    data_path: str,
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


def make_loader(
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = 1,
    shuffle: bool = False,
    num_workers: int = 0,
    batch_sampler=None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with pinned memory on GPU; evaluation loaders keep dataset order (no shuffle)."""
    kwargs = dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=False)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **kwargs)


def labels_tensor(dataset: RetrievalDataset) -> torch.Tensor:
    return torch.as_tensor(dataset.labels, dtype=torch.long)
