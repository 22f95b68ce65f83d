import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastretri.losses import LabelSmoothingCrossEntropy
from fastretri.solver import build_optimizer, clip_per_parameter, lr_at

CUB = dict(base_lr=0.02, iters_per_epoch=45, max_epoch=30, warmup_iters=1000, warmup_factor=0.1, eta_min=2e-5)


@pytest.mark.parametrize("iteration, expected", [
    (0, 0.002), (500, 0.02 * (0.1 * 0.5 + 0.5)), (999, 0.02 * (0.1 * 0.001 + 0.999)),
    (1000, 0.02),                    # warm-up over in epoch 22 (iterations 990..1034): full lr until it ends
    (1034, 0.02),
    (1035, 2e-5 + (0.02 - 2e-5) * (1 + math.cos(math.pi * 1 / 7)) / 2),  # epoch 23: first cosine step, T_max 7
    (29 * 45, 2e-5),                 # last epoch reaches eta_min
])
def test_schedule_values(iteration, expected):
    assert lr_at(iteration, **CUB) == pytest.approx(expected, rel=1e-9)


def test_schedule_matches_torch_cosine_after_warmup():
    """Per-epoch CosineAnnealingLR (fast-reid's lr_sched) stepped once per epoch after the warm-up."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100 - math.ceil(1000 / 62), eta_min=5e-4)
    args = dict(base_lr=0.05, iters_per_epoch=62, max_epoch=100, warmup_iters=1000, eta_min=5e-4)
    first = 1000 // 62  # epoch in which the warm-up ends
    for epoch in range(first, 100):
        assert lr_at(epoch * 62 + 61, **args) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6)
        opt.step()
        cos.step()


def test_per_parameter_clipping():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])  # norms 50 and 0.5
    clip_per_parameter([a, b], 5.0)
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0, 0.0]), atol=1e-5)  # clipped alone to norm 5
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4]))  # a global-norm clip would have shrunk this too


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.4])
def test_label_smoothing_against_torch(eps):
    torch.manual_seed(0)
    logits, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    # fast-reid: 1-eps on the target, eps/(C-1) elsewhere == torch's smoothing s with s/C = eps/(C-1)
    expected = F.cross_entropy(logits, y, label_smoothing=eps * 7 / 6)
    assert LabelSmoothingCrossEntropy(eps)(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    manual = -sum((1 - eps) * F.log_softmax(logits[i], 0)[y[i]] + sum(
        eps / 6 * F.log_softmax(logits[i], 0)[c] for c in range(7) if c != y[i]) for i in range(6)) / 6
    assert LabelSmoothingCrossEntropy(eps)(logits, y).item() == pytest.approx(manual.item(), rel=1e-5)


def test_optimizer_weight_decay_groups():
    from fastretri.config import load_config
    from fastretri.model import FastRetri

    cfg = load_config(None, ["SOLVER.MOMENTUM", "0.9"])
    model = FastRetri(4, "resnet18")
    model.classifier.bias = nn.Parameter(torch.zeros(4))  # a bias to check WEIGHT_DECAY_BIAS
    opt = build_optimizer(model, cfg)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay["classifier.bias"] == 0.0 and decay["classifier.weight"] == 5e-4
    assert decay["bottleneck.weight"] == 5e-4 and "bottleneck.bias" not in decay
    assert not any(n.startswith("backbone.1.") for n in decay)  # frozen stem BN not optimised
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
