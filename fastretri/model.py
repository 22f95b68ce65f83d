"""FastRetri model (fast-reid ``Baseline`` + ``EmbeddingHead`` as configured by projects/FastRetri).

ResNet (last stride 1, every BatchNorm frozen: statistics and affine) -> GeM (p=3) -> BNNeck (BatchNorm1d whose
bias is frozen; its output is the embedding) -> bias-free linear classifier initialised N(0, 0.01). fast-reid's
other heads are options: ``MODEL.BACKBONE.NORM`` (FrozenBN, BN, syncBN), ``MODEL.HEADS.POOL_LAYER`` (its pooling
layers) and ``MODEL.HEADS.CLS_LAYER`` (Linear, or cosine logits for CosSoftmax / ArcSoftmax / CircleSoftmax, whose
margins the loss applies: they need the labels).

The stem max-pool is fastreid's ``MaxPool2d(3, stride=2, padding=0, ceil_mode=True)``, not torchvision's
``padding=1``: the same 56 x 56 map at 224 px, but on a grid shifted by one pixel (and other sizes at some odd
inputs). Weights do not depend on it, so torchvision's ImageNet weights load unchanged.

``MODEL.BACKBONE.NAME: timm:NAME`` puts the same head on any timm model's feature map (a ViT's patch tokens on their
grid, ``common.backbones``); ``LAST_STRIDE`` and the stem pool are ResNet settings and leave it as timm built it,
and ``NORM: FrozenBN`` freezes whatever BatchNorm it has (none in a ViT or ConvNeXt).

The neck's BatchNorm is fast-reid's SyncBN in spirit: with several processes it normalises with the statistics of
the *global* batch (so 4 x 32 images behave like 1 x 128), but unlike ``nn.SyncBatchNorm`` it needs no GPU and no
process group: a single process is a plain BatchNorm1d (the original crashed there, fast-reid #667).
"""

import os
import re
from typing import Any, Callable, Dict, Mapping, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import build_backbone, is_timm
from common.distributed import GlobalBatchNorm, convert_global_batchnorm
from common.errors import UserError
from common.pooling import GeM
from common.presets import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "GlobalBatchNorm1d",
    "POOL_LAYERS",
    "BACKBONE_NORMS",
    "CLS_LAYERS",
    "TrainOutput",
    "FastRetri",
    "freeze_batchnorm",
    "fastreid_stem_pool",
    "build_model",
    "is_fastreid_state",
    "fastreid_to_fastretri",
    "load_fastreid_model",
]


class GlobalBatchNorm1d(GlobalBatchNorm):
    """The BNNeck's BatchNorm1d over the batch of all ranks in training (common.distributed.GlobalBatchNorm)."""


def freeze_batchnorm(module: nn.Module) -> None:
    """fast-reid FrozenBN: BatchNorm2d layers in eval mode (running statistics fixed) with no trainable affine."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def _last_stride_one(layer4: nn.Sequential) -> None:
    """Stride 1 in layer4's first block (conv and downsample), doubling the final feature map's side."""
    for m in layer4[0].modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.stride = (1, 1)


def fastreid_stem_pool() -> nn.MaxPool2d:
    """fastreid ``ResNet.maxpool``: no padding, the last window may hang over the edge (``ceil_mode``)."""
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)


class _Pool(nn.Module):
    """A global pooling ``[N, C, H, W] -> [N, C]`` given as a function (fastreid.layers.pooling, flattened)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _avg(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(-2, -1))


def _max(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(-2, -1))


# MODEL.HEADS.POOL_LAYER -> pooling (gem_p: MODEL.HEADS.GEM_P, this toolkit's; fast-reid's GeM always has p = 3).
# fastreid's Identity and Flatten are refused by the config check: they keep the spatial map, and the head would
# then classify one corner pixel (Identity) or a C*H*W vector the classifier's width does not fit (Flatten).
POOL_LAYERS: Dict[str, Callable[[float], nn.Module]] = {
    "GeneralizedMeanPooling": lambda p: GeM(p=p, eps=1e-6),
    "GeneralizedMeanPoolingP": lambda p: GeM(p=p, eps=1e-6, learnable=True),
    "GlobalAvgPool": lambda p: _Pool(_avg, "GlobalAvgPool"),
    "FastGlobalAvgPool": lambda p: _Pool(_avg, "FastGlobalAvgPool"),
    "GlobalMaxPool": lambda p: _Pool(_max, "GlobalMaxPool"),
    "AdaptiveAvgMaxPool": lambda p: _Pool(lambda x: _avg(x) + _max(x), "AdaptiveAvgMaxPool"),
    "ClipGlobalAvgPool": lambda p: _Pool(lambda x: _avg(x).clamp(0.0, 1.0), "ClipGlobalAvgPool"),
}
# MODEL.BACKBONE.NORM: fastreid get_norm's BN / syncBN / FrozenBN (GhostBN and GN are refused by the config check:
# torchvision's ImageNet weights are BatchNorm weights)
BACKBONE_NORMS = ("FrozenBN", "BN", "syncBN")
# MODEL.HEADS.CLS_LAYER: fastreid.layers.any_softmax; all but Linear classify cosine similarities
CLS_LAYERS = ("Linear", "CosSoftmax", "ArcSoftmax", "CircleSoftmax")


class TrainOutput(NamedTuple):
    """What the model returns in training: the embedding (BNNeck output), the classifier's logits before
    CLS_LAYER's margin and scale (``embedding @ W.T``, or cosine similarities for the margin layers) and the pooled
    feature before the neck (fast-reid ``NECK_FEAT before``)."""

    embedding: torch.Tensor
    logits: torch.Tensor
    pooled: torch.Tensor


class FastRetri(nn.Module):
    """``forward`` returns the BNNeck embedding ``[N, D]`` in eval mode and a :class:`TrainOutput` in training.

    The logits come from the same forward so that DistributedDataParallel sees every parameter used.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        pretrained: str = "none",
        last_stride: int = 1,
        norm: str = "FrozenBN",
        gem_p: float = 3.0,
        with_bnneck: bool = True,
        pool_layer: str = "GeneralizedMeanPooling",
        cls_layer: str = "Linear",
    ):
        super().__init__()
        if norm not in BACKBONE_NORMS or pool_layer not in POOL_LAYERS or cls_layer not in CLS_LAYERS:
            raise ValueError(f"unsupported norm {norm!r}, pooling {pool_layer!r} or classifier {cls_layer!r}")
        self.backbone, self.feat_dim = build_backbone(backbone, pretrained)
        if not is_timm(backbone):  # fast-reid's ResNet: its stem pool, and layer4 at stride 1
            self.backbone[3] = fastreid_stem_pool()
            if last_stride == 1:
                _last_stride_one(self.backbone[7])
        if norm == "syncBN":  # the statistics of the global batch when several processes train
            convert_global_batchnorm(self.backbone)
        self.frozen_bn = norm == "FrozenBN"
        self.pool = POOL_LAYERS[pool_layer](gem_p)
        self.bottleneck = GlobalBatchNorm1d(self.feat_dim) if with_bnneck else nn.Identity()
        if with_bnneck:
            nn.init.ones_(self.bottleneck.weight)
            nn.init.zeros_(self.bottleneck.bias)
            self.bottleneck.bias.requires_grad_(False)  # fast-reid bias_freeze=True
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)
        self.cosine = cls_layer != "Linear"
        if self.frozen_bn:
            freeze_batchnorm(self.backbone)

    def train(self, mode: bool = True) -> "FastRetri":
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm(self.backbone)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map ``[N, C, H/16, W/16]`` (ResNet with last stride 1; a timm model's own map)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, TrainOutput]:
        pooled = self.pool(self.forward_features(x))
        embedding = self.bottleneck(pooled)
        if not self.training:
            return embedding
        if not self.cosine:
            return TrainOutput(embedding, F.linear(embedding, self.classifier.weight), pooled)
        # cosine logits in float32 even under AMP: ArcSoftmax takes their arccos, which half precision can push
        # past 1 (NaN); fast-reid computed them in the autocast precision
        with torch.autocast(x.device.type, enabled=False):
            cos = F.linear(F.normalize(embedding.float()), F.normalize(self.classifier.weight.float()))
        return TrainOutput(embedding, cos, pooled)


def build_model(cfg: dict, num_classes: int, pretrained: str) -> FastRetri:
    """The model a FastRetri config describes (``MODEL.*``)."""
    backbone, heads = cfg["MODEL"]["BACKBONE"], cfg["MODEL"]["HEADS"]
    return FastRetri(
        num_classes,
        backbone=backbone["NAME"],
        pretrained=pretrained,
        last_stride=backbone["LAST_STRIDE"],
        norm=backbone["NORM"],
        gem_p=heads["GEM_P"],
        with_bnneck=heads["WITH_BNNECK"],
        pool_layer=heads["POOL_LAYER"],
        cls_layer=heads["CLS_LAYER"],
    )


# ---- fast-reid's trained files (``model_final.pth``, ``model_best.pth``, ``model_00NN.pth``) ----

# fastreid ResNet stage name -> index in FastRetri.backbone
_FASTREID_STAGES = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
# fast-reid's default MODEL.PIXEL_MEAN / PIXEL_STD (0-255 scale): what our transform's Normalize reproduces
_FASTREID_PIXEL = {"pixel_mean": [255 * m for m in IMAGENET_MEAN], "pixel_std": [255 * s for s in IMAGENET_STD]}


def _without_ddp_prefix(state: Mapping[str, Any]) -> Dict[str, Any]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def is_fastreid_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict has fast-reid ``Baseline``'s layout (``backbone.conv1.*`` and ``heads.*``)."""
    keys = _without_ddp_prefix(state)
    return any(k.startswith("backbone.conv1.") for k in keys) and any(k.startswith("heads.") for k in keys)


def fastreid_to_fastretri(state: Mapping[str, torch.Tensor], model: FastRetri) -> Dict[str, torch.Tensor]:
    """fast-reid ``Baseline`` state dict -> ``model``'s key names (raises UserError naming what does not fit).

    Backbone ``backbone.<stage>.*`` -> ``backbone.<index>.*``; BNNeck ``heads.bottleneck.0.*`` -> ``bottleneck.*``;
    classifier ``heads.weight`` (fast-reid >= v1.2) or ``heads.classifier.weight`` (v1.0) -> ``classifier.weight``;
    GeneralizedMeanPoolingP's ``heads.pool_layer.p`` -> ``pool.p``.
    FrozenBN has no ``num_batches_tracked`` (taken from ``model``); the ``pixel_mean``/``pixel_std`` buffers of
    v1.0 files are dropped when they are fast-reid's ImageNet defaults, which our transform applies.
    """
    state = _without_ddp_prefix(state)
    out: Dict[str, torch.Tensor] = {}
    odd = []
    for key, value in state.items():
        if key in _FASTREID_PIXEL:
            expected = torch.tensor(_FASTREID_PIXEL[key], dtype=torch.float64)
            if value.numel() != 3 or not torch.allclose(value.double().flatten(), expected, atol=1e-3):
                odd.append(
                    f"{key}={[round(v, 3) for v in value.flatten().tolist()]} (this model normalises with "
                    f"{[round(v, 3) for v in _FASTREID_PIXEL[key]]})"
                )
            continue
        m = re.match(r"backbone\.(conv1|bn1|layer[1-4])\.(.+)$", key)
        if m:
            out[f"backbone.{_FASTREID_STAGES[m.group(1)]}.{m.group(2)}"] = value
        elif key.startswith("heads.bottleneck.0."):
            out["bottleneck." + key[len("heads.bottleneck.0.") :]] = value
        elif key in ("heads.weight", "heads.classifier.weight"):
            out["classifier.weight"] = value
        elif key == "heads.pool_layer.p":  # GeneralizedMeanPoolingP's trainable p, a 1-element tensor there
            out["pool.p"] = value.reshape(())
        else:
            out[key] = value  # left as is: reported as unexpected below
    if odd:
        raise UserError("fast-reid weights were trained with other pixel statistics: " + "; ".join(odd))
    own = model.state_dict()
    for key, value in own.items():  # FrozenBatchNorm (fast-reid) has no num_batches_tracked buffer
        if key.endswith("num_batches_tracked") and key not in out and key.rsplit(".", 1)[0] + ".weight" in out:
            out[key] = value
    missing = [k for k in own if k not in out]
    unexpected = [k for k in out if k not in own]
    shapes = [
        f"{k} {tuple(out[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in out and out[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if keys
        ]
        raise UserError("does not fit " + "; ".join(parts))
    return out


def load_fastreid_model(cfg: Dict, path: Union[str, os.PathLike]) -> FastRetri:
    """The model of ``cfg`` (``MODEL.*``) with the weights of a fast-reid checkpoint, in eval mode.

    fast-reid's ``Checkpointer`` writes ``{"model": state_dict, "optimizer": ..., "lr_sched": ...,
    "warmup_sched": ..., "epoch": int, "metric": float}``; only ``model`` is used (a bare state dict also loads).
    Read with ``weights_only=True`` on the CPU; the number of classes comes from the classifier's weight.
    """
    if not os.path.isfile(path):
        raise UserError(f"fast-reid model file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything unreadable is refused in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = f"{type(e).__name__}: {first[:150]}"
        raise UserError(
            f"cannot read {path} with torch.load(weights_only=True) ({reason}); re-save only its "
            f"weights: torch.save({{'model': ckpt['model']}}, 'model_weights.pth')"
        ) from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not is_fastreid_state(state):
        raise UserError(
            f"{path} holds no fast-reid Baseline weights (no 'model' dict with backbone.conv1.* and heads.* keys)"
        )
    state = _without_ddp_prefix(state)
    classifier = state.get("heads.weight", state.get("heads.classifier.weight"))
    if classifier is None or classifier.dim() != 2:
        raise UserError(f"{path}: no classifier weight (heads.weight) to take the number of classes from")
    model = build_model(cfg, classifier.shape[0], "none")
    try:
        mapped = fastreid_to_fastretri(state, model)
    except UserError as e:
        raise UserError(
            f"{path} {e} (a {cfg['MODEL']['BACKBONE']['NAME']} FastRetri with "
            f"WITH_BNNECK={cfg['MODEL']['HEADS']['WITH_BNNECK']}, POOL_LAYER={cfg['MODEL']['HEADS']['POOL_LAYER']})"
        ) from None
    model.load_state_dict(mapped, strict=True)
    return model.eval()
