"""Meta-classes: each learner sees the C training classes merged at random into M balanced meta-classes.

``random``: DREML's ``createID`` per learner (concatenate ceil(C/M) permutations of 0..M-1, truncate to C,
shuffle). ``fixed``: the same, redrawn (at most ``tries`` times) until every class has a unique code, the
E-tuple of its meta-labels, so that the ensemble can tell all training classes apart. If every try collides,
the colliding classes get fresh random codes, drawn one coordinate at a time; the original enumerated the whole
M^E product space here. Seeded (the original was not), and saved with its configuration.
"""

import math
import random
from pathlib import Path
from typing import Dict, List

import torch

from common.errors import UserError
from common.runio import atomic_save, check_config, safe_load

__all__ = [
    "balanced_assignment",
    "has_conflicts",
    "unique_codes",
    "assign_meta_classes",
    "ids_path",
    "save_ids",
    "load_ids",
    "meta_class_ids",
]

LABEL_TYPES = ("fixed", "random")


def balanced_assignment(num_classes: int, meta_class_size: int, rng: random.Random) -> List[int]:
    """Meta-class of every class for one learner; each meta-class gets floor(C/M) or ceil(C/M) classes."""
    ids: List[int] = []
    for _ in range(math.ceil(num_classes / meta_class_size)):
        perm = list(range(meta_class_size))
        rng.shuffle(perm)
        ids += perm
    ids = ids[:num_classes]
    rng.shuffle(ids)
    return ids


def has_conflicts(ids: torch.Tensor) -> bool:
    """True when two classes share the same code (column of the [E, C] tensor)."""
    return len({tuple(c) for c in ids.t().tolist()}) < ids.shape[1]


def unique_codes(ids: torch.Tensor, meta_class_size: int, rng: random.Random) -> torch.Tensor:
    """Keep the first class of every code; give each later duplicate a random unused code."""
    codes = ids.t().tolist()
    seen = set()
    for c, code in enumerate(codes):
        code = tuple(code)
        while code in seen:  # M^E >= C is checked by the caller, so an unused code exists
            code = tuple(rng.randrange(meta_class_size) for _ in range(len(code)))
        seen.add(code)
        codes[c] = list(code)
    return torch.tensor(codes, dtype=torch.long).t().contiguous()


def assign_meta_classes(
    num_classes: int,
    ensemble_size: int,
    meta_class_size: int,
    label_type: str = "fixed",
    seed: int = 0,
    tries: int = 10,
    verbose: bool = True,
) -> torch.Tensor:
    """[E, C] long tensor: ``ids[e, c]`` is the meta-class of training class c for learner e."""
    if label_type not in LABEL_TYPES:
        raise UserError(f"unknown --label_type {label_type!r} (choose from {', '.join(LABEL_TYPES)})")
    if meta_class_size > num_classes:
        raise UserError(f"--meta_class_size {meta_class_size} is larger than the {num_classes} training classes")
    if label_type == "fixed" and meta_class_size**ensemble_size < num_classes:
        raise UserError(
            f"--label_type fixed needs meta_class_size^ensemble_size >= {num_classes} classes, got "
            f"{meta_class_size}^{ensemble_size}"
        )
    rng = random.Random(seed)
    for _ in range(max(1, tries) if label_type == "fixed" else 1):
        ids = torch.tensor(
            [balanced_assignment(num_classes, meta_class_size, rng) for _ in range(ensemble_size)], dtype=torch.long
        )
        if label_type == "random" or not has_conflicts(ids):
            break
    else:
        ids = unique_codes(ids, meta_class_size, rng)
    if verbose:
        print(f"{label_type} assigned labels have {'' if has_conflicts(ids) else 'no '}conflicts")
    return ids


def ids_path(
    directory: Path, data_name: str, crop_type: str, label_type: str, ensemble_size: int, meta_class_size: int
) -> Path:
    """``<dir>/<data>_<crop>_<label>_<E>_<M>_ids.pth`` (the original's name lacked the crop type)."""
    return Path(directory) / f"{data_name}_{crop_type}_{label_type}_{ensemble_size}_{meta_class_size}_ids.pth"


def _ids_config(
    data_name: str, crop_type: str, label_type: str, ensemble_size: int, meta_class_size: int, num_classes: int
) -> Dict[str, object]:
    return {
        "data_name": data_name,
        "crop_type": crop_type,
        "label_type": label_type,
        "ensemble_size": ensemble_size,
        "meta_class_size": meta_class_size,
        "num_classes": num_classes,
    }


def save_ids(path: Path, ids: torch.Tensor, config: Dict[str, object]) -> None:
    atomic_save({"config": dict(config), "ids": ids}, path)


def load_ids(path: Path, config: Dict[str, object]) -> torch.Tensor:
    """Load an ids file after checking it was made for this dataset, label type, E, M and class count."""
    state = safe_load(path, "meta-class ids file")
    check_config(state["config"], config, f"ids file {path}", list(config))
    return state["ids"]


def meta_class_ids(
    directory: Path,
    data_name: str,
    crop_type: str,
    label_type: str,
    ensemble_size: int,
    meta_class_size: int,
    num_classes: int,
    seed: int,
    reuse: bool,
    main: bool = True,
) -> torch.Tensor:
    """Draw (and save) or, with ``reuse`` (``--load_ids``), load the assignment of this configuration.

    Every process of a DDP run draws the same (seeded) ids; only the ``main`` one saves and prints."""
    config = _ids_config(data_name, crop_type, label_type, ensemble_size, meta_class_size, num_classes)
    path = ids_path(directory, data_name, crop_type, label_type, ensemble_size, meta_class_size)
    if reuse:
        ids = load_ids(path, config)
        if main:
            print(f"loaded meta-class ids from {path}")
        return ids
    ids = assign_meta_classes(num_classes, ensemble_size, meta_class_size, label_type, seed, verbose=main)
    if main:
        save_ids(path, ids, {**config, "seed": seed})
    return ids
