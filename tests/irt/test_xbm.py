"""XBM ring order, wrap-around, self-pair exclusion (none with a momentum encoder, as in the original) and the
momentum update."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from irt.losses import ContrastiveLoss
from irt.xbm import XBM, MomentumEncoder


def _push(xbm, ids, step):
    ids = torch.as_tensor(ids)
    xbm.enqueue(ids[:, None].float().repeat(1, 2), ids % 3, ids, step)


def test_fills_in_order_then_wraps_around():
    xbm = XBM(5, 2)
    _push(xbm, [0, 1, 2], 0)
    feats, labels, idx, steps = xbm.get()
    assert idx.tolist() == [0, 1, 2] and labels.tolist() == [0, 1, 2] and feats[:, 0].tolist() == [0, 1, 2]
    _push(xbm, [3, 4, 5], 1)  # crosses the end: 3, 4 go to the tail, 5 to slot 0
    feats, labels, idx, steps = xbm.get()
    assert len(idx) == 5
    assert idx.tolist() == [5, 1, 2, 3, 4]
    assert steps.tolist() == [1, 0, 0, 1, 1]
    assert int(xbm.ptr) == 1
    _push(xbm, [6, 7], 2)
    assert xbm.get()[2].tolist() == [5, 6, 7, 3, 4]  # the two oldest (1, 2) were replaced, nothing younger


def test_batch_larger_than_memory_keeps_newest():
    xbm = XBM(3, 2)
    _push(xbm, [10, 11, 12, 13, 14], 0)
    assert sorted(xbm.get()[2].tolist()) == [12, 13, 14]


def test_self_pairs_only_same_step():
    xbm = XBM(6, 2)
    _push(xbm, [0, 1, 2], 0)
    _push(xbm, [2, 3, 0], 1)  # 0 and 2 again, at a later step
    mask = xbm.self_pairs(torch.tensor([2, 3, 0]), step=1)
    idx = xbm.get()[2].tolist()
    assert idx == [0, 1, 2, 2, 3, 0]
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, 3] = expected[1, 4] = expected[2, 5] = True  # older copies of 0 and 2 (slots 0, 2) remain usable
    assert torch.equal(mask, expected)


def test_momentum_update_formula():
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    key = MomentumEncoder(query, momentum=0.9)
    before = copy.deepcopy(key.encoder.state_dict())
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
    query(torch.randn(5, 3))  # changes the BN running stats
    key.update(query)
    for name, q in query.named_parameters():
        assert torch.allclose(key.encoder.state_dict()[name], 0.9 * before[name] + 0.1 * q.detach())
    assert torch.equal(key.encoder[1].running_mean, query[1].running_mean)
    assert not any(p.requires_grad for p in key.encoder.parameters())


@pytest.mark.parametrize("m", [-0.1, 1.5])
def test_bad_momentum_refused(m):
    with pytest.raises(ValueError):
        MomentumEncoder(nn.Linear(2, 2), m)


def _original_contrastive(z, y, memory, memory_y):
    """The original's loss for one step, by loops: PML ContrastiveLoss(pos_margin=1, neg_margin=0.5, cosine) on the
    in-batch pairs i != j plus on every (batch, memory) pair with no exclusion, each term the mean of the non-zero
    positive losses plus the mean of the non-zero negative losses (AvgNonZeroReducer)."""

    def term(pairs):
        pos, neg = [], []
        for i, other, other_label in pairs:
            s = float(z[i] @ other) / float(z[i].norm() * other.norm())
            if int(y[i]) == int(other_label):
                pos.append(max(0.0, 1.0 - s))
            else:
                neg.append(max(0.0, s - 0.5))
        mean = lambda v: sum(x for x in v if x > 0) / max(1, sum(1 for x in v if x > 0))  # noqa: E731
        return mean(pos) + mean(neg)

    in_batch = [(i, z[j], y[j]) for i in range(len(z)) for j in range(len(z)) if i != j]
    with_memory = [(i, memory[k], memory_y[k]) for i in range(len(z)) for k in range(len(memory))]
    return term(in_batch) + term(with_memory)


def test_momentum_encoder_self_pairs_are_positives_as_in_the_original():
    """With a key encoder each sample meets its key embedding just enqueued (a different encoder's view): the loss
    equals the original's, self-pairs included; masking them would change it."""
    g = torch.Generator().manual_seed(0)
    criterion = ContrastiveLoss(0.5)
    xbm = XBM(16, 4).double()
    stored, stored_y = [], []
    batches = [
        (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 2])),
        (torch.tensor([4, 0, 5, 6]), torch.tensor([1, 0, 2, 2])),
    ]  # image 0 again: an older key stays
    for step, (indices, labels) in enumerate(batches):
        z = F.normalize(torch.randn(4, 4, generator=g, dtype=torch.float64), dim=1)
        keys = F.normalize(z + 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64), dim=1)
        stored += list(keys)
        stored_y += labels.tolist()
        xbm.enqueue(keys, labels, indices, step)
        feats, mem_labels, _, _ = xbm.get()
        mask = xbm.self_pairs(indices, step, momentum_encoder=True)
        ours = criterion(z, labels) + criterion(z, labels, feats, mem_labels, mask)
        expected = _original_contrastive(z, labels, torch.stack(stored), torch.tensor(stored_y))
        assert float(ours) == pytest.approx(expected, rel=1e-12)
        masked = criterion(z, labels) + criterion(z, labels, feats, mem_labels, xbm.self_pairs(indices, step))
        assert abs(float(masked) - expected) > 1e-3
