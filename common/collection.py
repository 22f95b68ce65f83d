"""A collection of image files to embed: listing a folder / list file / CSV, label ids, and embedding it with a
model, sharded over torchrun processes and gathered by index (``inference.py --gallery`` and ``--add``,
``test.py``, the search service)."""

import argparse
import io
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common.data.files import read_text_file
from common.data.images import IMAGE_EXTENSIONS, open_image
from common.device import script_device
from common.distributed import (
    all_gather_by_index,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    launched_by_torchrun,
)
from common.errors import UserError

__all__ = ["image_paths", "list_items", "label_ids", "ImageFiles", "collate_readable", "embed_items", "join_processes"]


def image_paths(name: str) -> List[str]:
    """One query, or every image below a folder (sorted, recursive)."""
    path = Path(name)
    if not path.is_dir():
        return [name]
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return files


def list_items(source: str) -> List[Tuple[str, Optional[str]]]:
    """(path, label name or None) of an image file, a folder (recursive) or a list file (paths, or a CSV with a
    'path' and an optional 'label' column)."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return [(str(path), None)]
    if path.is_dir():
        return [(p, None) for p in image_paths(str(path))]
    if not path.is_file():
        raise UserError(f"{source}: no such folder or list file")
    text = read_text_file(path, "list file")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and "path" in [c.strip() for c in lines[0].split(",")]:
        frame = pd.read_csv(io.StringIO(text))
        labels = [str(x) for x in frame["label"]] if "label" in frame.columns else [None] * len(frame)
        return list(zip([str(p) for p in frame["path"]], labels))
    return [(line, None) for line in lines]


def label_ids(
    items: Sequence[Tuple[str, Optional[str]]], names: Optional[Dict[str, int]] = None, first_id: int = 0
) -> List[Tuple[str, int]]:
    """(path, label id): no label is -1; integer labels are their own ids unless ``names`` already holds names;
    other labels get ids by sorted name, continuing ``names`` (name -> id, extended in place, new ids from
    ``first_id`` on) so that a database keeps one id per name across additions."""
    given = sorted({x for _, x in items if x is not None}, key=lambda x: (not x.lstrip("-").isdigit(), x))
    if not names and all(x.lstrip("-").isdigit() for x in given):
        return [(p, -1 if x is None else int(x)) for p, x in items]
    names = {} if names is None else names
    for x in given:
        if x not in names:
            names[x] = max(first_id, max(names.values(), default=-1) + 1)
    return [(p, -1 if x is None else names[x]) for p, x in items]


class ImageFiles(torch.utils.data.Dataset):
    """Images of a collection; an unreadable file yields None and is skipped by the collate function."""

    def __init__(self, items: Sequence[Tuple[str, int]], transform):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return self.transform(open_image(self.items[i][0])), i
        except (OSError, ValueError, SyntaxError):
            return None, i


def collate_readable(batch):
    """Stack the readable images of a batch of :class:`ImageFiles` items; (images or None, their indices, the
    indices of the unreadable ones)."""
    good = [(x, i) for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), bad


def join_processes(args: argparse.Namespace) -> torch.device:
    """The device to embed on; under ``torchrun`` this process joins the group (GPU LOCAL_RANK, or a CPU share)."""
    if launched_by_torchrun():
        wants_cuda = torch.cuda.is_available() and getattr(args, "gpu_ids", None) != ""
        return init_distributed(wants_cuda).device
    return script_device(args)


def _all_gather_object(obj):
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.inference_mode()
def embed_items(
    model: nn.Module,
    items: Sequence[Tuple[str, int]],
    transform: Callable,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    desc: str = "embedding",
) -> Tuple[torch.Tensor, List[int], List[int]]:
    """(features of the readable items, their positions in ``items``, positions of the unreadable ones), on every
    rank. Under torchrun rank r embeds items r, r+N, ... and the rows are gathered by index (no padding, each once);
    features are float32 (float64 for a float64 model)."""
    mine = list(range(get_rank(), len(items), get_world_size()))
    if get_world_size() > 1 and is_main_process():
        print(f"{desc}: {len(items)} images shared by {get_world_size()} processes", flush=True)
    loader = DataLoader(
        Subset(ImageFiles(items, transform), mine),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_readable,
    )
    dtype = next(model.parameters()).dtype
    chunks: List[torch.Tensor] = []
    done: List[int] = []
    bad: List[int] = []
    for images, index, failed in tqdm(loader, desc=desc, dynamic_ncols=True, disable=not is_main_process()):
        bad += failed
        if images is not None:
            out = embed(model, images.to(device, dtype)).cpu()
            chunks.append(out if out.dtype == torch.float64 else out.float())
            done += index.tolist()
    dim = max(_all_gather_object(chunks[0].shape[1] if chunks else 0))
    bad = sorted(i for part in _all_gather_object(bad) for i in part)
    unreadable = set(bad)
    kept = [i for i in range(len(items)) if i not in unreadable]
    if dim == 0:
        return torch.empty(0, 0), [], bad
    local = torch.zeros(len(mine), dim, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if chunks:  # item i is row (i - rank) / world of this rank's shard; unreadable rows stay zero, dropped below
        local[(torch.tensor(done) - get_rank()) // get_world_size()] = torch.cat(chunks).to(local.dtype)
    features = all_gather_by_index(local, torch.tensor(mine, dtype=torch.long), len(items))
    return features[kept], kept, bad
