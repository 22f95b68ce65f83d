import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common.errors import UserError
from common.pooling import GeM
from fastretri.model import FastRetri, load_fastreid_model


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
        logits = model(torch.randn(4, 3, 32, 32)).logits
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
    emb, logits, pooled = model(torch.randn(3, 3, 32, 32))
    assert torch.allclose(logits, emb @ model.classifier.weight.t(), atol=1e-6)
    mean, var = pooled.mean(0), pooled.var(0, unbiased=False)  # BNNeck: batch statistics, weight 1, bias 0
    assert torch.allclose(emb, (pooled - mean) / torch.sqrt(var + 1e-5), atol=1e-4)


def test_gem_against_formula():
    x = torch.rand(2, 3, 4, 5) - 0.2  # some negatives, clamped to eps
    expected = torch.stack([torch.stack([(c.clamp(min=1e-6) ** 3).mean() ** (1 / 3) for c in img]) for img in x])
    assert torch.allclose(GeM(p=3)(x), expected, atol=1e-6)
    assert torch.allclose(GeM(p=1)(x.abs()), x.abs().mean(dim=(2, 3)), atol=1e-6)
    assert not list(GeM(p=3).parameters()) and len(list(GeM(p=3, learnable=True).parameters())) == 1


@pytest.mark.parametrize(
    "name, formula",
    [
        ("GeneralizedMeanPooling", lambda x: x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)),
        ("GeneralizedMeanPoolingP", lambda x: x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)),
        ("GlobalAvgPool", lambda x: x.mean(dim=(2, 3))),
        ("FastGlobalAvgPool", lambda x: x.flatten(2).mean(-1)),
        ("GlobalMaxPool", lambda x: x.flatten(2).max(-1)[0]),
        ("AdaptiveAvgMaxPool", lambda x: x.flatten(2).mean(-1) + x.flatten(2).max(-1)[0]),
        ("ClipGlobalAvgPool", lambda x: x.flatten(2).mean(-1).clamp(0, 1)),
    ],
)
def test_pool_layers_match_fastreids(name, formula):
    """MODEL.HEADS.POOL_LAYER: fastreid.layers.pooling's layers (1 x 1 output, flattened)."""
    from fastretri.config import load_config
    from fastretri.model import build_model

    model = build_model(
        load_config(None, ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.HEADS.POOL_LAYER", name]), 3, "none"
    )
    x = torch.rand(2, 4, 5, 3) * 1.5 - 0.2  # some negatives, some above 1
    assert torch.allclose(model.pool(x), formula(x), atol=1e-6)
    learnable = [n for n, p in model.named_parameters() if n.startswith("pool.")]
    assert learnable == (["pool.p"] if name.endswith("P") else [])  # GeM-P's p is trained (weight decay group)
    model.eval()
    img = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(img), model.bottleneck(formula(model.forward_features(img))), atol=1e-5)


def test_margin_classifiers_see_cosine_logits():
    from fastretri.config import load_config
    from fastretri.model import build_model

    cfg = load_config(None, ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.HEADS.CLS_LAYER", "ArcSoftmax"])
    torch.manual_seed(0)
    model = build_model(cfg, 3, "none").train()
    torch.manual_seed(1)
    out = model(torch.randn(4, 3, 32, 32))
    expected = F.normalize(out.embedding) @ F.normalize(model.classifier.weight).t()
    assert torch.allclose(out.logits, expected, atol=1e-6) and out.logits.abs().max() <= 1


def test_backbone_norms():
    """FrozenBN: fixed statistics and affine; BN: trained, per process; syncBN: the global-batch BatchNorm (the
    same as BN in one process)."""
    from common.distributed import GlobalBatchNorm
    from fastretri.config import load_config
    from fastretri.model import build_model

    def model(norm):
        torch.manual_seed(0)
        return build_model(
            load_config(None, ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.BACKBONE.NORM", norm]), 3, "none"
        )

    frozen, bn, sync = model("FrozenBN").train(), model("BN").train(), model("syncBN").train()
    assert not frozen.backbone[1].training and not frozen.backbone[1].weight.requires_grad
    assert bn.backbone[1].training and bn.backbone[1].weight.requires_grad and type(bn.backbone[1]) is nn.BatchNorm2d
    assert isinstance(sync.backbone[1], GlobalBatchNorm) and sync.backbone[1].training
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(bn(x).embedding, sync(x).embedding, atol=1e-5)
    assert not torch.allclose(bn(x).embedding, frozen(x).embedding, atol=1e-3)


# ---- stem max-pool: fastreid's MaxPool2d(3, stride 2, padding 0, ceil_mode) ----


def _maxpool_reference(x: np.ndarray) -> np.ndarray:
    """fastreid's stem pool by brute force: 3 x 3 windows every 2 pixels from the corner, no padding; ceil mode
    keeps a last window that hangs over the edge (max over the pixels it covers): ceil((n - 3) / 2) + 1 outputs."""
    n_h, n_w = (math.ceil((n - 3) / 2) + 1 for n in x.shape[-2:])
    out = np.empty(x.shape[:-2] + (n_h, n_w))
    for i in range(n_h):
        for j in range(n_w):
            out[..., i, j] = x[..., 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(-2, -1))
    return out


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("size", [224, 225, 97, 33])
def test_stem_maxpool_matches_fastreid(model, size):
    model.double().eval()
    torch.manual_seed(size)
    x = torch.randn(1, 3, size, size + 2, dtype=torch.float64)
    with torch.no_grad():
        stem = model.backbone[:3](x)
        pooled = model.backbone[3](stem)
        expected = _maxpool_reference(stem.numpy())
        assert pooled.shape == expected.shape
        assert np.array_equal(pooled.numpy(), expected)
        # the whole backbone runs on that pool: layers 1-4 applied to the brute-force pooled map
        feats = model.forward_features(x)
        assert torch.allclose(feats, model.backbone[4:](torch.from_numpy(expected)), rtol=1e-12, atol=1e-12)
    # shapes: conv1 (7, 2, 3), pool ceil((n-3)/2)+1, layer2/3 (3, 2, 1), layer4 stride 1
    side = []
    for n in (size, size + 2):
        n = math.ceil((_conv_out(n, 7, 2, 3) - 3) / 2) + 1
        side.append(_conv_out(_conv_out(n, 3, 2, 1), 3, 2, 1))
    assert feats.shape == (1, 512, *side)


def test_stem_maxpool_differs_from_torchvision_padding():
    """At 224 px both give 56 x 56, on grids one pixel apart; at 225 px fastreid's is one smaller."""
    x = torch.randn(1, 64, 112, 112)
    ours, tv = FastRetri(2, "resnet18").backbone[3], nn.MaxPool2d(3, 2, padding=1)
    assert ours(x).shape == tv(x).shape == (1, 64, 56, 56) and not torch.equal(ours(x), tv(x))
    assert ours(torch.randn(1, 64, 113, 113)).shape[-1] == 56 and tv(torch.randn(1, 64, 113, 113)).shape[-1] == 57


def test_imagenet_style_weights_still_load(tmp_path):
    """A torchvision ResNet state dict (what --pretrained imagenet/PATH loads) fits: pooling has no weights."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    m = FastRetri(5, "resnet18", pretrained=str(tmp_path / "resnet18.pth"))
    mine = m.backbone.state_dict()
    names = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    for key, value in state.items():
        stage, rest = key.split(".", 1)
        if stage != "fc":
            assert torch.equal(mine[f"{names[stage]}.{rest}"], value), key
    assert isinstance(m.backbone[3], nn.MaxPool2d) and m.backbone[3].padding == 0 and m.backbone[3].ceil_mode


# ---- fast-reid's trained files ----


class _FastReidFrozenBN(nn.Module):
    """fastreid.layers.FrozenBatchNorm: weight/bias/running_mean/running_var buffers, no num_batches_tracked."""

    def __init__(self, c):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.ones(c))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]


class _FastReidBaseline(nn.Module):
    """fast-reid Baseline + ResNet(FrozenBN, last stride 1) + EmbeddingHead(GeM, BNNeck), re-stated with fastreid's
    attribute names: ``backbone.{conv1,bn1,layer1..4}``, ``heads.bottleneck.0`` (BatchNorm2d on [N, C, 1, 1]),
    ``heads.weight`` (v1.2+) or ``heads.classifier.weight`` (v1.0), ``pixel_mean``/``pixel_std`` (persistent in v1.0).
    The forward takes 0-255 images and normalises them as fast-reid's preprocess_image does."""

    def __init__(self, num_classes, v10=False):
        super().__init__()
        net = torchvision.models.resnet18(norm_layer=_FastReidFrozenBN)
        net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        net.layer4[0].conv1.stride = net.layer4[0].downsample[0].stride = (1, 1)  # _make_layer(..., last_stride=1)
        del net.fc, net.avgpool
        self.backbone = net
        self.heads = nn.Module()
        self.heads.bottleneck = nn.Sequential(nn.BatchNorm2d(512))
        if v10:
            self.heads.classifier = nn.Linear(512, num_classes, bias=False)
        else:
            self.heads.weight = nn.Parameter(torch.randn(num_classes, 512))
        mean, std = torch.tensor([0.485, 0.456, 0.406]) * 255, torch.tensor([0.229, 0.224, 0.225]) * 255
        self.register_buffer("pixel_mean", mean.view(1, -1, 1, 1), persistent=v10)
        self.register_buffer("pixel_std", std.view(1, -1, 1, 1), persistent=v10)

    def forward(self, images_255):
        x = (images_255 - self.pixel_mean) / self.pixel_std
        b = self.backbone
        x = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
        gem = F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(3), 1).pow(1 / 3)
        return self.heads.bottleneck(gem)[..., 0, 0]


def _trained_fastreid(num_classes=7, v10=False, seed=0):
    torch.manual_seed(seed)
    ref = _FastReidBaseline(num_classes, v10)
    with torch.no_grad():  # "trained" values: BN statistics and affine away from the identity, conv init kept
        for name, t in ref.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")):
                t.normal_(0, 0.1)
            elif t.dim() == 1 and t.is_floating_point():
                t.uniform_(0.8, 1.2)
    return ref.eval()


def _write_like_fastreid(ref, path):
    """fastreid Checkpointer.save: {"model", "optimizer", "lr_sched", "warmup_sched", "epoch", "metric"}; the
    optimizer runs over ContiguousParams groups (a flat buffer each, with a freeze_status string)."""
    params = [p for p in ref.parameters() if p.requires_grad]
    flat = nn.Parameter(torch.cat([p.detach().flatten() for p in params]))
    opt = torch.optim.SGD(
        [{"freeze_status": "normal", "params": flat, "lr": 0.02, "weight_decay": 5e-4}],
        lr=0.02,
        momentum=0.9,
        nesterov=True,
    )
    flat.grad = torch.ones_like(flat)
    opt.step()
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=2e-5)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    torch.save(
        {
            "model": ref.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_sched": cos.state_dict(),
            "warmup_sched": warm.state_dict(),
            "epoch": 29,
            "metric": 69.46,
        },
        path,
    )


def _cfg(**model):
    from fastretri.config import load_config

    return load_config(None, ["MODEL.BACKBONE.NAME", model.get("backbone", "resnet18")])


@pytest.mark.parametrize("v10", [False, True])
def test_fastreid_model_final_loads_and_embeds_the_same(tmp_path, v10):
    ref = _trained_fastreid(v10=v10)
    path = tmp_path / "model_final.pth"
    _write_like_fastreid(ref, path)
    assert set(torch.load(path, weights_only=True)) >= {"model", "optimizer", "lr_sched", "epoch"}  # safe to read
    model = load_fastreid_model(_cfg(), path)
    assert not model.training and model.classifier.weight.shape == (7, 512)
    classifier = ref.heads.classifier.weight if v10 else ref.heads.weight
    assert torch.equal(model.classifier.weight, classifier)
    torch.manual_seed(1)
    images01 = torch.rand(2, 3, 67, 61, dtype=torch.float64)  # odd sizes: the stem pool matters
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref.double()(images01 * 255)
        ours = model.double()((images01 - mean) / std)  # this repository's ToTensor + Normalize
    assert (expected[0] - expected[1]).abs().max() > 0.1  # embeddings that depend on the image
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-6)  # GeM computes in float32


def test_fastreid_file_that_does_not_fit_is_one_line(tmp_path):
    path = tmp_path / "model_final.pth"
    _write_like_fastreid(_trained_fastreid(), path)
    with pytest.raises(UserError, match=r"does not fit missing .*backbone\.4\.0\.conv3\.weight.*resnet50") as e:
        load_fastreid_model(_cfg(backbone="resnet50"), path)
    assert "\n" not in str(e.value)


def test_fastreid_file_with_other_pixel_statistics_is_refused(tmp_path):
    ref = _trained_fastreid(v10=True)
    ref.pixel_mean.fill_(127.5)
    torch.save({"model": ref.state_dict()}, tmp_path / "m.pth")
    with pytest.raises(UserError, match="other pixel statistics: pixel_mean"):
        load_fastreid_model(_cfg(), tmp_path / "m.pth")


def test_fastreid_file_needing_pickle_is_one_line(tmp_path):
    state = _trained_fastreid().state_dict()
    torch.save({"model": state, "args": argparse.Namespace(config_file="cub.yml")}, tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"weights_only=True.*re-save only its weights") as e:
        load_fastreid_model(_cfg(), tmp_path / "m.pth")
    assert "\n" not in str(e.value)
    torch.save({"model": state}, tmp_path / "ok.pth")  # what the message asks for, and a DDP "module." prefix
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    assert load_fastreid_model(_cfg(), tmp_path / "ok.pth") is not None
    assert load_fastreid_model(_cfg(), tmp_path / "ddp.pth") is not None
    torch.save({"model": {"features.0.weight": torch.zeros(1)}}, tmp_path / "cgd.pth")
    with pytest.raises(UserError, match="no fast-reid Baseline weights"):
        load_fastreid_model(_cfg(), tmp_path / "cgd.pth")
