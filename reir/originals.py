"""leftthomas' own REIR files (leftthomas/NormSoftmax history) in this toolkit's test / inference / ablation, and the
layout conversion SREML's reader (``sreml.originals``) shares.

The originals saved no configuration; the settings come from the file name:

* REIR (``2c88830``): ``epochs/<run>_model.pth`` and ``results/<run>_data_base.pth`` with
  ``<run> = <data>_<crop>_<label>_<random|unrandom>_<share>_<model>_<E>_<M>``;
* SREML (``edcb745``, read by ``sreml.originals``): ``epochs/<data>_<crop>_<model>_model.pth`` only.

The original model is E separate torchvision branches: ``common_extractor.<k>`` (the shared stages, as here),
per learner ``head.<i>`` (``Sequential`` of the private ones among conv1, bn1, relu, maxpool), ``layer1.<i>`` …
``layer4.<i>`` and ``classifiers.<i>`` (``Linear``; SREML ``Sequential(Linear)``, hence ``classifiers.<i>.0``).
This toolkit holds the same E branches as one ``EnsembleBranches`` (``branches.0``): every private convolution
and BatchNorm tensor is the E per-learner tensors concatenated along dimension 0 (output channels, learner i
at rows ``i*C:(i+1)*C``, which is exactly what a convolution with ``groups = E`` reads), and the heads are
stacked to ``weight [E, M, d]`` / ``bias [E, M]``.
"""

import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from common.database import Database
from common.errors import UserError
from common.originals import check_layout, load_original_state, original_database, split_name
from reir.model import MODEL_TYPES, SHARE_TYPES, STAGES, model_from_config

__all__ = [
    "reir_original_config",
    "parse_model_type",
    "normalise_keys",
    "original_layout",
    "to_model_state",
    "import_state",
    "import_reir",
    "reir_database",
]

HEAD_STAGES = ("conv1", "bn1", "relu", "maxpool")  # the original's per-learner ``head`` Sequential
_OUR_PRIVATE = re.compile(r"branches\.0\.features\.(\d+)\.(.+)")
_NESTED_CLASSIFIER = re.compile(r"^classifiers\.(\d+)\.0\.")  # SREML's Sequential(Linear)


def parse_model_type(fields: Tuple[str, ...], name: str, pattern: str) -> str:
    """A backbone name that itself contains '_' (``resnext50_32x4d``) spans several fields."""
    model_type = "_".join(fields)
    if model_type not in MODEL_TYPES:
        raise UserError(f"{name}: model type {model_type!r} is not one of {', '.join(MODEL_TYPES)} ({pattern})")
    return model_type


def reir_original_config(path: Path, suffix: str) -> Dict[str, Any]:
    """The settings REIR's ``save_name_pre`` encodes (``<data>_<crop>_<label>_<random|unrandom>_<share>_<model>_
    <E>_<M>``; the backbone may itself contain '_')."""
    name, fields = Path(path).name, split_name(path, suffix)
    pattern = f"REIR names its files <data>_<crop>_<label>_<random|unrandom>_<share>_<model>_<E>_<M>{suffix}"
    if (
        len(fields) < 8
        or fields[2] not in ("fixed", "random")
        or fields[3] not in ("random", "unrandom")
        or fields[4] not in SHARE_TYPES
        or not (fields[-2].isdigit() and fields[-1].isdigit())
    ):
        raise UserError(f"{name}: cannot read the settings from the file name ({pattern})")
    return {
        "method": "reir",
        "data_name": fields[0],
        "crop_type": fields[1],
        "label_type": fields[2],
        "with_random": fields[3] == "random",
        "share_type": fields[4],
        "model_type": parse_model_type(fields[5:-2], name, pattern),
        "ensemble_size": int(fields[-2]),
        "meta_class_size": int(fields[-1]),
        "image_size": None,
    }


def normalise_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``classifiers.<i>.0.*`` (SREML) -> ``classifiers.<i>.*`` (REIR): one layout to check and convert."""
    return {_NESTED_CLASSIFIER.sub(r"classifiers.\1.", k, count=1): v for k, v in state.items()}


def _private_stages(share_type: str) -> Tuple[str, ...]:
    return STAGES if share_type == "none" else STAGES[STAGES.index(share_type) + 1 :]


def _original_prefixes(share_type: str, index: int, e: int) -> List[str]:
    """The original's key prefix of private stage ``index`` (our ``branches.0.features.<index>``) per learner."""
    private = _private_stages(share_type)
    stage = private[index]
    if stage in HEAD_STAGES:
        position = [s for s in HEAD_STAGES if s in private].index(stage)
        return [f"head.{i}.{position}" for i in range(e)]
    return [f"{stage}.{i}" for i in range(e)]


def _sources(key: str, config: Mapping[str, Any]) -> Optional[List[str]]:
    """The E original keys our ``key`` is made of (None: the same key in both layouts)."""
    e = config["ensemble_size"]
    if key in ("branches.0.weight", "branches.0.bias"):
        return [f"classifiers.{i}.{key.rsplit('.', 1)[1]}" for i in range(e)]
    match = _OUR_PRIVATE.fullmatch(key)
    if match is None:
        return None
    index, rest = int(match.group(1)), match.group(2)
    return [f"{p}.{rest}" for p in _original_prefixes(config["share_type"], index, e)]


def _meta_state(config: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Our state dict for ``config`` on the ``meta`` device (keys and shapes, no memory)."""
    with torch.device("meta"):
        return model_from_config(config).state_dict()


def original_layout(
    config: Mapping[str, Any], ours: Optional[Mapping[str, torch.Tensor]] = None
) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the original's state dict for ``config`` (derived from our layout)."""
    ours = _meta_state(config) if ours is None else ours
    e, layout = config["ensemble_size"], {}
    for key, value in ours.items():
        sources = _sources(key, config)
        if sources is None:
            layout[key] = tuple(value.shape)
            continue
        if key.startswith("branches.0.features."):
            shape = () if value.dim() == 0 else (value.shape[0] // e, *value.shape[1:])
        else:
            shape = tuple(value.shape[1:])  # heads: [E, M, d] / [E, M]
        layout.update({s: tuple(shape) for s in sources})
    return layout


def to_model_state(
    state: Dict[str, torch.Tensor], config: Mapping[str, Any], keys: Iterable[str]
) -> Dict[str, torch.Tensor]:
    """The original's tensors in our layout (``keys``: our state-dict keys). Per-learner convolution / BatchNorm
    tensors are concatenated along dimension 0, heads stacked; ``num_batches_tracked`` (E equal counters in the
    original) is learner 0's. The original tensors are released as they are used."""
    out = {}
    for key in keys:
        sources = _sources(key, config)
        if sources is None:
            out[key] = state.pop(key)
            continue
        parts = [state.pop(s) for s in sources]
        if key in ("branches.0.weight", "branches.0.bias"):
            out[key] = torch.stack(parts)
        else:
            out[key] = parts[0] if parts[0].dim() == 0 else torch.cat(parts)
    return out


def import_state(
    path: Path, config: Dict[str, Any], state: Dict[str, torch.Tensor]
) -> Tuple[Dict[str, Any], nn.Module]:
    """The model of ``config`` holding an original's ``state`` (checked against the layout first, one line)."""
    what = f"model {path}"
    ours = _meta_state(config)
    check_layout(state, original_layout(config, ours), what)  # before the real model is allocated
    model = model_from_config(config)
    model.load_state_dict(to_model_state(state, config, ours), strict=True)
    # original_file: the model came from an original project's file (common.runs re-imports it by name);
    # model_file: a database embedded with it (test.py --save_data_base, inference --gallery) finds it again.
    config.update(original_file=str(path), model_file=str(Path(path).resolve()))
    return config, model


def import_reir(path: Path, args: Any = None) -> Tuple[Dict[str, Any], nn.Module]:
    """REIR's ``<run>_model.pth``: settings from the file name, weights mapped to the grouped layout."""
    config = reir_original_config(path, "_model.pth")
    return import_state(path, config, normalise_keys(load_original_state(path)))


def reir_database(path: Path) -> Database:
    """REIR's ``<run>_data_base.pth``: ``[N, E, M]`` per-learner unit vectors, concatenated to ``[N, E*M]``
    (cosine with scale E = the original's mean per-learner cosine); settings from the file name."""
    config = reir_original_config(path, "_data_base.pth")
    db = original_database(path, config, "reir", "cosine", lambda c: float(c["ensemble_size"]), flatten=True)
    width = config["ensemble_size"] * config["meta_class_size"]
    for name, split in db.splits.items():
        if split.features.dim() != 2 or split.features.shape[1] != width:
            raise UserError(
                f"database {path}: {name} features have shape {tuple(split.features.shape)} after flattening, "
                f"but the name says E={config['ensemble_size']} x M={config['meta_class_size']} = {width}"
            )
    return db
