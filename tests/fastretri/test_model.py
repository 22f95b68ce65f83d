import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.pooling import GeM
from fastretri.model import FastRetri


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FastRetri(num_classes=5, backbone="resnet18")


def test_frozen_batchnorm_survives_an_optimizer_step(model):
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:  # non-trivial statistics so a change would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "bn" in k or "downsample.1" in k}
    model.train()
    assert all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for _ in range(2):
        _, logits = model(torch.randn(4, 3, 32, 32))
        F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    after = model.backbone.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(model.backbone[0].weight, FastRetri(5, "resnet18").backbone[0].weight)


def test_last_stride_one_and_embedding(model):
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_features(x).shape == (2, 512, 4, 4)  # stride 16 instead of 32
    assert model(x).shape == (2, 512)
    stride2 = FastRetri(5, "resnet18", last_stride=2).eval()
    assert stride2.forward_features(x).shape == (2, 512, 2, 2)


def test_bnneck_and_classifier(model):
    assert not model.bottleneck.bias.requires_grad and torch.all(model.bottleneck.bias == 0)
    assert model.bottleneck.weight.requires_grad
    assert model.classifier.bias is None
    torch.manual_seed(1)
    w = FastRetri(num_classes=2000, backbone="resnet18").classifier.weight
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    model.train()
    emb, logits = model(torch.randn(3, 3, 32, 32))
    assert torch.allclose(logits, emb @ model.classifier.weight.t(), atol=1e-6)


def test_gem_against_formula():
    x = torch.rand(2, 3, 4, 5) - 0.2  # some negatives, clamped to eps
    expected = torch.stack([torch.stack([(c.clamp(min=1e-6) ** 3).mean() ** (1 / 3) for c in img]) for img in x])
    assert torch.allclose(GeM(p=3)(x), expected, atol=1e-6)
    assert torch.allclose(GeM(p=1)(x.abs()), x.abs().mean(dim=(2, 3)), atol=1e-6)
    assert not list(GeM(p=3).parameters()) and len(list(GeM(p=3, learnable=True).parameters())) == 1
