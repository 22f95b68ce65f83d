"""IRT embedding network: a timm Vision Transformer whose final-norm class token, L2-normalised, is the descriptor.

El-Nouby et al., "Training Vision Transformers for Image Retrieval" (arXiv 2102.05644), Sec. 3: no projection
head, no pooling; the CLS token after the last LayerNorm is the image embedding.

Distilled DeiT models (``*_distilled_*``) carry a second (distillation) token. The original implementation trained
on the CLS token but evaluated on (CLS + dist) / 2 because timm switches outputs with ``model.eval()``. Here one rule
holds in training *and* evaluation, chosen by ``distilled_embedding``: ``mean`` (default: the descriptor the
original evaluated) or ``cls``.
"""
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import load_state_dict_file
from common.errors import UserError

__all__ = ["IRT", "build_model", "parse_model_kwargs"]

_HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.")


class IRT(nn.Module):
    """ViT backbone -> final-norm token(s) -> L2-normalised embedding of size ``embed_dim``."""

    def __init__(self, backbone: nn.Module, distilled_embedding: str = "mean"):
        super().__init__()
        if getattr(backbone, "cls_token", None) is None or not hasattr(backbone, "embed_dim"):
            raise UserError(f"IRT needs a timm Vision Transformer with a class token, not {type(backbone).__name__}")
        if distilled_embedding not in ("mean", "cls"):
            raise ValueError(f"distilled_embedding must be 'mean' or 'cls', got {distilled_embedding!r}")
        self.backbone = backbone
        self.distilled = getattr(backbone, "dist_token", None) is not None
        self.distilled_embedding = distilled_embedding
        self.embed_dim: int = backbone.embed_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence after the final norm, (B, prefix tokens + patches, D)."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit vectors; the same rule in train and eval mode."""
        tokens = self.forward_features(x)
        z = tokens[:, 0]
        if self.distilled and self.distilled_embedding == "mean":
            z = (tokens[:, 0] + tokens[:, 1]) / 2
        return F.normalize(z.float(), dim=1)


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
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    target = model.state_dict().get("pos_embed")
    if "pos_embed" in state and target is not None and state["pos_embed"].shape != target.shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)
    return state


def _create(name: str, pretrained: bool, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"--model {name}: not a timm model (e.g. deit_small_patch16_224, "
                            f"deit_small_distilled_patch16_224)") from None
        raise
    except TypeError as e:
        raise UserError(f"--model {name}: bad --model-kwargs/--input-size ({e})") from None


def build_model(name: str, pretrained: str = "none", input_size: Optional[int] = 224, drop: float = 0.0,
                drop_path: float = 0.1, model_kwargs: Optional[Dict[str, Any]] = None,
                distilled_embedding: str = "mean") -> IRT:
    """``timm.create_model(name, num_classes=0, ...)`` with weights from ``pretrained`` = imagenet | none | PATH."""
    kwargs = dict(model_kwargs or {}, drop_rate=drop, drop_path_rate=drop_path)
    if input_size is not None:
        kwargs["img_size"] = input_size
    if pretrained == "imagenet":
        try:
            backbone = _create(name, True, **kwargs)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - offline: URLError, OSError, huggingface_hub errors ...
            raise UserError(f"cannot load ImageNet weights of {name} ({type(e).__name__}: offline and not in the "
                            f"timm/Hugging Face cache?); use --pretrained PATH with a local state dict, "
                            f"or --pretrained none") from None
    else:
        backbone = _create(name, False, **kwargs)
        if pretrained not in (None, "", "none"):
            state = _adapt_state(load_state_dict_file(pretrained), backbone)
            try:
                backbone.load_state_dict(state, strict=True)
            except RuntimeError as e:
                lines = [s.strip() for s in str(e).splitlines() if s.strip()]
                raise UserError(f"--pretrained {pretrained} does not fit {name}: "
                                f"{lines[1] if len(lines) > 1 else lines[0]}") from None
    return IRT(backbone, distilled_embedding)
