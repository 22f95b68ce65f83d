"""The ensemble model: published parameter counts, and the batched forms against E independent ResNets."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reir.model import STAGES, EnsembleBatchNorm, EnsembleConv, Model, count_parameters

# (backbone, share type, E, M) -> total trainable parameters (seed README tables and reir_sreml.md §8)
PUBLISHED = {
    ("resnet18", "layer1", 48, 12): 529_365_376,
    ("resnet18", "layer1", 48, 192): 533_797_696,
    ("resnet18", "layer1", 48, 512): 541_677_376,
    ("resnet18", "layer1", 48, 500): 541_381_888,
    ("resnet34", "layer1", 48, 12): 1_011_079_808,
    ("resnet34", "layer1", 48, 512): 1_023_391_808,
    ("resnet50", "layer1", 48, 12): 1_118_974_592,
    ("resnet50", "layer1", 48, 192): 1_136_677_952,
    ("resnext50_32x4d", "layer1", 48, 12): 1_094_093_696,
    ("resnext50_32x4d", "layer1", 48, 512): 1_143_269_696,
    ("resnet18", "none", 48, 12): 536_768_064,
    ("resnet18", "maxpool", 48, 12): 536_319_872,
    ("resnet18", "layer2", 48, 12): 504_663_680,
    ("resnet18", "layer3", 48, 12): 405_977_216,
    ("resnet18", "layer4", 48, 12): 11_472_000,
}


@pytest.mark.parametrize("config,total", list(PUBLISHED.items()), ids=lambda v: str(v))
def test_parameter_count_matches_published(config, total):
    assert count_parameters(*config)["total"] == total


def test_parameter_breakdown_resnet18():
    c = count_parameters("resnet18", "layer1", 48, 12)
    assert (c["common"], c["individual_feature"], c["individual_classifier"]) == (157_504, 11_019_008, 6_156)


def _reference_learner(model: Model, i: int) -> nn.Module:
    """Learner i as an ordinary torchvision module list, weights copied out of the ensemble's slices."""
    from torchvision import models

    block = model.branches[0]
    ref = getattr(models, model.model_type)()
    start = len(model.common_extractor)
    stages = [getattr(ref, n) for n in STAGES[start:]]
    ens_modules = [m for m in block.features.modules() if isinstance(m, (EnsembleConv, EnsembleBatchNorm))]
    ref_modules = [m for s in stages for m in s.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert len(ens_modules) == len(ref_modules)
    with torch.no_grad():
        for e, r in zip(ens_modules, ref_modules):
            n = r.out_channels if isinstance(r, nn.Conv2d) else r.num_features
            r.weight.copy_(e.weight[i * n : (i + 1) * n])
            if isinstance(r, nn.BatchNorm2d):
                for name in ("bias", "running_mean", "running_var"):
                    getattr(r, name).copy_(getattr(e, name)[i * n : (i + 1) * n])
    head = nn.Linear(block.weight.shape[2], block.weight.shape[1])
    with torch.no_grad():
        head.weight.copy_(block.weight[i])
        head.bias.copy_(block.bias[i])
    return nn.ModuleList(stages + [head])


def _reference_forward(model: Model, refs, images, weights):
    shared = model.common_extractor(images)
    outs = []
    for i, ref in enumerate(refs):
        x = shared * (1.0 if weights is None else weights[i])
        for stage in ref[:-1]:
            x = stage(x)
        outs.append(ref[-1](x.mean(dim=(2, 3))))
    return torch.stack(outs, 1)


@pytest.mark.parametrize(
    "model_type,share_type,impl",
    [
        ("resnet18", "layer1", "grouped"),
        ("resnet18", "layer1", "loop"),
        ("resnet18", "none", "grouped"),
        ("resnet18", "maxpool", "loop"),
        ("resnet18", "layer4", "grouped"),
        ("resnext50_32x4d", "layer3", "grouped"),
    ],
)
def test_ensemble_equals_independent_learners(model_type, share_type, impl):
    """Forward, gradients and BN running statistics equal E separate torchvision branches on the same weights."""
    torch.manual_seed(0)
    e, m = 3, 4
    model = Model(model_type, share_type, e, m, with_random=True, impl=impl).train().double()
    refs = nn.ModuleList([_reference_learner(model, i) for i in range(e)]).train().double()
    trunk = copy.deepcopy(model.common_extractor)
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    labels = torch.randint(0, m, (4, e))
    torch.manual_seed(1)
    out = model(images)
    torch.manual_seed(1)
    weights = torch.softmax(torch.rand(e), 0)
    model.common_extractor, saved = trunk, model.common_extractor
    ref_out = _reference_forward(model, refs, images, weights)
    model.common_extractor = saved
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    F.cross_entropy(out.permute(0, 2, 1), labels).backward()
    F.cross_entropy(ref_out.permute(0, 2, 1), labels).backward()
    for i in range(e):
        torch.testing.assert_close(model.branches[0].weight.grad[i], refs[i][-1].weight.grad, rtol=1e-9, atol=1e-10)
    first = (
        next(mod for mod in model.branches[0].features.modules() if isinstance(mod, EnsembleConv))
        if share_type != "layer4"
        else None
    )
    if first is not None:
        ref_first = [next(mod for mod in r.modules() if isinstance(mod, nn.Conv2d)) for r in refs]
        for i in range(e):
            torch.testing.assert_close(first.weights[i].grad, ref_first[i].weight.grad, rtol=1e-9, atol=1e-10)
        bn = next(mod for mod in model.branches[0].features.modules() if isinstance(mod, EnsembleBatchNorm))
        ref_bn = next(mod for mod in refs[e - 1].modules() if isinstance(mod, nn.BatchNorm2d))
        torch.testing.assert_close(bn.running_mean[(e - 1) * bn.c :], ref_bn.running_mean, rtol=1e-9, atol=1e-10)
    for p, q in zip(trunk.parameters(), saved.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-8)


def test_loop_and_grouped_agree_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = Model("resnet18", "layer1", 4, 3, with_random=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.set_impl("grouped")(images)
        b = model.set_impl("loop")(images)
        c = model(images)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(b, c)


def test_state_dict_independent_of_device_blocks():
    """Spreading learners over several devices (two CPU blocks here) keeps the single-block state dict."""
    torch.manual_seed(0)
    one = Model("resnet18", "layer2", 5, 3)
    two = Model("resnet18", "layer2", 5, 3, devices=[torch.device("cpu")] * 2)
    assert two.sizes == [3, 2]
    two.load_state_dict(one.state_dict())
    assert set(two.state_dict()) == set(one.state_dict())
    images = torch.randn(2, 3, 32, 32)
    one.eval(), two.eval()
    with torch.no_grad():
        torch.testing.assert_close(one(images), two(images))
    for k, v in two.state_dict().items():
        assert torch.equal(v, one.state_dict()[k]), k


def test_per_learner_conv_parameters_saved_as_one_tensor():
    """Conv weights are one Parameter per learner (small gradients and Adam temporaries on CPU), saved as one
    [E*out, ...] tensor per layer; loading such a file fills every learner's weights."""
    torch.manual_seed(0)
    e = 3
    model = Model("resnet18", "layer3", e, 4)
    conv = next(m for m in model.branches[0].features.modules() if isinstance(m, EnsembleConv))
    assert len(conv.weights) == e and all(w.shape[0] == conv.out for w in conv.weights)
    sd = model.state_dict()
    assert not any(".weights." in k for k in sd)
    key = next(k for k in sd if k.startswith("branches.0.features.0.0.conv1."))
    assert key.endswith(".weight") and sd[key].shape[0] == e * conv.out
    other = Model("resnet18", "layer3", e, 4)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
