"""leftthomas' own SREML model files (leftthomas/NormSoftmax ``edcb745``) in this toolkit's test / inference /
ablation: ``epochs/<data>_<crop>_<model>_model.pth`` only (SREML saved no database); E and M are read from the
weights (48 / 12 by default, 500 / 192 for its SOP / In-shop runs). Its layout is REIR's but for the classifiers,
``Sequential(Linear)`` (``classifiers.<i>.0``); ``reir.originals`` converts both."""

import re
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from common.errors import UserError
from common.originals import load_original_state, split_name
from reir.originals import import_state, normalise_keys, parse_model_type

__all__ = ["sreml_original_config", "import_sreml"]


def sreml_original_config(path: Path, state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """SREML's ``<data>_<crop>_<model>`` plus E and M read from the classifiers (not in its file name)."""
    name, fields = Path(path).name, split_name(path, "_model.pth")
    pattern = "SREML names its files <data>_<crop>_<model>_model.pth"
    if len(fields) < 3:
        raise UserError(f"{name}: cannot read the settings from the file name ({pattern})")
    heads = {int(m.group(1)) for k in state if (m := re.match(r"classifiers\.(\d+)\.weight$", k))}
    if "classifiers.0.weight" not in state:
        raise UserError(f"{path} holds no REIR/SREML weights (no classifiers.0.0.weight)")
    return {
        "method": "sreml",
        "data_name": fields[0],
        "crop_type": fields[1],
        "label_type": "random",
        "with_random": False,
        "share_type": "layer1",
        "model_type": parse_model_type(fields[2:], name, pattern),
        "ensemble_size": len(heads),
        "meta_class_size": int(state["classifiers.0.weight"].shape[0]),
        "image_size": None,
    }


def import_sreml(path: Path, args: Any = None) -> Tuple[Dict[str, Any], nn.Module]:
    """SREML's ``<data>_<crop>_<model>_model.pth``: stem + layer1 shared, E and M from the classifiers."""
    state = normalise_keys(load_original_state(path))
    return import_state(path, sreml_original_config(path, state), state)
