"""Backbones for every method: torchvision ResNets and any timm model (``timm:NAME``), with
``--pretrained imagenet|none|PATH``.

:func:`build_backbone` gives a module that maps images to a ``(B, C, H, W)`` feature map, and C; the methods put
their heads on it (CGD's SPoC/MAC/GeM, FastRetri's GeM + BNNeck, REIR/SREML's learners).

* ResNets: ``nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4)`` (indices 0-7, the state-dict
  keys CGD and FastRetri have always had), so a method can change strides or the stem pool in place.
* ``timm:NAME``: ``timm.create_model(NAME, num_classes=0)`` wrapped by :class:`TimmBackbone`. A CNN's
  ``forward_features`` map is used as it is (NHWC outputs, e.g. Swin's, are permuted to NCHW). A Vision Transformer
  returns tokens: the prefix tokens (class, distillation, register: timm's ``num_prefix_tokens``) are dropped and the
  patch tokens, in row-major order, are reshaped to their patch grid, ``(B, N, C) -> (B, C, H/p, W/p)``; that grid is
  the map. ViTs are built with ``dynamic_img_size=True`` so any input size works (the position embedding is
  interpolated), which keeps one architecture per name whatever the crop size.

Weights: ``none`` (random), ``imagenet`` (torchvision's ImageNet weights for ResNets; for timm the pretrained weights
of NAME and its tag, e.g. ``vit_small_patch16_224.dino`` -> DINO's, read from the Hugging Face cache without network
when the cache holds them), or PATH: a state dict ``.pth`` (``torch.load(weights_only=True)``; a ``model`` /
``state_dict`` wrapper and DDP's ``module.`` prefix are removed) or a ``.safetensors`` file. timm weights go through
timm's own pretrained path (its checkpoint filter, classifier removal, strict load), so original-format files that
timm converts (e.g. DINO's own ``.pth``) load too.
"""

import argparse
import copy
import math
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision import models

from common.errors import UserError
from common.hub import fetch_url_weights, hf_cache, require_hf_hub, torch_hub_checkpoints, weights_unavailable

__all__ = [
    "BACKBONES",
    "TIMM_PREFIX",
    "TimmBackbone",
    "backbone_choice",
    "build_backbone",
    "build_resnet",
    "build_timm",
    "fixed_input_size",
    "is_timm",
    "load_state_dict_file",
    "resnet_trunk",
    "tokens_to_map",
]

# name -> (constructor, ImageNet weights). V1 weights are what the original CGD/REIR code loaded.
BACKBONES: Dict[str, tuple] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnext50": (models.resnext50_32x4d, models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1),
    "resnext50_32x4d": (models.resnext50_32x4d, models.ResNeXt50_32X4D_Weights.IMAGENET1K_V1),
}
TIMM_PREFIX = "timm:"
RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def is_timm(name: str) -> bool:
    return str(name).startswith(TIMM_PREFIX)


def _timm_name(name: str) -> str:
    return str(name)[len(TIMM_PREFIX) :]


def backbone_choice(choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type``: one of ``choices`` or ``timm:NAME`` with NAME a model of the installed timm."""

    def parse(text: str) -> str:
        if text in choices:
            return text
        if is_timm(text):
            import timm

            if timm.is_model(_timm_name(text)):
                return text
            raise argparse.ArgumentTypeError(
                f"{_timm_name(text)!r} is not a model of the installed timm {timm.__version__} "
                f"(list them with python -c \"import timm; print(timm.list_models('vit_*'))\")"
            )
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(choices)} or timm:NAME)")

    parse.__name__ = "backbone"
    return parse


# ---- weight files --------------------------------------------------------------------------------------------


def _read_file(path: str) -> object:
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"--pretrained {path}: cannot read it as a safetensors file ({type(e).__name__})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--pretrained {path}: cannot read it as a PyTorch state dict ({type(e).__name__})") from None


def load_state_dict_file(path: str) -> dict:
    """Load a local state dict safely: ``.safetensors``, or ``torch.load(weights_only=True)``; accept files that
    wrap it under 'model'/'state_dict' and DDP's ``module.`` prefix."""
    if not os.path.isfile(path):
        raise UserError(
            f"--pretrained {path}: no such file (give imagenet, none, or a state-dict .pth / .safetensors path)"
        )
    state = _read_file(path)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--pretrained {path}: holds no state dict (a mapping of parameter names to tensors)")
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _first_line(error: Exception) -> str:
    """The informative line of a load error: load_state_dict's first mismatch, else the exception and its text."""
    lines = [s.strip() for s in str(error).splitlines() if s.strip()]
    if isinstance(error, RuntimeError) and len(lines) > 1:
        return lines[1][:300]
    return f"{type(error).__name__} {lines[0] if lines else ''}".strip()[:300]


# ---- torchvision ResNets -------------------------------------------------------------------------------------


def _imagenet_state(weights) -> dict:
    """torchvision's weights API: the TORCH_HOME cache, else a download after one quick probe of the server."""
    try:
        return fetch_url_weights(weights.url, lambda: weights.get_state_dict(progress=True, check_hash=False))
    except Exception as e:  # noqa: BLE001 - offline machines raise HubUnreachable/URLError/OSError/...
        raise weights_unavailable(str(weights), "TORCH_HOME", torch_hub_checkpoints(), e) from None


def build_resnet(name: str, pretrained: str = "none", keep_fc: bool = True) -> nn.Module:
    """A torchvision ResNet/ResNeXt with weights from ``pretrained`` (imagenet | none | PATH)."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)}, or timm:NAME)")
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
            raise UserError(f"--pretrained {pretrained} does not fit {name}: {_first_line(e)}") from None
    return model


def resnet_trunk(name: str, pretrained: str = "none") -> Tuple[nn.Sequential, int]:
    """conv1 ... layer4 of a torchvision ResNet as ``nn.Sequential`` (indices 0-7), and layer4's channels."""
    net = build_resnet(name, pretrained)
    return nn.Sequential(*(getattr(net, name) for name in RESNET_STAGES)), net.fc.in_features


# ---- timm ----------------------------------------------------------------------------------------------------


def tokens_to_map(tokens: torch.Tensor, num_prefix_tokens: int, grid: Tuple[int, int]) -> torch.Tensor:
    """ViT tokens ``(B, prefix + H*W, C)`` -> patch-token map ``(B, C, H, W)`` (row-major patch order)."""
    h, w = grid
    patches = tokens[:, num_prefix_tokens:]
    if patches.shape[1] != h * w:
        raise UserError(
            f"the backbone returned {patches.shape[1]} patch tokens, which do not fill a {h} x {w} patch grid"
        )
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _patch_grid(model: nn.Module, size: Tuple[int, int], n: int) -> Tuple[int, int]:
    """The patch grid of an input of ``size`` (timm's ``patch_embed``), or a square for ``n`` tokens."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and hasattr(embed, "dynamic_feat_size"):
        return tuple(int(s) for s in embed.dynamic_feat_size(tuple(size)))
    if embed is not None and getattr(embed, "patch_size", None) is not None:
        p = embed.patch_size
        ph, pw = (p, p) if isinstance(p, int) else p
        return math.ceil(size[0] / ph), math.ceil(size[1] / pw)
    side = math.isqrt(n)
    return side, side


class TimmBackbone(nn.Module):
    """A timm model (``num_classes=0``) as a feature-map backbone ``(B, C, H, W)``, or, ``pooled``, as its own
    pooled features ``(B, C)`` (what timm's classifier would see: class token or average pool, and its norm)."""

    def __init__(self, model: nn.Module, pooled: bool = False, name: str = ""):
        super().__init__()
        self.model, self.pooled, self.name = model, pooled, name
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        hidden = getattr(model, "head_hidden_size", None)
        self.channels = int(hidden or model.num_features) if pooled else int(model.num_features)

    def feature_map(self, features: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """``forward_features`` output -> ``(B, C, H, W)``."""
        if features.dim() == 3:
            n = features.shape[1] - self.num_prefix_tokens
            return tokens_to_map(features, self.num_prefix_tokens, _patch_grid(self.model, size, n))
        if features.dim() == 4:
            return features.permute(0, 3, 1, 2) if self.nhwc else features
        raise UserError(f"{type(self.model).__name__}: forward_features gives {features.dim()}-D output, not a map")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if self.pooled:
            return self.model.forward_head(features, pre_logits=True)
        return self.feature_map(features, tuple(x.shape[-2:]))


def _hub_files(filename: Optional[str]) -> Sequence[str]:
    """The files timm tries in a hub repository, safetensors first (``timm.models._hub``'s rule)."""
    if not filename:
        return ("model.safetensors", "pytorch_model.bin")
    if filename == "open_clip_pytorch_model.bin":
        return ("open_clip_model.safetensors", filename)
    return (filename[:-4] + ".safetensors", filename) if filename.endswith(".bin") else (filename,)


def _cached_weights(name: str) -> Optional[str]:
    """The file timm's ``pretrained=True`` would read for NAME, when the Hugging Face cache already holds it."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for filename in _hub_files(cfg.hf_hub_filename):
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _create_timm(name: str, pretrained: bool = False, dynamic: bool = True, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``; ViTs with ``dynamic_img_size`` (models without it build plain)."""
    import timm

    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r} (list them with timm.list_models())")
    if dynamic:
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


def build_timm(name: str, pretrained: str = "none") -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` with weights from ``pretrained`` (imagenet | none | PATH)."""
    source = pretrained
    try:
        if pretrained in (None, "", "none"):
            return _create_timm(name)
        if pretrained == "imagenet":
            cached = _cached_weights(name)
            if cached is None:
                require_hf_hub()  # HubUnreachable: the one-line refusal below
                return _create_timm(name, pretrained=True)
            source = cached
        state = load_state_dict_file(source)
        return _create_timm(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state})
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - timm's loaders raise RuntimeError/KeyError/OSError/hub errors
        if pretrained == "imagenet" and source == pretrained:
            raise weights_unavailable(f"timm:{name}", "Hugging Face", hf_cache(), e) from None
        raise UserError(f"--pretrained {source} does not fit timm:{name}: {_first_line(e)}") from None


def fixed_input_size(model: nn.Module, size: Sequence[int]) -> nn.Module:
    """``model`` with every dynamic-size timm model inside rebuilt for input ``size`` alone (for export).

    The position embedding is resampled once, by timm's checkpoint filter, as the dynamic forward resamples it at
    every call, so outputs at ``size`` are the same; the traced graph then holds no interpolation (ONNX cannot
    export timm's antialiased bicubic resize). ``model`` is left as it is: a copy is returned when one changes."""
    names = [
        n for n, m in model.named_modules() if isinstance(m, TimmBackbone) and getattr(m.model, "dynamic_img_size", 0)
    ]
    if not names:
        return model
    model = copy.deepcopy(model)
    for n in names:
        backbone = model.get_submodule(n)
        state = {k: v.detach().float().cpu() for k, v in backbone.model.state_dict().items()}
        fixed = _create_timm(
            backbone.name,
            pretrained=True,
            dynamic=False,
            img_size=tuple(int(s) for s in size),
            pretrained_cfg_overlay={"state_dict": state},
        )
        backbone.model = fixed.eval().requires_grad_(False)
    return model


# ---- one entry point -----------------------------------------------------------------------------------------


def build_backbone(name: str, pretrained: str = "none", pooled: bool = False) -> Tuple[nn.Module, int]:
    """(module, C): images -> ``(B, C, H, W)`` feature map (``pooled``: ``(B, C)`` pooled features).

    ``name``: a torchvision ResNet of :data:`BACKBONES` or ``timm:NAME``; ``pretrained``: imagenet | none | PATH.
    """
    if is_timm(name):
        backbone = TimmBackbone(build_timm(_timm_name(name), pretrained), pooled=pooled, name=_timm_name(name))
        return backbone, backbone.channels
    trunk, channels = resnet_trunk(name, pretrained)
    if pooled:
        trunk = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return trunk, channels
