"""CGD: Combination of multiple Global Descriptors (Jun et al., arXiv 1903.10663).

A ResNet whose ``layer3`` keeps its input resolution (14x14 map at 224 px, as in leftthomas/CGD), or any timm
model's feature map (``--backbone_type timm:NAME``; a ViT's patch tokens on their grid), followed by
``n`` global descriptors (SPoC / MAC / GeM). Each descriptor goes through its own bias-free FC to
``feature_dim / n`` dimensions and is L2-normalised; the concatenation is L2-normalised again and is the
retrieval embedding. An auxiliary classifier (BatchNorm1d -> Linear) on the FIRST descriptor, taken before its
FC, carries the classification loss. Attribute names (``features``, ``global_descriptors``, ``main_modules``,
``auxiliary_module``) follow the original so its state-dict keys are the same.
"""

import copy
import warnings
from typing import Any, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import build_backbone, is_timm
from common.device import unwrap
from common.errors import UserError
from common.pooling import GeM  # p = 3 fixed, clamp(eps) before the power: no NaN gradient on all-zero channels

__all__ = [
    "SPoC",
    "MAC",
    "GeM",
    "DESCRIPTORS",
    "GD_CONFIGS",
    "BACKBONE_TYPES",
    "MODEL_KEYS",
    "Model",
    "build_features",
    "embed",
    "freeze_bn",
    "count_flops",
    "model_from_config",
]

GD_CONFIGS = ("S", "M", "G", "SM", "MS", "SG", "GS", "MG", "GM", "SMG", "MSG", "GSM")
BACKBONE_TYPES = ("resnet50", "resnext50", "resnet18", "resnet34")
# Configuration keys that define the model and its inputs; stored in checkpoints and databases, checked on load.
MODEL_KEYS = ("backbone_type", "gd_config", "feature_dim", "num_classes", "data_name", "crop_type", "image_size")


class SPoC(nn.Module):
    """Sum-pooled convolutional features (Babenko & Lempitsky 2015): f_c = (1/|X_c|) sum_x x, i.e. GeM with p=1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        return x.mean(dim=(-2, -1))


class MAC(nn.Module):
    """Maximum activation of convolutions (Tolias et al. 2016): f_c = max_x x, i.e. GeM with p -> inf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        return x.amax(dim=(-2, -1))


DESCRIPTORS = {"S": SPoC, "M": MAC, "G": GeM}


class L2Norm(nn.Module):
    """Unit-length rows (F.normalize, eps 1e-12)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=-1)


def build_features(backbone_type: str, pretrained: str = "none") -> Tuple[nn.Module, int]:
    """The backbone's feature map and its channels C.

    ResNets: conv1 ... layer4 (no pooling/fc) with layer3's down-sampling removed. Only strides change, so every
    weight keeps its torchvision shape and ImageNet weights load strictly. Bottleneck blocks stride on conv2
    (ResNet v1.5), BasicBlocks on conv1; both also on the shortcut conv. ``timm:NAME``: the timm model's own map
    (a ViT's patch tokens on their grid, ``common.backbones``), strides as timm built them.
    """
    if not is_timm(backbone_type) and backbone_type not in BACKBONE_TYPES:
        raise UserError(
            f"unknown backbone_type {backbone_type!r} (choose from {', '.join(BACKBONE_TYPES)}, or timm:NAME)"
        )
    trunk, channels = build_backbone(backbone_type, pretrained)
    if not is_timm(backbone_type):
        block = trunk[6][0]  # layer3's first block
        strided = block.conv2 if hasattr(block, "conv3") else block.conv1
        strided.stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    return trunk, channels


class Model(nn.Module):
    """CGD network; ``forward`` returns (embedding (B, feature_dim) of unit length, logits (B, num_classes))."""

    def __init__(
        self, backbone_type: str, gd_config: str, feature_dim: int, num_classes: int, pretrained: str = "none"
    ):
        super().__init__()
        if gd_config not in GD_CONFIGS:
            raise UserError(f"unknown gd_config {gd_config!r} (choose from {', '.join(GD_CONFIGS)})")
        n = len(gd_config)
        if feature_dim % n != 0:
            raise UserError(
                f"--feature_dim {feature_dim} is not divisible by the {n} global descriptors of --gd_config {gd_config}"
            )
        self.features, channels = build_features(backbone_type, pretrained)
        k = feature_dim // n
        self.gd_config = gd_config
        self.global_descriptors = nn.ModuleList([DESCRIPTORS[letter]() for letter in gd_config])
        self.main_modules = nn.ModuleList(
            [nn.Sequential(nn.Linear(channels, k, bias=False), L2Norm()) for _ in gd_config]
        )
        self.auxiliary_module = nn.Sequential(nn.BatchNorm1d(channels), nn.Linear(channels, num_classes))
        self.l2 = L2Norm()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map (B, C, H/16, W/16 for ResNets and ViT/16s)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fmap = self.forward_features(x)
        pooled = [gd(fmap) for gd in self.global_descriptors]
        embedding = self.l2(torch.cat([fc(p) for fc, p in zip(self.main_modules, pooled)], dim=-1))
        logits = self.auxiliary_module(pooled[0])
        return embedding, logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Retrieval embedding only (what evaluation and inference use)."""
        return self(x)[0]


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Retrieval embedding of a batch through any wrapper (DataParallel): the first output of ``forward``."""
    return model(images)[0]


def freeze_bn(model: nn.Module) -> None:
    """Put every BatchNorm2d (the backbone's) in eval mode: running statistics stay at their loaded values.

    Their affine weights still train; the auxiliary BatchNorm1d is untouched. Call after ``model.train()``.
    (Any BatchNorm of the backbone counts, so the global-batch BatchNorm of a DDP run is frozen too.)
    """
    for module in unwrap(model).features.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def count_flops(model: nn.Module, image_size: int = 224) -> Tuple[int, float]:
    """(parameters, thop FLOPs) for one image; profiles a deep copy so no thop buffers leak into the model."""
    import thop  # optional at import time: only training prints FLOPs

    probe = copy.deepcopy(model).cpu().float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # thop's distutils version check
        flops, _ = thop.profile(probe, inputs=(torch.randn(1, 3, image_size, image_size),), verbose=False)
    return sum(p.numel() for p in model.parameters()), flops


def model_from_config(config: Mapping[str, Any]) -> Model:
    """An untrained model with the architecture a stored configuration describes."""
    return Model(
        config["backbone_type"],
        config["gd_config"],
        int(config["feature_dim"]),
        int(config["num_classes"]),
        pretrained="none",
    )
