"""FastRetri optimisation (fast-reid ``solver/build.py`` + ``engine/hooks.py``), as pure functions.

* SGD, weight decay 5e-4 on weights (BNNeck weight included, WEIGHT_DECAY_NORM) and ``WEIGHT_DECAY_BIAS`` (0) on
  biases; frozen parameters are left out.
* Learning rate: linear warm-up stepped per *iteration* for ``warmup_iters`` from ``warmup_factor`` x, then cosine
  annealing stepped once per *epoch* with ``T_max = max_epoch - ceil(warmup_iters / iters_per_epoch)`` down to
  ``eta_min``. fast-reid's ``LRScheduler`` hook steps the cosine in ``after_epoch`` of every epoch whose last
  iteration reaches the warm-up's end; here the same value is a closed-form function of the global iteration, so
  ``--resume`` needs no scheduler state.
* Gradient clipping of the *global* L2 norm: fast-reid's "per-parameter" clipper runs on ``ContiguousParams``
  buffers (``build_optimizer(contiguous=True)``), one flat buffer per (lr, weight decay) group, so it clips the norm
  of all of a group's gradients together with torch's ``clip_grad_norm_`` (``max_norm / (norm + 1e-6)``, at most 1).
  With FrozenBN every trainable FastRetri tensor is in one group, i.e. the norm of all gradients is clipped at 5.
"""

import math
from typing import Dict, List, Tuple

import torch
from torch import nn

__all__ = ["lr_at", "build_optimizer", "clip_grad_norm_groups", "set_lr"]


def lr_at(
    iteration: int,
    *,
    base_lr: float,
    iters_per_epoch: int,
    max_epoch: int,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.1,
    eta_min: float = 0.0,
) -> float:
    """Learning rate used at global (0-based) ``iteration``."""
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        return base_lr * (warmup_factor * (1 - alpha) + alpha)
    epoch = iteration // iters_per_epoch
    warmup_epochs = math.ceil(warmup_iters / iters_per_epoch)
    t_max = max(1, max_epoch - warmup_epochs)
    # the cosine steps after epoch e (0-based) when (e + 1) * iters_per_epoch >= warmup_iters: after epochs
    # max(1, warmup_epochs) - 1 ... epoch - 1 (one epoch earlier than "after the warm-up's epoch" when warmup_iters
    # is a multiple of iters_per_epoch: the warm-up then ends exactly with an epoch)
    steps = max(0, epoch - max(1, warmup_epochs) + 1)
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * steps / t_max)) / 2


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)


def build_optimizer(model: nn.Module, cfg: Dict) -> torch.optim.Optimizer:
    """SGD over the trainable parameters: biases get WEIGHT_DECAY_BIAS and BIAS_LR_FACTOR, norms WEIGHT_DECAY_NORM."""
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
    if s["OPT"] != "SGD":
        raise ValueError(f"SOLVER.OPT {s['OPT']} is not supported (FastRetri uses SGD)")
    return torch.optim.SGD(
        groups, lr=s["BASE_LR"], momentum=s["MOMENTUM"], nesterov=s["NESTEROV"] and s["MOMENTUM"] > 0
    )


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
