import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastretri.losses import LabelSmoothingCrossEntropy
from fastretri.solver import build_optimizer, clip_grad_norm_groups, lr_at

CUB = dict(base_lr=0.02, iters_per_epoch=45, max_epoch=30, warmup_iters=1000, warmup_factor=0.1, eta_min=2e-5)


@pytest.mark.parametrize(
    "iteration, expected",
    [
        (0, 0.002),
        (500, 0.02 * (0.1 * 0.5 + 0.5)),
        (999, 0.02 * (0.1 * 0.001 + 0.999)),
        (1000, 0.02),  # warm-up over in epoch 22 (iterations 990..1034): full lr until it ends
        (1034, 0.02),
        (1035, 2e-5 + (0.02 - 2e-5) * (1 + math.cos(math.pi * 1 / 7)) / 2),  # epoch 23: first cosine step, T_max 7
        (29 * 45, 2e-5),  # last epoch reaches eta_min
    ],
)
def test_schedule_values(iteration, expected):
    assert lr_at(iteration, **CUB) == pytest.approx(expected, rel=1e-9)


class _FastReidWarmupLR(torch.optim.lr_scheduler.LRScheduler):
    """fast-reid ``WarmupLR`` (solver/lr_scheduler.py) and ``_get_warmup_factor_at_epoch``, re-stated."""

    def __init__(self, optimizer, factor: float, iters: int, method: str = "linear"):
        self.factor, self.iters, self.method = factor, iters, method
        super().__init__(optimizer)

    def get_lr(self):
        it = self.last_epoch
        if it >= self.iters:
            f = 1.0
        elif self.method == "constant":
            f = self.factor
        elif self.method == "linear":
            f = self.factor * (1 - it / self.iters) + it / self.iters
        else:  # exp
            f = self.factor ** (1 - it / self.iters)
        return [b * f for b in self.base_lrs]


def fastreid_lrs(
    base_lr,
    iters_per_epoch,
    max_epoch,
    warmup_iters,
    warmup_factor,
    eta_min,
    warmup_method="linear",
    sched="CosineAnnealingLR",
    steps=(30, 55),
    gamma=0.1,
    delay_epochs=0,
):
    """The learning rate of every iteration as fast-reid's trainer produces it: build_lr_scheduler (cosine with
    T_max = MAX_EPOCH - max(ceil(WARMUP_ITERS / iters), DELAY_EPOCHS), or MultiStepLR(STEPS, GAMMA); then WarmupLR
    on the same optimizer), TrainerBase.train's loop and the LRScheduler hook (warm-up stepped in after_step while
    iter + 1 <= WARMUP_ITERS; the scheduler stepped in after_epoch once iter + 1 > WARMUP_ITERS and epoch + 1 >
    DELAY_EPOCHS, iter being the count of iterations done)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    if sched == "MultiStepLR":
        lr_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(steps), gamma=gamma)
    else:
        t_max = max_epoch - max(math.ceil(warmup_iters / iters_per_epoch), delay_epochs)
        lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    warmup_sched = _FastReidWarmupLR(opt, warmup_factor, warmup_iters, warmup_method) if warmup_iters > 0 else None
    lrs, it = [], 0
    for epoch in range(max_epoch):
        for _ in range(iters_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])  # the step runs with this lr
            opt.step()
            if it + 1 <= warmup_iters:  # after_step
                warmup_sched.step()
            it += 1
        if it + 1 > warmup_iters and epoch + 1 > delay_epochs:  # after_epoch
            lr_sched.step()
    return lrs


# training images per dataset (anchors/datasets.md) -> iterations per epoch = N // IMS_PER_BATCH (drop last)
TRAIN_IMAGES = {"cub": 5864, "car": 8054, "sop": 59551, "isc": 25882, "demo": 960}


def _check_against_fastreid(base_lr, iters_per_epoch, max_epoch, warmup_iters, warmup_factor, eta_min, **more):
    args = dict(
        base_lr=base_lr,
        iters_per_epoch=iters_per_epoch,
        max_epoch=max_epoch,
        warmup_iters=warmup_iters,
        warmup_factor=warmup_factor,
        eta_min=eta_min,
        **more,
    )
    expected = fastreid_lrs(**args)
    ours = [lr_at(i, **args) for i in range(len(expected))]
    bad = [i for i, (a, b) in enumerate(zip(ours, expected)) if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)]
    assert not bad, f"{len(bad)}/{len(expected)} iterations differ; first {bad[0]}: {ours[bad[0]]}, {expected[bad[0]]}"
    if (
        warmup_iters > 0
        and more.get("sched", "CosineAnnealingLR") == "CosineAnnealingLR"
        and not more.get("delay_epochs")
    ):
        assert ours[-1] == pytest.approx(eta_min, rel=1e-9)  # the last epoch runs at eta_min
    return ours


@pytest.mark.parametrize("config", ["cub", "cars", "sop", "inshop", "demo", "base"])
def test_schedule_matches_fastreid_hooks_for_every_config(config):
    from fastretri.config import data_name, load_config
    from tests.fastretri.conftest import CONFIGS

    cfg = load_config(CONFIGS / f"{config}.yml")
    s = cfg["SOLVER"]
    ipe = TRAIN_IMAGES[data_name(cfg)] // s["IMS_PER_BATCH"]
    if config == "demo":
        assert s["WARMUP_ITERS"] % ipe == 0  # the case that was one cosine step late
    _check_against_fastreid(s["BASE_LR"], ipe, s["MAX_EPOCH"], s["WARMUP_ITERS"], s["WARMUP_FACTOR"], s["ETA_MIN_LR"])


@pytest.mark.parametrize("ipe, warmup", [(45, 90), (45, 45), (20, 1000), (45, 1), (45, 44), (45, 46), (7, 0)])
def test_schedule_matches_fastreid_hooks_edge_cases(ipe, warmup):
    """Warm-up a multiple of the epoch (ends with an epoch), one iteration either side, none at all."""
    _check_against_fastreid(0.02, ipe, 60, warmup, 0.1, 2e-5)


def test_schedule_multiple_of_epoch_values():
    """WARMUP_ITERS 90 = 2 epochs of 45: the warm-up ends with epoch 1, whose after_epoch steps the cosine once,
    so epoch 2 already runs at step 1 of T_max = 30 - 2 (the old code ran it at full lr)."""
    args = dict(base_lr=0.02, iters_per_epoch=45, max_epoch=30, warmup_iters=90, warmup_factor=0.1, eta_min=2e-5)
    assert lr_at(89, **args) == pytest.approx(0.02 * (0.1 / 90 + 89 / 90), rel=1e-12)
    assert lr_at(90, **args) == pytest.approx(2e-5 + (0.02 - 2e-5) * (1 + math.cos(math.pi / 28)) / 2, rel=1e-12)
    assert lr_at(29 * 45, **args) == pytest.approx(2e-5, rel=1e-12)


@pytest.mark.parametrize("method", ["linear", "constant", "exp"])
@pytest.mark.parametrize(
    "sched, steps", [("CosineAnnealingLR", ()), ("MultiStepLR", (3, 7, 7)), ("MultiStepLR", (9, 2))]
)
@pytest.mark.parametrize("delay", [0, 2, 6])
def test_schedulers_warmups_and_delay_match_fastreid(method, sched, steps, delay):
    """SOLVER.SCHED, WARMUP_METHOD and DELAY_EPOCHS against torch's schedulers driven by fast-reid's hooks."""
    lrs = _check_against_fastreid(
        0.02, 7, 15, 20, 0.1, 2e-5, warmup_method=method, sched=sched, steps=steps, gamma=0.5, delay_epochs=delay
    )
    assert len(set(lrs)) >= 3  # the schedule moves


def test_schedule_from_config_reads_every_solver_key():
    from fastretri.config import load_config
    from fastretri.solver import schedule_from_config

    opts = ["SOLVER.SCHED", "MultiStepLR", "SOLVER.STEPS", "[2, 4]", "SOLVER.GAMMA", "0.5", "SOLVER.WARMUP_METHOD"]
    opts += ["exp", "SOLVER.WARMUP_ITERS", "10", "SOLVER.DELAY_EPOCHS", "3", "SOLVER.MAX_EPOCH", "9"]
    schedule = schedule_from_config(load_config(None, opts + ["SOLVER.BASE_LR", "0.1"]), 4)
    expected = fastreid_lrs(0.1, 4, 9, 10, 0.1, 3e-5, "exp", "MultiStepLR", (2, 4), 0.5, 3)
    assert [schedule(i) for i in range(36)] == pytest.approx(expected, rel=1e-12)


def _grads(params):
    return [p.grad.detach().clone().double() for p in params]


def test_clipping_is_global_over_a_contiguous_group():
    """fast-reid clips clip_grad_norm_(buffer, 5) on the one flat buffer of all trainable tensors: every gradient
    is scaled by min(1, 5 / (||g||_2 + 1e-6)) with ||g|| the norm of all of them together."""
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])  # norms 50 and 0.5
    opt = torch.optim.SGD([{"params": [a], "weight_decay": 5e-4}, {"params": [b], "weight_decay": 5e-4}], lr=0.1)
    norms = clip_grad_norm_groups(opt, 5.0)
    total = math.sqrt(50.0**2 + 0.5**2)
    coef = 5.0 / (total + 1e-6)
    assert [float(n) for n in norms] == [pytest.approx(total, rel=1e-6)]
    assert torch.allclose(a.grad.double(), torch.tensor([30.0, 40.0, 0.0], dtype=torch.float64) * coef, rtol=1e-6)
    assert torch.allclose(b.grad.double(), torch.tensor([0.3, 0.4], dtype=torch.float64) * coef, rtol=1e-6)
    # both tensors shrink together: b's own norm (0.5) was far below 5, per-tensor clipping would have kept it


def test_clipping_groups_follow_contiguous_params_on_a_model():
    """On a FastRetri with trainable BN biases (NORM BN, WEIGHT_DECAY_BIAS 0): fast-reid's ContiguousParams puts
    weights (wd 5e-4) and biases (wd 0) in two buffers, each clipped on its own norm. Independent computation:
    flatten each group's gradients (float64), as the buffers would hold them."""
    from fastretri.config import load_config
    from fastretri.model import FastRetri

    torch.manual_seed(0)
    model = FastRetri(5, "resnet18", norm="BN")
    opt = build_optimizer(model, load_config(None))
    logits = model.train()(torch.randn(4, 3, 32, 32)).logits
    (1e3 * F.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))).backward()  # large enough to clip
    named = dict(model.named_parameters())
    groups = {}
    for name, p in named.items():
        if p.requires_grad:
            groups.setdefault("bias" if name.endswith("bias") else "weight", []).append(p)
    before = {k: _grads(v) for k, v in groups.items()}
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in before.items()}
    clip_grad_norm_groups(opt, 5.0)
    for k, params in groups.items():
        norm = flat[k].norm().item()
        coef = min(1.0, 5.0 / (norm + 1e-6))
        assert norm > 5.0
        for g0, p in zip(before[k], params):
            assert torch.allclose(p.grad.double(), g0 * coef, rtol=1e-5, atol=1e-12)
        assert torch.cat([p.grad.double().flatten() for p in params]).norm().item() == pytest.approx(5.0, rel=1e-5)


def test_clip_by_value_and_norm_type_follow_the_config():
    """CLIP_TYPE value: torch's clip_grad_value_ on every gradient (fast-reid's per-parameter clipper);
    NORM_TYPE: the p of the clipped group norm."""
    from fastretri.config import load_config
    from fastretri.solver import clipper_from_config

    def clipped(opts):
        a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
        a.grad, b.grad = torch.tensor([30.0, -40.0, 0.5]), torch.tensor([0.3, -8.0])
        opt = torch.optim.SGD([{"params": [a], "weight_decay": 5e-4}, {"params": [b], "weight_decay": 5e-4}], lr=0.1)
        clipper_from_config(load_config(None, opts))(opt)
        return torch.cat([a.grad, b.grad]).tolist()

    assert clipped(["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value"]) == pytest.approx([5.0, -5.0, 0.5, 0.3, -5.0])
    g = [30.0, -40.0, 0.5, 0.3, -8.0]
    l1 = sum(abs(v) for v in g)
    assert clipped(["SOLVER.CLIP_GRADIENTS.NORM_TYPE", "1.0"]) == pytest.approx([v * 5 / (l1 + 1e-6) for v in g])
    l2 = math.sqrt(sum(v * v for v in g))
    assert clipped([]) == pytest.approx([v * 5 / (l2 + 1e-6) for v in g])
    assert clipper_from_config(load_config(None, ["SOLVER.CLIP_GRADIENTS.ENABLED", "False"])) is None


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_other_optimizers_as_fastreid_builds_them(name):
    """fast-reid: getattr(torch.optim, OPT)(param groups) with the optimizer's own defaults besides lr and decay."""
    from fastretri.config import load_config
    from fastretri.model import FastRetri

    opt = build_optimizer(FastRetri(4, "resnet18"), load_config(None, ["SOLVER.OPT", name, "SOLVER.BASE_LR", "0.01"]))
    reference = getattr(torch.optim, name)([nn.Parameter(torch.zeros(1))], lr=0.01)
    assert type(opt) is type(reference)
    keep = {"params", "lr", "weight_decay", "lr_factor", "name", "initial_lr"}
    for group in opt.param_groups:
        assert {k: v for k, v in group.items() if k not in keep} == {
            k: v for k, v in reference.param_groups[0].items() if k not in keep
        }


def test_clipping_leaves_small_gradients_alone():
    a = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0 - 1e-3])
    clip_grad_norm_groups(torch.optim.SGD([a], lr=0.1), 5.0)
    assert torch.equal(a.grad, torch.tensor([3.0, 4.0 - 1e-3]))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.4])
def test_label_smoothing_against_torch(eps):
    torch.manual_seed(0)
    logits, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    # fast-reid: 1-eps on the target, eps/(C-1) elsewhere == torch's smoothing s with s/C = eps/(C-1)
    expected = F.cross_entropy(logits, y, label_smoothing=eps * 7 / 6)
    assert LabelSmoothingCrossEntropy(eps)(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    manual = (
        -sum(
            (1 - eps) * F.log_softmax(logits[i], 0)[y[i]]
            + sum(eps / 6 * F.log_softmax(logits[i], 0)[c] for c in range(7) if c != y[i])
            for i in range(6)
        )
        / 6
    )
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
