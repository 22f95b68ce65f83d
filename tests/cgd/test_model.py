"""CGD model: published parameter counts, layer3 without down-sampling, descriptors and the head against
independent computations."""

import pytest
import torch
import torch.nn.functional as F

from cgd.model import GD_CONFIGS, MAC, GeM, Model, SPoC, count_flops, freeze_bn
from common.errors import UserError

# leftthomas/CGD README table (feature_dim 1536), exact counts from the spec's closed form.
PUBLISHED = [
    ("resnet50", 98, 26_858_658),
    ("resnet50", 100, 26_862_756),
    ("resnet50", 11_318, 49_848_438),
    ("resnet50", 3_997, 34_847_709),
    ("resnext50", 98, 26_330_530),
    ("resnext50", 100, 26_334_628),
    ("resnext50", 11_318, 49_320_310),
    ("resnext50", 3_997, 34_319_581),
]


@pytest.mark.parametrize("backbone,num_classes,expected", PUBLISHED)
def test_parameter_count_matches_readme(backbone, num_classes, expected):
    model = Model(backbone, "SG", 1536, num_classes, pretrained="none")
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50"])
def test_layer3_keeps_resolution(backbone):
    """Output stride 16 instead of 32: a 224 input gives a 14x14 map (7x7 for the stock network)."""
    model = Model(backbone, "S", 8, 3).eval()
    with torch.no_grad():
        fmap = model.forward_features(torch.randn(1, 3, 64, 64))
    assert fmap.shape[-2:] == (4, 4)
    assert fmap.shape[1] == (512 if backbone in ("resnet18", "resnet34") else 2048)


def _pool(letter, fmap):
    """Independent per-channel descriptors on a (B, C, H, W) map, by flattening."""
    flat = fmap.flatten(2)
    if letter == "S":
        return flat.sum(-1) / flat.shape[-1]
    if letter == "M":
        return flat.max(-1).values
    return (flat.clamp(min=1e-6) ** 3).sum(-1).div(flat.shape[-1]) ** (1 / 3)


def test_descriptors_against_formulas():
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    for b in range(2):
        for c in range(3):
            values = [float(v) for v in x[b, c].flatten()]
            assert SPoC()(x)[b, c].item() == pytest.approx(sum(values) / 20)
            assert MAC()(x)[b, c].item() == pytest.approx(max(values))
            assert GeM()(x)[b, c].item() == pytest.approx((sum(v**3 for v in values) / 20) ** (1 / 3))


def test_gem_all_zero_channel_has_finite_gradient():
    x = torch.rand(2, 4, 3, 3)
    x[0, 1] = 0.0  # a dead ReLU channel: the original sign(m)|m|^(1/3) gives a NaN gradient here
    x.requires_grad_(True)
    out = GeM()(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert out[0, 1].item() == pytest.approx(1e-6, rel=1e-3)


@pytest.mark.parametrize("gd_config", GD_CONFIGS)
def test_forward_matches_independent_head(gd_config):
    torch.manual_seed(0)
    model = Model("resnet18", gd_config, 12 * 6, 5).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        embedding, logits = model(x)
        fmap = model.features(x)
        parts = [
            F.normalize(_pool(letter, fmap) @ fc[0].weight.t(), dim=1)
            for letter, fc in zip(gd_config, model.main_modules)
        ]
        expected = torch.cat(parts, 1) / len(gd_config) ** 0.5
        bn, fc = model.auxiliary_module
        first = _pool(gd_config[0], fmap)  # aux branch: FIRST descriptor, before its FC
        expected_logits = (
            (first - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        ) @ fc.weight.t() + fc.bias
    assert embedding.shape == (3, 72) and logits.shape == (3, 5)
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert all(fc[0].bias is None for fc in model.main_modules)


def test_feature_dim_must_divide():
    with pytest.raises(UserError, match="not divisible"):
        Model("resnet18", "SMG", 512, 4)


def test_freeze_bn_only_touches_backbone_batchnorm2d():
    model = Model("resnet18", "SG", 8, 3)
    model.train()
    freeze_bn(model)
    bn2d = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn2d and not any(m.training for m in bn2d)
    assert model.auxiliary_module[0].training


def test_flop_count_leaves_no_buffers():
    model = Model("resnet18", "SG", 8, 3)
    keys = list(model.state_dict())
    params, flops = count_flops(model, 32)
    assert list(model.state_dict()) == keys
    assert params == sum(p.numel() for p in model.parameters()) and flops > 0
