"""The batch samplers of ``common.samplers``; the merged ones against independent re-statements of the classes they
replace, batch for batch."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from common.samplers import (
    ExactMPerClassSampler,
    MPerClassSampler,
    RandomBatchSampler,
    RankBatchSampler,
    StepStream,
    StreamBatchSampler,
    sample_seed,
)


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


# ---- ExactMPerClassSampler (IRT --m): pytorch-metric-learning's MPerClassSampler semantics, batch by batch:
# exactly B/m distinct classes, m images each, classes drawn uniformly, small classes drawn with replacement.
# classes 0-5 have 10 images, class 6 one image, class 7 three; shuffled so that index order says nothing
_rng = np.random.default_rng(7)
LABELS = _rng.permutation([c for c in range(6) for _ in range(10)] + [6] + [7] * 3).tolist()
SIZES = Counter(LABELS)


def _batches(n, batch_size=12, m=4, seed=0):
    return list(itertools.islice(iter(ExactMPerClassSampler(LABELS, batch_size, m, seed=seed)), n))


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
    assert len(ExactMPerClassSampler(LABELS, 64 // 8, 2)) == (100_000 - 100_000 % 8) // 8
    labels = [c for c in range(40) for _ in range(3)]
    assert len(ExactMPerClassSampler(labels, 64, 2)) == 1562  # the original's SOP/In-shop setting: 99,968 indices
    a, b = ExactMPerClassSampler(LABELS, 12, 4, seed=3), ExactMPerClassSampler(LABELS, 12, 4, seed=3)
    assert list(itertools.islice(iter(a), 5)) == list(itertools.islice(iter(b), 5))
    b.set_epoch(1)
    assert list(itertools.islice(iter(a), 5)) != list(itertools.islice(iter(b), 5))


@pytest.mark.parametrize(
    "batch_size, m, length, error",
    [
        (12, 5, 100_000, r"m=5 must divide the batch size 12"),
        (40, 4, 100_000, r"m \* \(number of classes\) = 4 \* 8 must be >= the batch size 40"),
        (12, 4, 8, r"length_before_new_iter 8 < batch size 12"),
    ],
)
def test_exact_sampler_rejects_impossible_settings(batch_size, m, length, error):
    with pytest.raises(ValueError, match=error):
        ExactMPerClassSampler(LABELS, batch_size, m, length_before_new_iter=length)


def test_resumed_stream_sees_the_same_batches():
    def stream(start):
        sampler = ExactMPerClassSampler(LABELS, 12, 4, seed=5, length_before_new_iter=36)  # 3 batches per pass
        return [b for _, b in zip(range(7 - start), StepStream(sampler, seed=5, start_step=start))]

    full = stream(0)
    assert stream(4) == full[4:]


# ---- RandomBatchSampler (REIR / SREML, IRT --m 0) and StepStream


def test_step_stream_resumes_mid_pass():
    full = StepStream(RandomBatchSampler(10, 4, seed=3), seed=3)
    batches = [b for _, b in zip(range(8), full)]  # 3 batches per pass: crosses two pass boundaries
    assert sorted(i for b in batches[:3] for i, _ in b) == list(range(10))
    assert batches[:3] != batches[3:6]  # each pass is re-shuffled
    resumed = [b for _, b in zip(range(4), StepStream(RandomBatchSampler(10, 4, seed=3), seed=3, start_step=4))]
    assert resumed == batches[4:8]


def test_step_stream_seeds_are_the_global_positions():
    stream = iter(StepStream(RandomBatchSampler(10, 4, seed=2), seed=2, start_step=5))
    batch = next(stream)
    assert [s for _, s in batch] == [((2 * 1_000_003 + 5) * 4096 + p) % 2**62 for p in range(len(batch))]
    assert sample_seed(2, 5, 1) == batch[1][1]


def test_shuffled_batches_are_the_original_loaders_batches():
    """Seeded per epoch, every sample once, the last batch partial (DataLoader(shuffle=True) without drop_last)."""
    sampler = RandomBatchSampler(23, 5, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert [len(b) for b in first] == [5, 5, 5, 5, 3] and len(sampler) == 5
    assert sorted(i for b in first for i in b) == list(range(23))
    assert list(sampler) == first  # same epoch, same batches (what every process relies on)
    sampler.set_epoch(2)
    assert list(sampler) != first


def _reir_shuffled_batches(n, batch_size, seed, epoch):
    """REIR's former sampler, restated: one seeded permutation per epoch split into chunks of ``batch_size``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [chunk.tolist() for chunk in perm.split(batch_size)]


def _irt_random_batches(n, batch_size, seed, epoch):
    """IRT's former sampler, restated: the same seeded permutation as a list, cut every ``batch_size`` positions."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@pytest.mark.parametrize("n, batch_size, seed", [(23, 5, 3), (64, 8, 0), (7, 10, 11), (100, 32, 1)])
def test_random_batches_are_both_former_samplers_batches(n, batch_size, seed):
    sampler = RandomBatchSampler(n, batch_size, seed)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert batches == _reir_shuffled_batches(n, batch_size, seed, epoch)
        assert batches == _irt_random_batches(n, batch_size, seed, epoch)
        assert len(sampler) == len(batches) == math.ceil(n / batch_size)


# ---- StreamBatchSampler (FastRetri) and RankBatchSampler


def _counting_stream():
    return itertools.count()


def test_stream_epochs_continue_the_stream_and_resume_exactly():
    sampler = StreamBatchSampler(_counting_stream, global_batch=6, iters_per_epoch=2)
    assert list(sampler) == [list(range(0, 6)), list(range(6, 12))]
    sampler.set_epoch(2)
    assert list(sampler) == [list(range(12, 18)), list(range(18, 24))]
    resumed = StreamBatchSampler(_counting_stream, global_batch=6, iters_per_epoch=2)
    resumed.set_epoch(3)
    assert list(resumed) == [list(range(24, 30)), list(range(30, 36))]
    assert len(resumed) == 2


def test_stream_rank_shares_interleaved_or_contiguous():
    inter = [StreamBatchSampler(_counting_stream, 6, 1, rank=r, world_size=2) for r in range(2)]
    assert [next(iter(s)) for s in inter] == [[0, 2, 4], [1, 3, 5]]
    blocks = [StreamBatchSampler(_counting_stream, 6, 1, rank=r, world_size=2, interleave=False) for r in range(2)]
    assert [next(iter(s)) for s in blocks] == [[0, 1, 2], [3, 4, 5]]


def test_rank_slices_make_the_global_batch_with_classes_intact():
    labels = [c for c in range(6) for _ in range(4)]
    base = MPerClassSampler(labels, batch_size=12, m=2, seed=4, num_batches=5)
    shards = [list(RankBatchSampler(base, r, 3, labels)) for r in range(3)]
    for step, batch in enumerate(base):
        parts = [shards[r][step] for r in range(3)]
        assert sorted(i for p in parts for i in p) == sorted(batch)
        assert all(len(p) == 4 for p in parts)
        owner = {labels[i]: r for r, p in enumerate(parts) for i in p}
        assert all(owner[labels[i]] == r for r, p in enumerate(parts) for i in p)  # one class on one rank
