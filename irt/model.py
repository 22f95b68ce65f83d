"""IRT embedding network: a timm Vision Transformer whose final-norm class token, L2-normalised, is the descriptor.

El-Nouby et al., "Training Vision Transformers for Image Retrieval" (arXiv 2102.05644), Sec. 3: no projection
head, no pooling; the CLS token after the last LayerNorm is the image embedding.

Distilled DeiT models (``*_distilled_*``) carry a second (distillation) token. The original implementation trained
on the CLS token but evaluated on (CLS + dist) / 2, because timm returns ``(cls, dist)`` in train mode (the code took
element 0) and their average in eval mode; its key encoder, never put in eval mode, also gave CLS.
``distilled_embedding`` chooses: ``original`` (default: exactly that, by train/eval mode), ``mean`` or ``cls`` (one
rule in training and evaluation alike).

``load_original_encoder`` reads the original's ``encoder.pth`` (``torch.save(encoder.state_dict())`` of the timm
model built with ``num_classes=0``) into this model; ``save_original_encoder`` writes that file.
"""

import os
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import load_state_dict_file
from common.device import unwrap
from common.errors import UserError
from common.hub import create_timm
from common.runio import atomic_save

__all__ = [
    "IRT",
    "DISTILLED_EMBEDDINGS",
    "build_model",
    "dropout_kwargs",
    "parse_model_kwargs",
    "is_original_encoder",
    "original_model_name",
    "load_original_encoder",
    "save_original_encoder",
]

_HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.")
DISTILLED_EMBEDDINGS = ("original", "mean", "cls")


class IRT(nn.Module):
    """ViT backbone -> final-norm token(s) -> L2-normalised embedding of size ``embed_dim``."""

    def __init__(self, backbone: nn.Module, distilled_embedding: str = "original"):
        super().__init__()
        if getattr(backbone, "cls_token", None) is None or not hasattr(backbone, "embed_dim"):
            raise UserError(f"IRT needs a timm Vision Transformer with a class token, not {type(backbone).__name__}")
        if distilled_embedding not in DISTILLED_EMBEDDINGS:
            raise ValueError(f"distilled_embedding must be one of {DISTILLED_EMBEDDINGS}, got {distilled_embedding!r}")
        self.backbone = backbone
        self.distilled = getattr(backbone, "dist_token", None) is not None
        self.distilled_embedding = distilled_embedding
        self.embed_dim: int = backbone.embed_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence after the final norm, (B, prefix tokens + patches, D)."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit vectors. Distilled + ``original``: CLS in train mode, the mean in eval mode."""
        tokens = self.forward_features(x)
        z = tokens[:, 0]
        rule = self.distilled_embedding
        if rule == "original":
            rule = "cls" if self.training else "mean"
        if self.distilled and rule == "mean":
            z = (tokens[:, 0] + tokens[:, 1]) / 2
        if z.dtype in (torch.float16, torch.bfloat16):  # autocast: normalise (and compute losses) in fp32
            z = z.float()
        return F.normalize(z, dim=1)


def parse_model_kwargs(items) -> Dict[str, Any]:
    """['depth=2', 'patch_size=8', 'qkv_bias=false'] -> {'depth': 2, 'patch_size': 8, 'qkv_bias': False}."""
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise UserError(f"--model-kwargs expects KEY=VALUE items, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _adapt_state(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Drop classifier heads and a ``backbone.`` prefix (our own model files); resample a differently sized
    position embedding (e.g. a 224-px checkpoint used at --input-size 32)."""
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    target = model.state_dict().get("pos_embed")
    if "pos_embed" in state and target is not None and state["pos_embed"].shape != target.shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], list(model.patch_embed.grid_size), num_prefix_tokens=prefix
        )
    return state


def _create(name: str, pretrained: bool, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(
                f"--model {name}: not a timm model (e.g. deit_small_patch16_224, deit_small_distilled_patch16_224)"
            ) from None
        raise
    except TypeError as e:
        raise UserError(f"--model {name}: bad --model-kwargs/--input-size/--drop ({e})") from None


def dropout_kwargs(drop: float) -> Dict[str, float]:
    """timm arguments that give ``--drop`` the original's meaning.

    The original's timm (0.5.4) applied ``drop_rate`` after the position embedding, to the attention output
    projection and after both MLP layers (the attention map had its own ``attn_drop_rate``, left at 0). Current timm
    keeps ``drop_rate`` for the classifier head alone, which IRT never calls, and names those three places
    ``pos_drop_rate`` and ``proj_drop_rate`` (attention projection and MLP). Only passed when ``drop > 0``, so a
    model without these arguments still builds at the default."""
    if drop <= 0:
        return {"drop_rate": drop}
    return {"drop_rate": drop, "pos_drop_rate": drop, "proj_drop_rate": drop}


def build_model(
    name: str,
    pretrained: str = "none",
    input_size: Optional[int] = 224,
    drop: float = 0.0,
    drop_path: float = 0.1,
    model_kwargs: Optional[Dict[str, Any]] = None,
    distilled_embedding: str = "original",
) -> IRT:
    """``timm.create_model(name, num_classes=0, ...)`` with weights from ``pretrained`` = imagenet | none | PATH;
    ``drop`` as in the original (``dropout_kwargs``); ``model_kwargs`` entries win over ``drop`` / ``drop_path``."""
    kwargs = {**dropout_kwargs(drop), "drop_path_rate": drop_path, **(model_kwargs or {})}
    if input_size is not None:
        kwargs["img_size"] = input_size
    if pretrained == "imagenet":
        try:
            backbone = create_timm(name, lambda: _create(name, True, **kwargs))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - offline: URLError, OSError, huggingface_hub errors ...
            raise UserError(
                f"cannot load ImageNet weights of {name} ({type(e).__name__}: offline and not in the "
                f"timm/Hugging Face cache?); use --pretrained PATH with a local state dict, "
                f"or --pretrained none"
            ) from None
    else:
        backbone = _create(name, False, **kwargs)
        if pretrained not in (None, "", "none"):
            state = _adapt_state(load_state_dict_file(pretrained), backbone)
            try:
                backbone.load_state_dict(state, strict=True)
            except RuntimeError as e:
                lines = [s.strip() for s in str(e).splitlines() if s.strip()]
                raise UserError(
                    f"--pretrained {pretrained} does not fit {name}: {lines[1] if len(lines) > 1 else lines[0]}"
                ) from None
    return IRT(backbone, distilled_embedding)


def _read_plain_state(path: str) -> Any:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # the original saved CUDA tensors
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read {path} as a PyTorch state dict ({type(e).__name__})") from None


def _is_timm_vit_state(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and "config" not in obj
        and "cls_token" in obj
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def is_original_encoder(path: str) -> bool:
    """True for the original's ``encoder.pth``: a plain timm ViT state dict, no stored configuration."""
    try:
        return _is_timm_vit_state(_read_plain_state(path))
    except UserError:
        return False


def _few(keys: List[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def original_model_name(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The DeiT of the original's README and scripts that a state dict fits, by its shapes:
    ``deit_{tiny,small,base}[_distilled]_patch16_224`` (192/384/768 wide, 12 blocks, 16 px patches, 224 px);
    None for anything else (then the model name must be given)."""
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if proj is None or pos is None or proj.ndim != 4 or tuple(proj.shape[2:]) != (16, 16) or depth != 12:
        return None
    size = {192: "tiny", 384: "small", 768: "base"}.get(int(proj.shape[0]))
    distilled = "dist_token" in state
    if size is None or pos.shape[1] != 196 + 1 + distilled:
        return None
    return f"deit_{size}{'_distilled' if distilled else ''}_patch16_224"


def load_original_encoder(
    path: str,
    name: Optional[str] = None,
    input_size: Optional[int] = 224,
    model_kwargs: Optional[Dict[str, Any]] = None,
    distilled_embedding: str = "original",
    drop: float = 0.0,
    drop_path: float = 0.1,
) -> IRT:
    """The original's ``encoder.pth`` as an ``IRT`` model (``weights_only`` load, CUDA tensors mapped to CPU).

    The file is ``encoder.state_dict()`` of ``timm.create_model(name, num_classes=0)``: timm keys, no prefix, no
    head. ``name=None`` recognises the DeiTs the original used (``original_model_name``). The file must fit the
    model at ``input_size`` exactly (no resampling: it is a trained model, not an initialisation); otherwise one
    line names the missing, unexpected and differently shaped keys.
    """
    state = _read_plain_state(path)
    if not _is_timm_vit_state(state):
        ours = isinstance(state, dict) and "config" in state
        raise UserError(
            f"{path} is not the original's encoder.pth (a plain timm ViT state dict with a cls_token)"
            + ("; it is a model file of this toolkit" if ours else "")
        )
    if name is None:
        name = original_model_name(state)
        if name is None:
            raise UserError(
                f"{path} is not one of the original's DeiT-T/S/B (patch 16, 224 px): give the timm "
                f"model name (--model) it was trained with"
            )
    model = build_model(name, "none", input_size, drop, drop_path, model_kwargs, distilled_embedding)
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    expected = model.backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{what} {_few(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        ]
        if ("dist_token" in state) != ("dist_token" in expected):
            parts.append(
                "the file is a " + ("distilled" if "dist_token" in state else "non-distilled") + " model: check --model"
            )
        raise UserError(f"{path} does not fit --model {name} at --input-size {input_size}: " + "; ".join(parts))
    model.backbone.load_state_dict(state, strict=True)
    return model


def save_original_encoder(model: nn.Module, path: os.PathLike) -> None:
    """Write the backbone as the original's ``encoder.pth`` (timm state dict), atomically, on the CPU."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).backbone.state_dict().items()}
    atomic_save(state, path)
