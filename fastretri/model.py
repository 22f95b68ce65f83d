"""FastRetri model (fast-reid ``Baseline`` + ``EmbeddingHead`` as configured by projects/FastRetri).

ResNet (last stride 1, every BatchNorm frozen: statistics and affine) -> GeM (p=3) -> BNNeck (BatchNorm1d whose
bias is frozen; its output is the embedding) -> bias-free linear classifier initialised N(0, 0.01).

The neck's BatchNorm is fast-reid's SyncBN in spirit: with several processes it normalises with the statistics of
the *global* batch (so 4 x 32 images behave like 1 x 128), but unlike ``nn.SyncBatchNorm`` it needs no GPU and no
process group: a single process is a plain BatchNorm1d (the original crashed there, fast-reid #667).
"""
from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import build_resnet
from common.distributed import all_reduce_sum_with_grad, get_world_size
from common.errors import UserError
from common.pooling import GeM
from common.runio import load_model_file
from fastretri.config import MODEL_KEYS, config_dict

__all__ = ["GlobalBatchNorm1d", "FastRetri", "freeze_batchnorm", "build_model", "load_model"]


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the batch of all ranks in training (gradients flow through the all-reduce)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        x32 = x.float()
        local = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_tensor([x.shape[0]])])
        total = all_reduce_sum_with_grad(local)
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * n / (n - 1).clamp(min=1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
        out = (x32 - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias
        return out.to(x.dtype)


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


class FastRetri(nn.Module):
    """``forward`` returns the BNNeck embedding ``[N, D]`` in eval mode and ``(embedding, logits)`` in training.

    The logits come from the same forward so that DistributedDataParallel sees every parameter used.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", pretrained: str = "none",
                 last_stride: int = 1, norm: str = "FrozenBN", gem_p: float = 3.0, with_bnneck: bool = True,
                 scale: float = 1.0):
        super().__init__()
        net = build_resnet(backbone, pretrained)
        if last_stride == 1:
            _last_stride_one(net.layer4)
        self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                      net.layer1, net.layer2, net.layer3, net.layer4)
        self.feat_dim = net.fc.in_features
        self.frozen_bn = norm == "FrozenBN"
        self.pool = GeM(p=gem_p, eps=1e-6)
        self.bottleneck = GlobalBatchNorm1d(self.feat_dim) if with_bnneck else nn.Identity()
        if with_bnneck:
            nn.init.ones_(self.bottleneck.weight)
            nn.init.zeros_(self.bottleneck.bias)
            self.bottleneck.bias.requires_grad_(False)  # fast-reid bias_freeze=True
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)
        self.scale = scale
        if self.frozen_bn:
            freeze_batchnorm(self.backbone)

    def train(self, mode: bool = True) -> "FastRetri":
        super().train(mode)
        if self.frozen_bn:
            freeze_batchnorm(self.backbone)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map ``[N, C, H/16, W/16]`` (last stride 1)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        embedding = self.bottleneck(self.pool(self.forward_features(x)))
        if not self.training:
            return embedding
        return embedding, F.linear(embedding, self.classifier.weight) * self.scale


def build_model(cfg: dict, num_classes: int, pretrained: str) -> FastRetri:
    """The model a FastRetri config describes (``MODEL.*``)."""
    backbone, heads = cfg["MODEL"]["BACKBONE"], cfg["MODEL"]["HEADS"]
    return FastRetri(num_classes, backbone=backbone["NAME"], pretrained=pretrained,
                     last_stride=backbone["LAST_STRIDE"], norm=backbone["NORM"], gem_p=heads["GEM_P"],
                     with_bnneck=heads["WITH_BNNECK"], scale=heads["SCALE"])


def load_model(cfg: Dict, path: str) -> FastRetri:
    """The model of ``cfg`` with the weights in ``path``, refused if they were trained for another model."""
    def build(state: Dict) -> FastRetri:
        if "classifier.weight" not in state.get("model", {}):
            raise UserError(f"{path} holds no FastRetri weights")
        return build_model(cfg, state["model"]["classifier.weight"].shape[0], "none")

    return load_model_file(path, config_dict(cfg), MODEL_KEYS, build, "model").eval()
