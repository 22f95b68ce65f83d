"""FastRetri optimisation (fast-reid ``solver/build.py`` + ``engine/hooks.py``), as pure functions.

* SGD, weight decay 5e-4 on weights (BNNeck weight included, WEIGHT_DECAY_NORM) and ``WEIGHT_DECAY_BIAS`` (0) on
  biases; frozen parameters are left out.
* Learning rate: linear warm-up stepped per *iteration* for ``warmup_iters`` from ``warmup_factor`` x, then cosine
  annealing stepped once per *epoch* with ``T_max = max_epoch - ceil(warmup_iters / iters_per_epoch)`` down to
  ``eta_min``. fast-reid steps the cosine after every epoch whose last iteration ends past the warm-up; here the
  same value is a closed-form function of the global iteration, so ``--resume`` needs no scheduler state.
* Gradient clipping per parameter tensor (fast-reid ``per_param_clipper``): every tensor's gradient L2 norm is
  clipped to ``CLIP_VALUE`` on its own, not the global norm.
"""
import math
from typing import Dict, Iterable, List

import torch
from torch import nn

__all__ = ["lr_at", "build_optimizer", "clip_per_parameter", "set_lr"]


def lr_at(iteration: int, *, base_lr: float, iters_per_epoch: int, max_epoch: int, warmup_iters: int = 1000,
          warmup_factor: float = 0.1, eta_min: float = 0.0) -> float:
    """Learning rate used at global (0-based) ``iteration``."""
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        return base_lr * (warmup_factor * (1 - alpha) + alpha)
    epoch = iteration // iters_per_epoch
    t_max = max(1, max_epoch - math.ceil(warmup_iters / iters_per_epoch))
    steps = max(0, epoch - warmup_iters // iters_per_epoch)  # epochs finished after the warm-up
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
        is_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and p is getattr(m, "weight", None)
                      for m in model.modules())
        if name.endswith("bias"):
            wd, factor = s["WEIGHT_DECAY_BIAS"], s["BIAS_LR_FACTOR"]
        else:
            wd, factor = (s["WEIGHT_DECAY_NORM"] if is_norm else s["WEIGHT_DECAY"]), 1.0
        groups.append({"params": [p], "weight_decay": wd, "lr_factor": factor, "lr": s["BASE_LR"] * factor,
                       "name": name})
    if s["OPT"] != "SGD":
        raise ValueError(f"SOLVER.OPT {s['OPT']} is not supported (FastRetri uses SGD)")
    return torch.optim.SGD(groups, lr=s["BASE_LR"], momentum=s["MOMENTUM"],
                           nesterov=s["NESTEROV"] and s["MOMENTUM"] > 0)


def clip_per_parameter(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> None:
    """Clip each parameter's gradient to ``max_norm`` separately (fast-reid ``per_param_clipper``)."""
    for p in parameters:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_(p, max_norm, norm_type)
