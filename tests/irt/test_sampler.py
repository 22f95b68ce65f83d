"""IRT's training loader: one-line errors for impossible --m settings, and m-per-class batches (the sampler itself,
``common.samplers.ExactMPerClassSampler``, is tested in tests/common/test_samplers.py)."""

from collections import Counter

import numpy as np
import pytest
import torch

from common.errors import UserError
from irt.data import train_loader

# classes 0-5 have 10 images, class 6 one image, class 7 three; shuffled so that index order says nothing
_rng = np.random.default_rng(7)
LABELS = _rng.permutation([c for c in range(6) for _ in range(10)] + [6] + [7] * 3).tolist()
SIZES = Counter(LABELS)


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
