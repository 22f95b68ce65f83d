from collections import Counter

import pytest

from common.samplers import MPerClassSampler


def test_batches_hold_m_per_class():
    labels = [c for c in range(20) for _ in range(6)]
    sampler = MPerClassSampler(labels, batch_size=16, m=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 16
    for batch in batches:
        assert len(batch) == 16 and len(set(batch)) == 16
        counts = Counter(labels[i] for i in batch)
        assert sorted(counts.values()) == [4, 4, 4, 4]


def test_small_classes_contribute_what_they_have():
    labels = [0, 1, 1, 2, 2, 2] + [3] * 10
    sampler = MPerClassSampler(labels, batch_size=8, m=4, seed=0, num_batches=50)
    for batch in sampler:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == 8 and len(set(batch)) == 8
        assert counts.get(0, 0) <= 1 and counts.get(1, 0) <= 2 and counts.get(2, 0) <= 3
        assert all(v <= 4 for v in counts.values())


def test_seeded_per_epoch():
    labels = [c for c in range(10) for _ in range(5)]
    a, b = MPerClassSampler(labels, 8, 2, seed=3), MPerClassSampler(labels, 8, 2, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)


def test_impossible_batch_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size 8 needs more than 2 classes x m=2 images"):
        MPerClassSampler([0, 0, 1, 1], batch_size=8, m=2)
