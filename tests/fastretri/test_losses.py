"""FastRetri's losses against element-by-element re-statements of fast-reid's (modeling/losses, layers/any_softmax,
Baseline.losses)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastretri.config import load_config
from fastretri.losses import (
    FastRetriLoss,
    LabelSmoothingCrossEntropy,
    classifier_outputs,
    cross_entropy,
    pairwise_circle_loss,
    pairwise_cosface,
    triplet_loss,
)
from fastretri.model import TrainOutput

# ---- cross-entropy: fast-reid divides the summed loss by the number of rows whose loss is not 0 ----


def _fastreid_ce(logits, y, eps, alpha=0.2):
    """Row by row in float32 as fast-reid computes it: smoothed target weights, -sum(w * log p), then the sum over
    rows divided by max(#rows != 0, 1)."""
    n, c = logits.shape
    rows = []
    for i in range(n):
        logp = F.log_softmax(logits[i], dim=0)
        s = eps if eps >= 0 else alpha * F.softmax(logits[i], dim=0)[y[i]].item()
        w = torch.tensor([1 - s if j == y[i] else s / (c - 1) for j in range(c)])
        rows.append(-(w * logp).sum())
    nonzero = sum(1 for r in rows if r.item() != 0)
    return sum(rows) / max(nonzero, 1)


def test_ce_without_smoothing_matches_fastreid_on_a_saturated_row():
    """Three undecided rows (loss log 5) and one whose target log-probability is exactly 0 in float32: fast-reid
    averages over the three non-zero rows (log 5 = 1.6094); a batch mean would give 3/4 of it (1.2071)."""
    logits = torch.zeros(4, 5)
    logits[3, 0] = 200.0
    y = torch.tensor([1, 2, 3, 0])
    ours = LabelSmoothingCrossEntropy(0.0)(logits, y)
    assert ours.item() == pytest.approx(math.log(5), rel=1e-6)
    assert ours.item() == pytest.approx(_fastreid_ce(logits, y, 0.0).item(), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.4, -1.0])
def test_ce_matches_fastreid(eps):
    torch.manual_seed(0)
    logits, y = torch.randn(6, 7) * 3, torch.randint(0, 7, (6,))
    logits[2, y[2]] = 300.0  # one saturated row: 0 without smoothing, > 0 with it
    expected = _fastreid_ce(logits, y, eps, alpha=0.3)
    assert cross_entropy(logits, y, eps, alpha=0.3).item() == pytest.approx(expected.item(), rel=1e-5)
    if eps > 0:  # with smoothing no row is 0: the batch mean, torch's smoothing s with s / C = eps / (C - 1)
        torch_ce = F.cross_entropy(logits, y, label_smoothing=eps * 7 / 6)
        assert cross_entropy(logits, y, eps).item() == pytest.approx(torch_ce.item(), rel=1e-5)


# ---- classifier layers (any_softmax) ----


@pytest.mark.parametrize("kind", ["Linear", "CosSoftmax", "ArcSoftmax", "CircleSoftmax"])
def test_classifier_layers_match_fastreid(kind):
    torch.manual_seed(0)
    cos, y = torch.rand(5, 6) * 1.8 - 0.9, torch.randint(0, 6, (5,))
    s, m = 30.0, 0.35
    ours = classifier_outputs(cos, y, kind, s, m)
    for i in range(5):
        for j in range(6):
            v, target = cos[i, j].item(), j == y[i].item()
            if kind == "Linear":
                e = s * v
            elif kind == "CosSoftmax":
                e = s * (v - m) if target else s * v
            elif kind == "ArcSoftmax":
                e = s * math.cos(math.acos(v) + m) if target else s * v
            else:  # CircleSoftmax
                e = s * max(1 + m - v, 0) * (v - (1 - m)) if target else s * max(v + m, 0) * (v - m)
            assert ours[i, j].item() == pytest.approx(e, rel=1e-5, abs=1e-5)


def test_circle_softmax_weights_are_constants():
    cos = torch.tensor([[0.3, -0.2]], requires_grad=True)
    classifier_outputs(cos, torch.tensor([0]), "CircleSoftmax", 1.0, 0.25).sum().backward()
    # d/dl of a_p (l - 0.75) with a_p held fixed = a_p = 1.25 - 0.3; of a_n (l - 0.25) = a_n = max(-0.2 + 0.25, 0)
    assert cos.grad.tolist()[0] == pytest.approx([0.95, 0.05], rel=1e-6)


# ---- pairwise losses ----


def _features():
    torch.manual_seed(1)
    return torch.randn(8, 5, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])


def _dist(x, i, j, norm_feat):
    if norm_feat:
        return 2 - 2 * F.cosine_similarity(x[i], x[j], dim=0).item()
    return math.sqrt(max(((x[i] - x[j]) ** 2).sum().item(), 1e-12))


@pytest.mark.parametrize("margin", [0.3, 0.0])
@pytest.mark.parametrize("norm_feat", [False, True])
@pytest.mark.parametrize("hard", [False, True])
def test_triplet_loss_matches_fastreid(margin, norm_feat, hard):
    x, y = _features()
    n = len(y)
    losses = []
    for i in range(n):
        d = [_dist(x, i, j, norm_feat) for j in range(n)]
        pos = [j for j in range(n) if y[j] == y[i]]  # the anchor is one of its positives, as in fast-reid
        neg = [j for j in range(n) if y[j] != y[i]]
        if hard:
            ap, an = max(d[j] for j in pos), min(d[j] for j in neg)
        else:  # softmax weights over the masked row; the max runs over the whole masked row (zeros included)
            top_p = max(d[j] if j in pos else 0.0 for j in range(n))
            zp = sum(math.exp(d[j] - top_p) for j in pos) + 1e-6
            ap = sum(d[j] * math.exp(d[j] - top_p) / zp for j in pos)
            top_n = max(-d[j] if j in neg else 0.0 for j in range(n))
            zn = sum(math.exp(-d[j] - top_n) for j in neg) + 1e-6
            an = sum(d[j] * math.exp(-d[j] - top_n) / zn for j in neg)
        losses.append(max(0.0, ap - an + margin) if margin > 0 else math.log1p(math.exp(ap - an)))
    expected = sum(losses) / n
    assert triplet_loss(x, y, margin, norm_feat, hard).item() == pytest.approx(expected, rel=1e-9)


def _pairwise(x, y, row_logits):
    unit = F.normalize(x, dim=1)
    sim = unit @ unit.t()
    total = 0.0
    for i in range(len(y)):
        pos = [sim[i, j].item() for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [sim[i, j].item() for j in range(len(y)) if y[j] != y[i]]
        lp, ln = row_logits(pos, neg)
        lse_p = math.log(sum(math.exp(v) for v in lp)) if lp else -math.inf
        lse_n = math.log(sum(math.exp(v) for v in ln))
        total += math.log1p(math.exp(lse_p + lse_n))
    return total / len(y)


def test_circle_loss_matches_fastreid():
    x, y = _features()
    m, g = 0.25, 16.0

    def logits(pos, neg):
        return (
            [-g * max(1 + m - s, 0) * (s - (1 - m)) for s in pos],
            [g * max(s + m, 0) * (s - m) for s in neg],
        )

    assert pairwise_circle_loss(x, y, m, g).item() == pytest.approx(_pairwise(x, y, logits), rel=1e-7)


def test_cosface_matches_fastreid():
    x, y = _features()
    m, g = 0.25, 16.0

    def logits(pos, neg):
        return [-g * s for s in pos], [g * (s + m) for s in neg]

    assert pairwise_cosface(x, y, m, g).item() == pytest.approx(_pairwise(x, y, logits), rel=1e-7)


def test_loss_names_are_summed_on_the_neck_feature_chosen():
    """Baseline.losses: the sum of the listed losses; the pairwise ones on NECK_FEAT's feature."""
    torch.manual_seed(2)
    out = TrainOutput(torch.randn(8, 5), torch.rand(8, 4) * 2 - 1, torch.randn(8, 5))
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    names = ["CrossEntropyLoss", "TripletLoss", "CircleLoss", "Cosface"]
    opts = ["MODEL.LOSSES.NAME", str(names), "MODEL.HEADS.CLS_LAYER", "CosSoftmax", "MODEL.HEADS.SCALE", "16"]
    opts += ["MODEL.HEADS.MARGIN", "0.2", "MODEL.LOSSES.CE.SCALE", "0.5", "MODEL.LOSSES.TRI.SCALE", "2"]
    for neck, feat in (("after", out.embedding), ("before", out.pooled)):
        total, parts = FastRetriLoss(load_config(None, opts + ["MODEL.HEADS.NECK_FEAT", neck]))(out, y)
        expected = {
            "loss_cls": 0.5 * cross_entropy(classifier_outputs(out.logits, y, "CosSoftmax", 16.0, 0.2), y, 0.1),
            "loss_triplet": 2 * triplet_loss(feat, y, 0.3, False, False),
            "loss_circle": pairwise_circle_loss(feat, y, 0.25, 128.0),
            "loss_cosface": pairwise_cosface(feat, y, 0.25, 128.0),
        }
        assert parts.keys() == expected.keys()
        for k, v in expected.items():
            assert parts[k].item() == pytest.approx(v.item(), rel=1e-6), k
        assert total.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-6)
