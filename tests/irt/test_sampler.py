"""IRT's --m sampler against the semantics of pytorch-metric-learning's MPerClassSampler (the original's), batch by
batch: exactly B/m distinct classes, m images each, classes drawn uniformly, small classes drawn with replacement."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from common.errors import UserError
from irt.data import MPerClassSampler, StepStream, train_loader

# classes 0-5 have 10 images, class 6 one image, class 7 three; shuffled so that index order says nothing
_rng = np.random.default_rng(7)
LABELS = _rng.permutation([c for c in range(6) for _ in range(10)] + [6] + [7] * 3).tolist()
SIZES = Counter(LABELS)


def _batches(n, batch_size=12, m=4, seed=0):
    return list(itertools.islice(iter(MPerClassSampler(LABELS, batch_size, m, seed=seed)), n))


def test_every_batch_is_b_over_m_classes_of_m_images():
    for batch in _batches(2000):
        assert len(batch) == 12
        per_class = Counter(LABELS[i] for i in batch)
        assert len(per_class) == 3 and set(per_class.values()) == {4}
        for c in per_class:
            drawn = [i for i in batch if LABELS[i] == c]
            if SIZES[c] >= 4:
                assert len(set(drawn)) == 4  # without replacement
            else:
                assert len(set(drawn)) <= SIZES[c]  # a small class repeats images, no other class fills in


def test_classes_are_uniform_and_small_classes_draw_with_replacement():
    batches = _batches(4000)
    n = len(batches)
    presence = Counter(c for b in batches for c in {LABELS[i] for i in b})
    p = 3 / 8  # B/m = 3 of the 8 classes per batch, whatever their size
    sigma = (n * p * (1 - p)) ** 0.5
    assert all(abs(presence[c] - n * p) < 5 * sigma for c in range(8))
    # class 7 (3 images, m = 4): 4 i.i.d. uniform draws give 1 / 2 / 3 distinct images w.p. 3/81, 42/81, 36/81
    distinct = Counter(len({i for i in b if LABELS[i] == 7}) for b in batches if any(LABELS[i] == 7 for i in b))
    total = sum(distinct.values())
    for k, prob in ((1, 3 / 81), (2, 42 / 81), (3, 36 / 81)):
        assert abs(distinct[k] - total * prob) < 5 * (total * prob * (1 - prob)) ** 0.5
    draws = Counter(i for b in batches for i in b if LABELS[i] == 7)
    assert max(draws.values()) / min(draws.values()) < 1.2  # each of its images equally often


def test_pass_length_is_pmls_and_passes_are_reseeded():
    assert len(MPerClassSampler(LABELS, 64 // 8, 2)) == (100_000 - 100_000 % 8) // 8
    labels = [c for c in range(40) for _ in range(3)]
    assert len(MPerClassSampler(labels, 64, 2)) == 1562  # the original's SOP/In-shop setting: 99,968 indices
    a, b = MPerClassSampler(LABELS, 12, 4, seed=3), MPerClassSampler(LABELS, 12, 4, seed=3)
    assert list(itertools.islice(iter(a), 5)) == list(itertools.islice(iter(b), 5))
    b.set_epoch(1)
    assert list(itertools.islice(iter(a), 5)) != list(itertools.islice(iter(b), 5))


def test_resumed_stream_sees_the_same_batches():
    def stream(start):
        sampler = MPerClassSampler(LABELS, 12, 4, seed=5, length_before_new_iter=36)  # 3 batches per pass
        return [b for _, b in zip(range(7 - start), StepStream(sampler, seed=5, start_step=start))]

    full = stream(0)
    assert stream(4) == full[4:]


@pytest.mark.parametrize("batch_size, m, error", [(12, 5, "must divide"), (40, 4, "must be >= the batch size")])
def test_impossible_settings_are_one_line_errors(batch_size, m, error):
    with pytest.raises(UserError, match=error):
        train_loader(_Fake(), batch_size, m, seed=0, start_step=0, num_workers=0, pin_memory=False)


class _Fake(torch.utils.data.Dataset):
    labels = LABELS

    def __len__(self):
        return len(LABELS)

    def __getitem__(self, i):
        return torch.zeros(1), LABELS[i]


def test_training_loader_batches():
    loader = iter(train_loader(_Fake(), 12, 4, seed=0, start_step=0, num_workers=0, pin_memory=False))
    for _ in range(20):
        _, labels, indices = next(loader)
        assert labels.tolist() == [LABELS[i] for i in indices.tolist()]
        assert sorted(Counter(labels.tolist()).values()) == [4, 4, 4]
