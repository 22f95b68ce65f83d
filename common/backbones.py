"""torchvision ResNet backbones with ``--pretrained imagenet|none|PATH``."""

import os
from typing import Callable, Dict

import torch
from torch import nn
from torchvision import models

from common.errors import UserError
from common.hub import fetch_url_weights

__all__ = ["BACKBONES", "build_resnet", "load_state_dict_file"]

# name -> (constructor, ImageNet weights). V1 weights are what the original CGD/REIR code loaded.
BACKBONES: Dict[str, tuple] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnext50": (models.resnext50_32x4d, models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1),
    "resnext50_32x4d": (models.resnext50_32x4d, models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1),
}


def load_state_dict_file(path: str) -> dict:
    """Load a local state dict safely (``weights_only``); accept files that wrap it under 'model'/'state_dict'."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained {path}: no such file (give imagenet, none, or a state-dict .pth path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"--pretrained {path}: cannot read it as a PyTorch state dict ({type(e).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _imagenet_state(weights) -> dict:
    """torchvision's weights API: the TORCH_HOME cache, else a download after one quick probe of the server."""
    try:
        return fetch_url_weights(weights.url, lambda: weights.get_state_dict(progress=True, check_hash=False))
    except Exception as e:  # noqa: BLE001 - offline machines raise URLError/OSError/...
        raise UserError(
            f"cannot load ImageNet weights {weights} ({type(e).__name__}: offline and not in the "
            f"TORCH_HOME cache?); use --pretrained PATH with a local copy of the file, or --pretrained none"
        ) from None


def build_resnet(name: str, pretrained: str = "none", keep_fc: bool = True) -> nn.Module:
    """A torchvision ResNet/ResNeXt with weights from ``pretrained`` (imagenet | none | PATH)."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    constructor, weights = BACKBONES[name]
    model = constructor(weights=None)
    if pretrained not in (None, "none"):
        state = _imagenet_state(weights) if pretrained == "imagenet" else load_state_dict_file(pretrained)
        if not keep_fc or not any(k.startswith("fc.") for k in state):
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            state.update({k: v for k, v in model.state_dict().items() if k.startswith("fc.")})
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise UserError(f"--pretrained {pretrained} does not fit {name}: {first}") from None
    return model


def resnet_stages(model: nn.Module) -> Dict[str, Callable]:
    """Named stages of a torchvision ResNet in forward order (stem, layer1..layer4)."""
    return {
        "conv1": model.conv1,
        "bn1": model.bn1,
        "relu": model.relu,
        "maxpool": model.maxpool,
        "layer1": model.layer1,
        "layer2": model.layer2,
        "layer3": model.layer3,
        "layer4": model.layer4,
    }
