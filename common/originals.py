"""Files written by the original projects, which store no configuration: leftthomas' ``<run>_data_base.pth``
(CGD, REIR) and plain ``state_dict`` model files, loaded with ``weights_only=True`` and CUDA tensors mapped to CPU.

The model-defining settings come from the original file name (leftthomas encodes them in it) through the method's
``MethodSpec.original_config``; a file that fits no model is refused in one line naming the mismatching keys.
"""

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from common.database import Database, Split
from common.errors import UserError

__all__ = ["read_original", "original_database", "load_original_state", "check_layout", "strict_load", "split_name"]


def read_original(path: Path, what: str) -> Dict[str, Any]:
    """``torch.load(weights_only=True, map_location='cpu')`` of an original file, one line on failure."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle of arbitrary objects, a truncated file ...
        raise UserError(
            f"cannot read {what} {path} with weights_only=True ({type(e).__name__}); re-save its "
            "tensors alone, e.g. torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a dict of tensors")
    return obj


def original_database(
    path: Path,
    config: Dict[str, Any],
    method: str,
    metric: str,
    scale: Callable[[Mapping[str, Any]], float],
    flatten: bool = False,
) -> Database:
    """leftthomas' layout: ``test_images/labels/features`` (the query split for In-shop), ``gallery_*`` for
    In-shop (REIR: for every dataset, the same lists as ``test_*``), REIR's ``train_*``; features may be CUDA
    tensors and REIR's are ``[N, E, M]`` per-learner unit vectors (``flatten`` concatenates them)."""
    obj = read_original(path, "database")
    if "test_features" not in obj:
        raise UserError(f"database {path} is neither this toolkit's nor an original one (no test_features)")
    splits: Dict[str, Split] = {}
    for prefix in ("train", "test", "gallery"):
        if f"{prefix}_features" in obj:
            features = obj[f"{prefix}_features"].float().cpu()
            if flatten:
                features = features.reshape(len(features), -1)
            splits[prefix] = Split(list(obj[f"{prefix}_images"]), [int(x) for x in obj[f"{prefix}_labels"]], features)
    in_shop = config.get("data_name") == "isc"
    query, gallery = ("test", "gallery") if in_shop else ("test", "test")
    if not in_shop:
        splits.pop("gallery", None)
    else:
        splits["query"] = splits.pop("test")
        query = "query"
    config = {**config, "method": method, "original_file": str(path)}
    return Database(config, method, metric, scale(config), query, gallery, splits)


def load_original_state(path: Path) -> Dict[str, torch.Tensor]:
    """A plain state dict (the originals saved ``model.state_dict()``), ``module.`` prefixes of DataParallel
    removed."""
    state = read_original(path, "model")
    if "config" in state:
        raise UserError(f"{path} is a file of this toolkit, not an original one")
    state = state.get("state_dict", state.get("model", state)) if not _all_tensors(state) else state
    if not _all_tensors(state):
        raise UserError(f"model {path} holds no plain state dict")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def _all_tensors(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def check_layout(state: Mapping[str, torch.Tensor], layout: Mapping[str, Tuple[int, ...]], what: str) -> None:
    """``state`` must hold exactly ``layout``'s keys with its shapes; otherwise one line naming the missing,
    unexpected and mis-shaped keys (four of each at most)."""
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {layout[k]}"
        for k in layout
        if k in state and tuple(state[k].shape) != layout[k]
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        ]
        raise UserError(f"{what} does not fit the model its name describes; " + "; ".join(parts))


def strict_load(
    model: nn.Module, state: Mapping[str, torch.Tensor], what: str, renames: Optional[Callable[[str], str]] = None
) -> nn.Module:
    """Load strictly; a mismatch becomes one line naming the missing, unexpected and mis-shaped keys."""
    if renames is not None:
        state = {renames(k): v for k, v in state.items()}
    check_layout(state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, what)
    model.load_state_dict(state, strict=True)
    return model


def split_name(path: Path, suffix: str) -> Tuple[str, ...]:
    """``car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_model.pth`` -> its '_'-separated fields."""
    name = Path(path).name
    if not name.endswith(suffix):
        raise UserError(f"{name}: an original file is named <run>{suffix}")
    return tuple(name[: -len(suffix)].split("_"))
