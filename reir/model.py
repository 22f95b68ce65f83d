"""The REIR ensemble: a shared ResNet trunk and E private branches, each ending in a meta-class head.

The E private branches form one ResNet whose channels are E times wider and whose convolutions use
``groups = E`` (per-channel BatchNorm over the E·C channels, one [E, M, d] head tensor). That is exactly E
independent ResNet branches: the same maths and the same parameter count as the original's ``ModuleList`` of 48
torchvision layers. Convolution weights are kept as one Parameter per learner (the originals' memory layout, see
``EnsembleConv``) and saved as one [E*out, ...] tensor per layer. The same weights run two ways:

* ``grouped``: one grouped convolution per layer on the concatenated weights (a handful of kernel launches per
  batch; the GPU form);
* ``loop``: the original order, learner after learner, each on its own weights (oneDNN runs 48 small
  convolutions faster than one grouped convolution at these shapes, so this is the CPU default).

The shared feature x enters branch i as ``w_i * x`` (``with_random``: w = softmax(U[0,1)^E), drawn anew at every
training forward; without it w_i = 1). The first private convolution is linear and bias-free, so it is computed
once as a dense convolution with E·C outputs and scaled per learner afterwards: no E-fold copy of x.
Evaluation with ``with_random`` uses the expectation E[w_i] = 1/E (deterministic embeddings; the original drew
new weights for every test batch).

A timm backbone (``--model_type timm:NAME``) has no ResNet stages to copy per learner, so it is shared whole
(``--share_type layer4``, the rule for every timm model): the learners are E private heads on its pooled features
(timm's ``forward_head(pre_logits=True)``: the class token or the average pool, as its own classifier would see).
"""

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from common.backbones import build_backbone, build_resnet, is_timm
from common.device import group_sizes, upcast
from common.distributed import GlobalBatchNorm, get_world_size
from common.errors import UserError

__all__ = [
    "MODEL_TYPES",
    "SHARE_TYPES",
    "TIMM_SHARE_TYPE",
    "IMPLS",
    "check_share_type",
    "Model",
    "model_from_config",
    "count_parameters",
    "resolve_impl",
    "ensemble_embed",
]

MODEL_TYPES = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")
STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
SHARE_TYPES = ("none", "maxpool", "layer1", "layer2", "layer3", "layer4")
TIMM_SHARE_TYPE = "layer4"  # the only share type of a timm backbone: all of it shared, the learners' heads private
IMPLS = ("auto", "loop", "grouped")


class Shared:
    """A feature shared by all learners; learner i sees ``scale[i] * x`` (``scale`` None means 1)."""

    def __init__(self, x: torch.Tensor, scale: Optional[torch.Tensor]):
        self.x, self.scale = x, scale


Ens = Union[Shared, torch.Tensor, List[torch.Tensor]]  # grouped [B, E*C, ...] tensor, or one tensor per learner


def _per_learner(t: torch.Tensor, scale: Optional[torch.Tensor], e: int) -> torch.Tensor:
    """Multiply channel block i of a [B, E*C, ...] tensor by scale[i]."""
    if scale is None:
        return t
    shape = t.shape
    return (t.reshape(shape[0], e, -1) * scale.to(t.dtype)[None, :, None]).reshape(shape)


def _map(fn, x: Ens) -> Ens:
    return [fn(t) for t in x] if isinstance(x, list) else fn(x)


class EnsembleConv(nn.Module):
    """E bias-free convolutions: one [out, in/groups, k, k] Parameter per learner (``weights``).

    Per-learner parameters are the originals' memory layout, and it matters on CPU: a single [E*out, ...] Parameter
    gets a fresh E-times larger gradient every step (assembled by a concatenation) and Adam allocates temporaries of
    the same size; allocations of hundreds of MB are served by mmap and page-faulted anew on every step, which made
    the learner-by-learner form ~1.7x slower than 48 separate branches at E = 48. The state dict still holds one
    [E*out, ...] ``weight`` tensor (hooks below); the grouped form concatenates the E weights at every forward.
    """

    loop = False  # set by Model.set_impl: run learner by learner instead of one grouped convolution

    def __init__(self, conv: nn.Conv2d, e: int):
        super().__init__()
        self.e, self.out = e, conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        w = conv.weight.detach()
        self.weights = nn.ParameterList([nn.Parameter(w.clone()) for _ in range(e)])
        self._register_state_dict_hook(_join_weights)
        self._register_load_state_dict_pre_hook(_split_weight, with_module=True)

    @property
    def weight(self) -> torch.Tensor:
        """All learners' weights as one [E*out, in/groups, k, k] tensor (a copy that carries gradients)."""
        return torch.cat(list(self.weights))

    def _conv(self, x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: Ens) -> Ens:
        if isinstance(x, Shared):
            if self.groups != 1:
                raise ValueError("a shared input must enter an ungrouped convolution")
            if self.loop:
                return [
                    self._conv(x.x, w, 1) * (1 if x.scale is None else x.scale[i]) for i, w in enumerate(self.weights)
                ]
            return _per_learner(self._conv(x.x, self.weight, 1), x.scale, self.e)
        if isinstance(x, list):
            return [self._conv(t, w, self.groups) for t, w in zip(x, self.weights)]
        return self._conv(x, self.weight, self.groups * self.e)


def _join_weights(module: EnsembleConv, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: the E per-learner weights are saved as one [E*out, ...] ``weight`` tensor."""
    parts = [state_dict.pop(f"{prefix}weights.{i}") for i in range(module.e)]
    state_dict[prefix + "weight"] = torch.cat([p.detach() for p in parts])


def _split_weight(module: EnsembleConv, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a saved [E*out, ...] ``weight`` back into the E per-learner parameters."""
    weight = state_dict.get(prefix + "weight")
    if weight is not None and weight.dim() > 0 and weight.shape[0] == module.e * module.out:
        del state_dict[prefix + "weight"]
        for i, part in enumerate(weight.split(module.out)):
            state_dict[f"{prefix}weights.{i}"] = part


class EnsembleBatchNorm(GlobalBatchNorm):
    """E BatchNorm2d(C) as one BatchNorm2d(E*C): per-channel statistics are per learner by construction.

    One process: exactly ``nn.BatchNorm2d`` (learner by learner in the loop form). Under DDP training normalises
    with the statistics of the global batch (``GlobalBatchNorm``), so N processes train what one process does."""

    def __init__(self, bn: nn.BatchNorm2d, e: int):
        super().__init__(
            bn.num_features * e,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device=bn.weight.device,
            dtype=bn.weight.dtype,
        )
        self.e, self.c = e, bn.num_features
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(self, name).copy_(getattr(bn, name).repeat(e))

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")

    def forward(self, x: Ens) -> Ens:
        if not isinstance(x, list):
            return super().forward(x)
        if self.training and get_world_size() > 1:  # global statistics: one all-reduce for all learners
            return list(super().forward(torch.cat(x, dim=1)).split(self.c, dim=1))
        if self.training:
            self.num_batches_tracked.add_(1)
        stats = zip(self.running_mean.split(self.c), self.running_var.split(self.c))  # views: updated in place
        return [
            F.batch_norm(t, mean, var, w, b, self.training, self.momentum, self.eps)
            for t, (mean, var), w, b in zip(x, stats, self.weight.split(self.c), self.bias.split(self.c))
        ]


def _expand(x: Shared, e: int, loop: bool) -> Ens:
    """The shared tensor as every learner's own copy (only an identity shortcut needs this)."""
    if loop:
        return [x.x if x.scale is None else x.x * x.scale[i] for i in range(e)]
    return _per_learner(x.x.repeat(1, e, *([1] * (x.x.dim() - 2))), x.scale, e)


class EnsembleBlock(nn.Module):
    """A torchvision BasicBlock/Bottleneck for E learners."""

    def __init__(self, block: nn.Module, e: int):
        super().__init__()
        self.e = e
        names = ["conv1", "bn1", "conv2", "bn2"] + (["conv3", "bn3"] if isinstance(block, Bottleneck) else [])
        self.names = names
        for name in names:
            m = getattr(block, name)
            setattr(self, name, EnsembleConv(m, e) if isinstance(m, nn.Conv2d) else EnsembleBatchNorm(m, e))
        self.downsample = None
        if block.downsample is not None:
            self.downsample = nn.Sequential(
                EnsembleConv(block.downsample[0], e), EnsembleBatchNorm(block.downsample[1], e)
            )

    def forward(self, x: Ens) -> Ens:
        out = x
        for k in range(0, len(self.names), 2):
            out = getattr(self, self.names[k + 1])(getattr(self, self.names[k])(out))
            if k + 2 < len(self.names):
                out = _map(F.relu, out)
        if self.downsample is not None:
            identity = self.downsample(x)
        elif isinstance(x, Shared):
            identity = _expand(x, self.e, self.conv1.loop)
        else:
            identity = x
        if isinstance(out, list):
            return [F.relu(a + b) for a, b in zip(out, identity)]
        return F.relu(out + identity)


class EnsembleBranches(nn.Module):
    """The private part of E learners: stem/layers after the shared stage, global average pool, Linear(d, M)."""

    def __init__(self, private: Sequence[nn.Module], e: int, m: int, feat_dim: int, device: torch.device):
        super().__init__()
        self.e, self.m = e, m
        layers: List[nn.Module] = []
        for module in private:
            if isinstance(module, nn.Conv2d):
                layers.append(EnsembleConv(module, e))
            elif isinstance(module, nn.BatchNorm2d):
                layers.append(EnsembleBatchNorm(module, e))
            elif isinstance(module, nn.Sequential):
                layers.append(nn.Sequential(*[EnsembleBlock(b, e) for b in module]))
            else:
                layers.append(module)  # ReLU / MaxPool: parameter-free, applied per element
        self.features = nn.Sequential(*layers)
        bound = 1.0 / math.sqrt(feat_dim)  # nn.Linear's default initialisation, per learner
        self.weight = nn.Parameter(torch.empty(e, m, feat_dim, device=device).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(e, m, device=device).uniform_(-bound, bound))

    def forward(self, x: Shared) -> torch.Tensor:
        """[B, E, M] logits of these learners."""
        for layer in self.features:
            if isinstance(layer, (nn.ReLU, nn.MaxPool2d)):
                x = Shared(layer(x.x), x.scale) if isinstance(x, Shared) else _map(layer, x)
            else:
                x = layer(x)
        if isinstance(x, Shared):  # share_type layer4 (a ResNet's map) or a timm backbone (pooled): only heads private
            f = x.x.mean(dim=(2, 3)) if x.x.dim() == 4 else x.x
            logits = torch.einsum("bd,emd->bem", f, self.weight)
            if x.scale is not None:
                logits = logits * x.scale.to(logits.dtype)[None, :, None]
            return logits + self.bias
        if isinstance(x, list):
            return torch.stack(
                [t.mean(dim=(2, 3)) @ w.t() + b for t, w, b in zip(x, self.weight.unbind(0), self.bias.unbind(0))], 1
            )
        f = x.mean(dim=(2, 3)).reshape(x.shape[0], self.e, -1)
        return torch.einsum("bed,emd->bem", f, self.weight) + self.bias


def _init_private(branches: EnsembleBranches) -> None:
    """torchvision's ResNet initialisation, learner by learner (random backbones differ across learners)."""
    for module in branches.modules():
        if isinstance(module, EnsembleConv):
            for w in module.weights:
                nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")


def check_share_type(model_type: str, share_type: str) -> None:
    """A timm backbone has no ResNet stages to give each learner: it is shared whole (``TIMM_SHARE_TYPE``)."""
    if is_timm(model_type) and share_type != TIMM_SHARE_TYPE:
        raise UserError(
            f"--model_type {model_type}: a timm backbone is shared whole by the learners (private stages are "
            f"built from ResNet stages only); use --share_type {TIMM_SHARE_TYPE}"
        )


class Model(nn.Module):
    """Shared trunk + E private learners; ``forward`` returns raw meta-class logits [B, E, M].

    ``devices`` spreads the learners over several devices in contiguous blocks (``common.device.group_sizes``);
    the state dict is always the single-block layout, whatever the number of blocks.
    """

    def __init__(
        self,
        model_type: str = "resnet18",
        share_type: str = "layer1",
        ensemble_size: int = 48,
        meta_class_size: int = 12,
        with_random: bool = False,
        pretrained: str = "none",
        devices: Optional[Sequence[torch.device]] = None,
        impl: str = "auto",
    ):
        super().__init__()
        if model_type not in MODEL_TYPES and not is_timm(model_type):
            raise UserError(f"unknown --model_type {model_type!r} (choose from {', '.join(MODEL_TYPES)}, or timm:NAME)")
        if share_type not in SHARE_TYPES:
            raise UserError(f"unknown --share_type {share_type!r} (choose from {', '.join(SHARE_TYPES)})")
        check_share_type(model_type, share_type)
        if ensemble_size < 1 or meta_class_size < 2:
            raise UserError("--ensemble_size must be >= 1 and --meta_class_size >= 2")
        self.ensemble_size, self.meta_class_size, self.with_random = ensemble_size, meta_class_size, with_random
        self.model_type, self.share_type = model_type, share_type
        if is_timm(model_type):  # the timm model's pooled features, shared; the learners are E heads on them
            self.common_extractor, feat_dim = build_backbone(model_type, pretrained, pooled=True)
            private: List[nn.Module] = []
            home = next(self.common_extractor.parameters()).device
        else:
            backbone = build_resnet(model_type, pretrained)
            feat_dim = backbone.fc.in_features
            cut = STAGES.index(share_type) + 1 if share_type != "none" else 0
            self.common_extractor = nn.Sequential(*[getattr(backbone, n) for n in STAGES[:cut]])
            private = [getattr(backbone, n) for n in STAGES[cut:]]
            home = backbone.conv1.weight.device
        self.devices = list(devices) if devices else [home]
        self.sizes = [s for s in group_sizes(ensemble_size, len(self.devices)) if s > 0]
        self.branches = nn.ModuleList()
        for size in self.sizes:
            block = EnsembleBranches(private, size, meta_class_size, feat_dim, home)
            if pretrained in (None, "none"):
                _init_private(block)
            self.branches.append(block)
        self.impl = "grouped"
        self.set_impl(impl)
        self._register_state_dict_hook(_merge_blocks)
        self._register_load_state_dict_pre_hook(self._split_blocks)

    def set_impl(self, impl: str, device: Optional[torch.device] = None) -> "Model":
        """``loop`` or ``grouped`` (``auto``: grouped on CUDA, loop on CPU, decided again at the first forward on
        another device type, e.g. a model built on CPU from a stored config and moved); both give the same
        outputs."""
        self.requested_impl = impl
        self.impl = resolve_impl(impl, device or self.devices[0])
        for module in self.modules():
            if isinstance(module, EnsembleConv):
                module.loop = self.impl == "loop"
        return self

    def place(self) -> "Model":
        """Move the trunk to the first device and each block of learners to its own device."""
        self.common_extractor.to(self.devices[0])
        for block, device in zip(self.branches, self.devices):
            block.to(device)
        return self

    def branch_weights(self, device: torch.device) -> Optional[torch.Tensor]:
        """softmax(U[0,1)^E) in training with ``with_random``; the expectation 1/E in evaluation; else None."""
        if not self.with_random:
            return None
        e = self.ensemble_size
        if self.training:
            return torch.softmax(torch.rand(e, device=device), dim=0)
        return torch.full((e,), 1.0 / e, device=device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.requested_impl == "auto" and resolve_impl("auto", images.device) != self.impl:
            self.set_impl("auto", images.device)
        shared = self.common_extractor(images)
        w = self.branch_weights(shared.device)
        outs, start = [], 0
        for block, size in zip(self.branches, self.sizes):
            device = block.weight.device
            scale = None if w is None else w[start : start + size].to(device)
            x = Shared(shared.to(device, non_blocking=True), scale)
            outs.append(block(x).to(shared.device, non_blocking=True))
            start += size
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    @staticmethod
    def embed(logits: torch.Tensor) -> torch.Tensor:
        """Per-learner L2-normalised logits, concatenated: [B, E*M]; cosine ranking = mean per-learner cosine."""
        return F.normalize(upcast(logits), dim=-1).flatten(1)

    def _split_blocks(self, state_dict, prefix, *args) -> None:
        """Load the single-block layout into however many blocks this model has."""
        if len(self.sizes) == 1:
            return
        merged = {k: v for k, v in state_dict.items() if k.startswith(prefix + "branches.0.")}
        for key, value in merged.items():
            del state_dict[key]
            rest = key[len(prefix + "branches.0.") :]
            if value.dim() == 0:
                parts = [value] * len(self.sizes)
            else:
                per = value.shape[0] // self.ensemble_size
                parts = torch.split(value, [s * per for s in self.sizes])
            for b, part in enumerate(parts):
                state_dict[f"{prefix}branches.{b}.{rest}"] = part


def _merge_blocks(module: Model, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: concatenate the learner blocks so the file does not depend on the device count."""
    if len(module.sizes) == 1:
        return
    keys = [k for k in list(state_dict) if k.startswith(prefix + "branches.0.")]
    for key in keys:
        rest = key[len(prefix + "branches.0.") :]
        parts = [state_dict.pop(f"{prefix}branches.{b}.{rest}") for b in range(len(module.sizes))]
        state_dict[key] = parts[0] if parts[0].dim() == 0 else torch.cat([p.to(parts[0].device) for p in parts])


def model_from_config(config: Mapping[str, Any]) -> Model:
    """The untrained ensemble of a stored run configuration, on one device (CPU; the caller moves it)."""
    return Model(
        config["model_type"],
        config["share_type"],
        config["ensemble_size"],
        config["meta_class_size"],
        with_random=config["with_random"],
        pretrained="none",
    )


def _memory_format(images: torch.Tensor) -> torch.Tensor:
    """Channels-last on CUDA (where the model is converted to it), unchanged on CPU."""
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images


def ensemble_embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The retrieval embedding of an image batch: [B, E*M] concatenated per-learner unit vectors."""
    return Model.embed(model(_memory_format(images)))


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise UserError(f"unknown --ensemble_impl {impl!r} (choose from {', '.join(IMPLS)})")
    if impl == "auto":
        return "grouped" if torch.device(device).type == "cuda" else "loop"
    return impl


def count_parameters(model_type: str, share_type: str, ensemble_size: int, meta_class_size: int) -> Dict[str, int]:
    """Trainable parameters of the model, built on the ``meta`` device (no memory is allocated)."""
    with torch.device("meta"):
        model = Model(model_type, share_type, ensemble_size, meta_class_size, pretrained="none")
    common = sum(p.numel() for p in model.common_extractor.parameters())
    heads = sum(b.weight.numel() + b.bias.numel() for b in model.branches)
    total = sum(p.numel() for p in model.parameters())
    return {
        "common": common,
        "individual_feature": (total - common - heads) // ensemble_size,
        "individual_classifier": heads // ensemble_size,
        "total": total,
    }
