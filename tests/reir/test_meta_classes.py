"""Meta-class assignment: balance, unique codes for 'fixed', seeding, the collision fallback, save/load."""

import math
import random
from collections import Counter

import pytest
import torch

from common.errors import UserError
from reir.meta_classes import (
    assign_meta_classes,
    balanced_assignment,
    has_conflicts,
    ids_path,
    load_ids,
    meta_class_ids,
    unique_codes,
)


@pytest.mark.parametrize("c,m", [(98, 12), (100, 12), (3997, 192), (7, 7), (13, 2)])
def test_balanced_assignment_sizes(c, m):
    ids = balanced_assignment(c, m, random.Random(0))
    counts = Counter(ids)
    assert len(ids) == c and set(counts) == set(range(m))
    assert set(counts.values()) <= {c // m, math.ceil(c / m)}
    assert sum(v == math.ceil(c / m) for v in counts.values()) == (c % m or m)


def test_cars_example_from_spec():
    counts = sorted(Counter(balanced_assignment(98, 12, random.Random(3))).values())
    assert counts == [8] * 10 + [9] * 2


@pytest.mark.parametrize("label_type", ["fixed", "random"])
def test_seeded_and_shaped(label_type):
    a = assign_meta_classes(20, 6, 4, label_type, seed=1)
    assert a.shape == (6, 20) and a.dtype == torch.long
    assert torch.equal(a, assign_meta_classes(20, 6, 4, label_type, seed=1))
    assert not torch.equal(a, assign_meta_classes(20, 6, 4, label_type, seed=2))
    for row in a:  # every learner balanced
        assert set(Counter(row.tolist()).values()) == {5}


def test_fixed_gives_unique_codes_where_random_collides():
    # C = 8 classes, M = 2, E = 3: the product space has exactly 8 codes, so balanced draws almost always
    # collide and the fallback must hand out the remaining codes.
    for seed in range(5):
        ids = assign_meta_classes(8, 3, 2, "fixed", seed=seed)
        codes = {tuple(c) for c in ids.t().tolist()}
        assert len(codes) == 8 and not has_conflicts(ids)
    assert any(has_conflicts(assign_meta_classes(8, 3, 2, "random", seed=s)) for s in range(5))


def test_fixed_fallback_with_huge_product_space_is_cheap():
    """12^48 codes: the fallback samples codes, it never enumerates the product space."""
    ids = torch.zeros(48, 200, dtype=torch.long)  # classes 12.. all repeat class 0's code
    ids[:, :12] = torch.arange(12)
    fixed = unique_codes(ids, 12, random.Random(0))
    assert not has_conflicts(fixed)
    assert torch.equal(fixed[:, :12], ids[:, :12])  # the first class of each code keeps it


def test_fixed_impossible_and_too_many_meta_classes():
    with pytest.raises(UserError, match="meta_class_size\\^ensemble_size"):
        assign_meta_classes(9, 3, 2, "fixed")
    with pytest.raises(UserError, match="larger than the 5 training classes"):
        assign_meta_classes(5, 3, 6, "random")


def test_save_and_load_ids(tmp_path):
    kwargs = dict(data_name="cub", crop_type="cropped", label_type="fixed", ensemble_size=4, meta_class_size=3)
    ids = meta_class_ids(tmp_path, **kwargs, num_classes=10, seed=0, reuse=False)
    path = ids_path(tmp_path, **kwargs)
    assert path.name == "cub_cropped_fixed_4_3_ids.pth" and path.is_file()
    assert torch.equal(meta_class_ids(tmp_path, **kwargs, num_classes=10, seed=99, reuse=True), ids)
    assert isinstance(torch.load(path, weights_only=True)["ids"], torch.Tensor)
    with pytest.raises(UserError, match="num_classes"):
        load_ids(path, {"num_classes": 11})
    with pytest.raises(UserError, match="not found"):
        meta_class_ids(tmp_path, **{**kwargs, "crop_type": "uncropped"}, num_classes=10, seed=0, reuse=True)
