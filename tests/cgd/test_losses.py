"""CGD losses against brute-force computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from cgd.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropyLoss


def test_label_smoothing_ce_matches_loop_and_torch():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 4, 4, 2, 3])
    eps, t = 0.1, 0.5
    loss = LabelSmoothingCrossEntropyLoss(eps, t)(logits, labels).item()
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        z = [v / t for v in row]
        log_norm = math.log(sum(math.exp(v) for v in z))
        log_p = [v - log_norm for v in z]
        total += (1 - eps) * -log_p[y] + eps * -sum(log_p) / len(z)
    assert loss == pytest.approx(total / 6)
    assert loss == pytest.approx(F.cross_entropy(logits / t, labels, label_smoothing=eps).item())


def _brute_triplet(x, labels, margin):
    losses = []
    for i in range(len(labels)):
        d = [math.dist(x[i], x[j]) for j in range(len(labels))]
        pos = [d[j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [d[j] for j in range(len(labels)) if labels[j] != labels[i]]
        if pos and neg:  # anchors without a positive (or negative) do not count
            losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / len(losses)


def test_batch_hard_triplet_matches_brute_force():
    torch.manual_seed(1)
    x = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 4])  # classes 3 and 4: no positive in the batch
    loss = BatchHardTripletLoss(0.1)(x, labels).item()
    assert loss == pytest.approx(_brute_triplet(x.tolist(), labels.tolist(), 0.1), rel=1e-6)
    # the original averaged all 9 anchors (d+ = 0 for the two singletons); ours differs from that
    assert loss != pytest.approx(_brute_triplet(x.tolist(), labels.tolist(), 0.1) * 7 / 9)


def test_triplet_without_valid_anchor_is_zero_with_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    loss = BatchHardTripletLoss(0.1)(x, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_triplet_gradient_finite_for_identical_embeddings():
    x = torch.ones(4, 3, requires_grad=True)
    loss = BatchHardTripletLoss(0.1)(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.1, abs=1e-5) and torch.isfinite(x.grad).all()
