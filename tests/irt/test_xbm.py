"""XBM ring order, wrap-around, self-pair exclusion (none with a momentum encoder, as in the original) and the
momentum update."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from irt.losses import ContrastiveLoss
from irt.xbm import XBM, MomentumEncoder


def _push(xbm, ids):
    ids = torch.as_tensor(ids)
    return xbm.enqueue(ids[:, None].float().repeat(1, 2), ids % 3)


def _ids(xbm):
    return xbm.get()[0][:, 0].long().tolist()


def test_fills_in_order_then_wraps_around():
    xbm = XBM(5, 2)
    assert _push(xbm, [0, 1, 2]).tolist() == [0, 1, 2]
    feats, labels = xbm.get()
    assert _ids(xbm) == [0, 1, 2] and labels.tolist() == [0, 1, 2]
    assert _push(xbm, [3, 4, 5]).tolist() == [3, 4, 0]  # crosses the end: 3, 4 go to the tail, 5 to slot 0
    assert _ids(xbm) == [5, 1, 2, 3, 4] and xbm.get()[1].tolist() == [2, 1, 2, 0, 1]
    assert int(xbm.ptr) == 1
    _push(xbm, [6, 7])
    assert _ids(xbm) == [5, 6, 7, 3, 4]  # the two oldest (1, 2) were replaced, nothing younger


def test_batch_larger_than_memory_keeps_newest():
    xbm = XBM(3, 2)
    _push(xbm, [20])
    assert _push(xbm, [10, 11, 12, 13, 14]).tolist() == [-1, -1, 1, 2, 0]
    assert _ids(xbm) == [14, 12, 13]
    mask = xbm.self_pairs(torch.tensor([-1, -1, 1, 2, 0]))
    assert mask.nonzero().tolist() == [[2, 1], [3, 2], [4, 0]]  # rows that did not fit have no copy to mask


def test_self_pairs_by_position_only():
    """Each row is masked against the one slot it was just written to: not against older copies of the same image,
    and not against a second draw of the same image in the same batch (the same values, at another position)."""
    xbm = XBM(6, 2)
    _push(xbm, [0, 1, 2])
    slots = _push(xbm, [2, 2, 0])  # image 2 drawn twice in one batch, 0 and 2 again at a later step
    assert _ids(xbm) == [0, 1, 2, 2, 2, 0]
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, 3] = expected[1, 4] = expected[2, 5] = True
    assert torch.equal(xbm.self_pairs(slots), expected)
    assert xbm.self_pairs(slots, momentum_encoder=True) is None


def test_checkpoint_of_the_index_and_step_layout_loads():
    xbm = XBM(4, 2)
    _push(xbm, [1, 2, 3])
    state = dict(xbm.state_dict(), indices=torch.arange(4), steps=torch.zeros(4, dtype=torch.long))
    other = XBM(4, 2)
    other.load_state_dict(state)
    assert _ids(other) == [1, 2, 3] and int(other.ptr) == 3


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


def _original_contrastive(z, y, memory, memory_y, skip=lambda i, k: False):
    """The original's loss for one step, by loops: PML ContrastiveLoss(pos_margin=1, neg_margin=0.5, cosine) on the
    in-batch pairs i != j (positions) plus on every (batch, memory) pair but those ``skip`` names (none in the
    original), each term the mean of the non-zero positive losses plus the mean of the non-zero negative losses
    (AvgNonZeroReducer)."""

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
    with_memory = [(i, memory[k], memory_y[k]) for i in range(len(z)) for k in range(len(memory)) if not skip(i, k)]
    return term(in_batch) + term(with_memory)


def test_momentum_encoder_self_pairs_are_positives_as_in_the_original():
    """With a key encoder each sample meets its key embedding just enqueued (a different encoder's view): the loss
    equals the original's, self-pairs included; masking them would change it."""
    g = torch.Generator().manual_seed(0)
    criterion = ContrastiveLoss(0.5)
    xbm = XBM(16, 4).double()
    stored, stored_y = [], []
    for labels in (torch.tensor([0, 0, 1, 2]), torch.tensor([1, 0, 2, 2])):
        z = F.normalize(torch.randn(4, 4, generator=g, dtype=torch.float64), dim=1)
        keys = F.normalize(z + 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64), dim=1)
        stored += list(keys)
        stored_y += labels.tolist()
        slots = xbm.enqueue(keys, labels)
        feats, mem_labels = xbm.get()
        mask = xbm.self_pairs(slots, momentum_encoder=True)
        ours = criterion(z, labels) + criterion(z, labels, feats, mem_labels, mask)
        expected = _original_contrastive(z, labels, torch.stack(stored), torch.tensor(stored_y))
        assert float(ours) == pytest.approx(expected, rel=1e-12)
        masked = criterion(z, labels) + criterion(z, labels, feats, mem_labels, xbm.self_pairs(slots))
        assert abs(float(masked) - expected) > 1e-3


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4).double()

    def forward(self, x):
        return F.normalize(self.linear(x), dim=1)


def test_training_step_keeps_a_twice_drawn_image_as_positive():
    """train.py's loss on a batch that draws image 7 twice (two different crops, rows 0 and 1), no momentum encoder:
    the original's pairs by loops, less each row's pair with its own just-stored copy. The two crops meet each other
    in the batch and in the memory, both ways: genuine positives."""
    from irt.losses import KoLeo
    from irt.train import train_one_epoch

    torch.manual_seed(0)
    model = _Embed()
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(5, 6, generator=g, dtype=torch.float64),
            torch.tensor([3, 3, 0, 1, 3]),
            torch.tensor([7, 7, 1, 2, 9]),
        ),
        (
            torch.randn(5, 6, generator=g, dtype=torch.float64),
            torch.tensor([0, 1, 3, 3, 2]),
            torch.tensor([1, 2, 7, 7, 4]),
        ),
    ]
    stats = train_one_epoch(
        model,
        ContrastiveLoss(0.5),
        KoLeo(),
        torch.optim.SGD(model.parameters(), lr=0.0),  # the model stays fixed: the loss can be restated
        iter(batches),
        torch.device("cpu"),
        range(2),
        lambda_reg=0.0,
        xbm=XBM(16, 4).double(),
        logging_freq=0,
        dtype=torch.float64,
    )
    memory, memory_y, losses = [], [], []
    with torch.no_grad():
        for images, labels, _ in batches:
            z = model(images)
            own = len(memory)  # row i of this batch is stored at memory[own + i]
            memory += list(z)
            memory_y += labels.tolist()
            own_copy = lambda i, k, own=own: k == own + i  # noqa: E731
            losses.append(_original_contrastive(z, labels, torch.stack(memory), torch.tensor(memory_y), own_copy))
    assert stats["train_contrastive"] == pytest.approx(sum(losses) / 2, rel=1e-12)
