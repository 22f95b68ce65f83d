"""Contrastive loss (both averagings, with and without memory) and KoLeo against Python loops over pairs."""

import math

import pytest
import torch
import torch.nn.functional as F

from irt.losses import ContrastiveLoss, KoLeo


def _pairs_brute(z, y, ref, ref_y, skip):
    """Per-pair losses by looping: positives relu(1 - s), negatives relu(s - 0.5)."""
    pos, neg = [], []
    for i in range(len(z)):
        for j in range(len(ref)):
            if skip(i, j):
                continue
            s = sum(float(a) * float(b) for a, b in zip(z[i], ref[j]))
            if int(y[i]) == int(ref_y[j]):
                pos.append(max(0.0, 1.0 - s))
            else:
                neg.append(max(0.0, s - 0.5))
    return pos, neg


def _reduce(pos, neg, n, reduction):
    if reduction == "paper":
        return (sum(pos) + sum(neg)) / n
    nz = lambda v: sum(x for x in v if x > 0) / max(1, sum(1 for x in v if x > 0))  # noqa: E731
    return nz(pos) + nz(neg)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    mem = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    mem_y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 1, 5])
    return z, y, mem, mem_y


@pytest.mark.parametrize("reduction", ["nonzero", "paper"])
def test_in_batch_matches_loops(batch, reduction):
    z, y, _, _ = batch
    pos, neg = _pairs_brute(z, y, z, y, lambda i, j: i == j)
    got = ContrastiveLoss(0.5, reduction=reduction)(z, y)
    assert float(got) == pytest.approx(_reduce(pos, neg, len(z), reduction), rel=1e-9)


@pytest.mark.parametrize("reduction", ["nonzero", "paper"])
def test_memory_pairs_match_loops_with_ignore(batch, reduction):
    z, y, mem, mem_y = batch
    ignore = torch.zeros(len(z), len(mem), dtype=torch.bool)
    ignore[0, 5] = ignore[3, 1] = True
    pos, neg = _pairs_brute(z, y, mem, mem_y, lambda i, j: bool(ignore[i, j]))
    got = ContrastiveLoss(0.5, reduction=reduction)(z, y, mem, mem_y, ignore)
    assert float(got) == pytest.approx(_reduce(pos, neg, len(z), reduction), rel=1e-9)


def test_nonzero_average_ignores_zero_losses():
    # two identical positives (loss 0) and one orthogonal negative (loss 0): nothing to learn -> exactly 0
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    loss = ContrastiveLoss(0.5)(z, y)
    assert float(loss.detach()) == 0.0
    loss.backward()  # keeps a graph even when empty


def test_nonzero_positive_mean_over_nonzero_pairs_only():
    # positive pairs at s=0 (loss 1) and s=1 (loss 0); margin 1 makes every negative loss 0:
    # the mean over non-zero pairs is 1, not 0.5
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    ref, ref_y = z[[1, 3]], y[[1, 3]]
    got = ContrastiveLoss(1.0)(z[[0, 2]], y[[0, 2]], ref, ref_y)
    assert float(got) == pytest.approx(1.0)


def _original_koleo(z):
    """The original's DifferentialEntropyRegularization by loops: for each i the neighbour is the first j with the
    largest inner product z_i . z_j, where the own entry counts as -1; rho = ||z_i - z_nn + 1e-6||;
    loss = -mean log(rho + 1e-8)."""
    total = 0.0
    for i in range(len(z)):
        dots = [-1.0 if j == i else sum(float(a) * float(b) for a, b in zip(z[i], z[j])) for j in range(len(z))]
        nearest = dots.index(max(dots))
        rho = math.sqrt(sum((float(a) - float(b) + 1e-6) ** 2 for a, b in zip(z[i], z[nearest])))
        total -= math.log(rho + 1e-8)
    return total / len(z)


def test_koleo_matches_loops():
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    assert float(KoLeo()(z)) == pytest.approx(_original_koleo(z), rel=1e-9)


@pytest.mark.parametrize("rows", [[[1.0, 0.0], [-1.0, 0.0]], [[0.0, 1.0], [0.0, -1.0], [0.0, -1.0]]])
def test_koleo_antipodal_samples_as_in_the_original(rows):
    """All others at cosine -1: the original's -1 fill ties the sample with them and torch.max takes the first
    index, so sample 0 is its own neighbour (rho = 1e-6 * sqrt(2))."""
    z = torch.tensor(rows, dtype=torch.float64)
    expected = _original_koleo(z)
    assert float(KoLeo()(z)) == pytest.approx(expected, rel=1e-9)
    assert expected > 5  # the self-neighbour term -log(1.4e-6) dominates


def test_koleo_gradient_pushes_neighbours_apart():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0]]), dim=1).requires_grad_()
    KoLeo()(z).backward()
    # descent direction -grad moves z0 away from z1 (decreasing y) and z1 away from z0 (increasing y)
    assert -z.grad[0, 1] < 0 < -z.grad[1, 1]
