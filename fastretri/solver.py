"""FastRetri optimisation (fast-reid ``solver/build.py`` + ``engine/hooks.py``), as pure functions.

* ``SOLVER.OPT``: SGD with MOMENTUM / NESTEROV, or another ``torch.optim`` optimizer with its own defaults, as
  fast-reid builds them; weight decay 5e-4 on weights (BNNeck weight included, WEIGHT_DECAY_NORM) and
  ``WEIGHT_DECAY_BIAS`` (0) on biases; frozen parameters are left out.
* Learning rate: warm-up stepped per *iteration* for ``WARMUP_ITERS`` (``WARMUP_METHOD`` linear from
  ``WARMUP_FACTOR`` x, constant at it, or exp ``factor ** (1 - it / iters)``), then ``SOLVER.SCHED`` stepped once
  per *epoch*: cosine annealing with ``T_max = MAX_EPOCH - max(ceil(WARMUP_ITERS / iters_per_epoch),
  DELAY_EPOCHS)`` down to ``ETA_MIN_LR``, or multi-step (x ``GAMMA`` at each of ``STEPS``, counted in scheduler
  steps). fast-reid's ``LRScheduler`` hook steps it in ``after_epoch`` of every epoch whose last iteration reaches
  the warm-up's end and whose number exceeds ``DELAY_EPOCHS``; here the same value is a closed-form function of
  the global iteration, so ``--resume`` needs no scheduler state.
* Gradient clipping (``CLIP_TYPE norm``) of the *global* L2 norm: fast-reid's "per-parameter" clipper runs on
  ``ContiguousParams`` buffers (``build_optimizer(contiguous=True)``), one flat buffer per (lr, weight decay)
  group, so it clips the norm of all of a group's gradients together with torch's ``clip_grad_norm_``
  (``max_norm / (norm + 1e-6)``, at most 1, in ``NORM_TYPE``). With FrozenBN every trainable FastRetri tensor is in
  one group, i.e. the norm of all gradients is clipped at 5. ``CLIP_TYPE value`` clamps every element to
  ``[-CLIP_VALUE, CLIP_VALUE]`` (torch's ``clip_grad_value_``).
"""

import bisect
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "SCHEDULERS",
    "WARMUP_METHODS",
    "CLIP_TYPES",
    "optimizer_class",
    "warmup_factor_at",
    "lr_at",
    "schedule_from_config",
    "build_optimizer",
    "clip_grad_norm_groups",
    "clip_grad_value",
    "clipper_from_config",
    "set_lr",
]

SCHEDULERS = ("CosineAnnealingLR", "MultiStepLR")
WARMUP_METHODS = ("linear", "constant", "exp")
CLIP_TYPES = ("norm", "value")


def warmup_factor_at(method: str, iteration: int, warmup_iters: int, warmup_factor: float) -> float:
    """fast-reid ``_get_warmup_factor_at_epoch``: the multiplier of the base learning rate during the warm-up."""
    if iteration >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    if method == "linear":
        alpha = iteration / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    if method == "exp":
        return warmup_factor ** (1 - iteration / warmup_iters)
    raise ValueError(f"unknown warm-up method {method!r}")


def lr_at(
    iteration: int,
    *,
    base_lr: float,
    iters_per_epoch: int,
    max_epoch: int,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.1,
    eta_min: float = 0.0,
    warmup_method: str = "linear",
    sched: str = "CosineAnnealingLR",
    steps: Sequence[int] = (),
    gamma: float = 0.1,
    delay_epochs: int = 0,
) -> float:
    """Learning rate used at global (0-based) ``iteration``."""
    if iteration < warmup_iters:
        return base_lr * warmup_factor_at(warmup_method, iteration, warmup_iters, warmup_factor)
    epoch = iteration // iters_per_epoch
    warmup_epochs = math.ceil(warmup_iters / iters_per_epoch)
    # the scheduler steps after epoch e (0-based) when (e + 1) * iters_per_epoch >= warmup_iters and e >= delay:
    # after epochs max(warmup_epochs - 1, delay) ... epoch - 1 (one epoch earlier than "after the warm-up's epoch"
    # when warmup_iters is a multiple of iters_per_epoch: the warm-up then ends exactly with an epoch)
    done = max(0, epoch - max(warmup_epochs - 1, delay_epochs, 0))
    if sched == "MultiStepLR":
        return base_lr * gamma ** bisect.bisect_right(sorted(steps), done)
    t_max = max(1, max_epoch - max(warmup_epochs, delay_epochs))
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * done / t_max)) / 2


def schedule_from_config(cfg: Dict, iters_per_epoch: int) -> Callable[[int], float]:
    """``iteration -> learning rate`` of a FastRetri config's ``SOLVER`` section."""
    s = cfg["SOLVER"]
    kwargs = dict(
        base_lr=s["BASE_LR"],
        iters_per_epoch=iters_per_epoch,
        max_epoch=s["MAX_EPOCH"],
        warmup_iters=s["WARMUP_ITERS"],
        warmup_factor=s["WARMUP_FACTOR"],
        eta_min=s["ETA_MIN_LR"],
        warmup_method=s["WARMUP_METHOD"],
        sched=s["SCHED"],
        steps=s["STEPS"],
        gamma=s["GAMMA"],
        delay_epochs=s["DELAY_EPOCHS"],
    )
    return lambda iteration: lr_at(iteration, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)


def optimizer_class(name: str) -> Optional[type]:
    """The ``torch.optim`` optimizer fast-reid's ``getattr(torch.optim, SOLVER.OPT)`` finds, or None (LBFGS needs a
    closure and one group, SparseAdam sparse gradients: neither trains this model)."""
    cls = getattr(torch.optim, name, None)
    ok = isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    return cls if ok and name not in ("LBFGS", "SparseAdam") else None


def build_optimizer(model: nn.Module, cfg: Dict) -> torch.optim.Optimizer:
    """SOLVER.OPT over the trainable parameters: biases get WEIGHT_DECAY_BIAS and BIAS_LR_FACTOR, norms
    WEIGHT_DECAY_NORM; SGD takes MOMENTUM and NESTEROV, other optimizers their torch defaults (as fast-reid)."""
    s = cfg["SOLVER"]
    groups: List[Dict] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and p is getattr(m, "weight", None) for m in model.modules()
        )
        if name.endswith("bias"):
            wd, factor = s["WEIGHT_DECAY_BIAS"], s["BIAS_LR_FACTOR"]
        else:
            wd, factor = (s["WEIGHT_DECAY_NORM"] if is_norm else s["WEIGHT_DECAY"]), 1.0
        groups.append(
            {"params": [p], "weight_decay": wd, "lr_factor": factor, "lr": s["BASE_LR"] * factor, "name": name}
        )
    cls = optimizer_class(s["OPT"])
    if cls is None:
        raise ValueError(f"SOLVER.OPT {s['OPT']} is not a torch.optim optimizer")
    if cls is torch.optim.SGD:
        return cls(groups, lr=s["BASE_LR"], momentum=s["MOMENTUM"], nesterov=s["NESTEROV"] and s["MOMENTUM"] > 0)
    return cls(groups, lr=s["BASE_LR"])


def clip_grad_norm_groups(
    optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0
) -> List[torch.Tensor]:
    """Clip the gradient norm of each fast-reid ``ContiguousParams`` buffer, i.e. of all parameters sharing a
    (learning-rate factor, weight decay) pair, with torch's ``clip_grad_norm_``; returns each group's norm before
    clipping (0-d tensors: no device synchronisation).

    fast-reid groups parameters by ``freeze_status_lr_weightdecay`` into one flat buffer each and clips every buffer
    with ``clip_grad_norm_(buffer, CLIP_VALUE, NORM_TYPE)``. FastRetri's configs (FrozenBN, no trainable bias) have
    one group, so this is the global norm of all trainable gradients.
    """
    groups: Dict[Tuple[float, float], List[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        key = (group.get("lr_factor", 1.0), group["weight_decay"])
        groups.setdefault(key, []).extend(p for p in group["params"] if p.grad is not None)
    return [torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type) for params in groups.values() if params]


@torch.no_grad()
def clip_grad_value(optimizer: torch.optim.Optimizer, clip_value: float) -> None:
    """fast-reid ``CLIP_TYPE value``: every gradient element clamped to ``[-clip_value, clip_value]``."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_value_(params, clip_value)


def clipper_from_config(cfg: Dict) -> Optional[Callable[[torch.optim.Optimizer], None]]:
    """The gradient clipping of ``SOLVER.CLIP_GRADIENTS`` (None when disabled), applied before each step."""
    c = cfg["SOLVER"]["CLIP_GRADIENTS"]
    if not c["ENABLED"]:
        return None
    if c["CLIP_TYPE"] == "value":
        return lambda optimizer: clip_grad_value(optimizer, c["CLIP_VALUE"])
    return lambda optimizer: clip_grad_norm_groups(optimizer, c["CLIP_VALUE"], c["NORM_TYPE"])
