"""common.search, the one ranking path: top-k of a score block and the search (exact and through an index)
against stable float64 brute-force sorts written here, with ties, duplicates, exclusion and scaled scores."""

import numpy as np
import pytest
import torch

from common import _bf16
from common import search as search_module
from common.search import exact_topk, prepare_gallery, search
from tests.common.test_metrics import make_data, near_tie_data


# ---- exact_topk ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 3, 9, 20])
@pytest.mark.parametrize("values", [3, 1000])  # few values -> many boundary ties
def test_exact_topk_matches_stable_sort(k, values):
    s = torch.randint(0, values, (12, 20)).float()
    vals, idx = exact_topk(s, k)
    ref = torch.sort(-s, dim=1, stable=True)
    assert torch.equal(idx, ref.indices[:, :k])
    assert torch.equal(vals, -ref.values[:, :k])


def test_exact_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k=4 must be an integer between 0 and the row length 3"):
        exact_topk(torch.zeros(2, 3), 4)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_with_ties_equals_stable_sort(largest):
    s = torch.randint(0, 4, (50, 30)).double()  # many ties, at the boundary too
    s[0] = 1.0  # a row of one value
    for k in (1, 5, 29, 30):
        vals, idx = exact_topk(s, k, largest)
        order = torch.sort(-s if largest else s, dim=1, stable=True).indices[:, :k]
        assert torch.equal(idx, order)
        assert torch.equal(vals, s.gather(1, order))


# ---- exact top-k search --------------------------------------------------------------------------------------
def brute_topk(q, g, k, metric):
    """(scores, indices) from a full stable sort per query on float64 scores."""
    q64, g64 = np.asarray(q, np.float64), np.asarray(g, np.float64)
    out_i, out_s = [], []
    for row in q64:
        s = np.sqrt(((g64 - row) ** 2).sum(1)) if metric == "euclidean" else g64 @ row
        order = sorted(range(len(g64)), key=lambda j: ((s[j] if metric == "euclidean" else -s[j]), j))[:k]
        out_i.append(order)
        out_s.append(s[order])
    return np.array(out_s), np.array(out_i)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["duplicates", "ties", "near"])
@pytest.mark.parametrize("bf16", [True, False])
def test_search_matches_float64_brute_force(metric, kind, bf16):
    mode = "bf16" if bf16 and _bf16.native_bf16() else "off"  # the pass, chosen although the queries are few
    if kind == "near":
        g, _ = near_tie_data(4, n=240)
        q = g[::7] + 1e-6
    else:
        g, _ = make_data(kind, n=240, seed=13)
        q, _ = make_data(kind, n=30, seed=14)
        q = q if kind != "ties" else q[:, :3]
    for k in (1, 5, 240):
        s, i = search(q, g, k, metric, accelerate=mode, chunk_size=8, memory_budget=2**14)  # many gallery blocks
        want_s, want_i = brute_topk(q, g, k, metric)
        assert np.array_equal(i.numpy(), want_i)
        assert np.allclose(s.numpy(), want_s, rtol=1e-6, atol=1e-6)
    prepared = prepare_gallery(g, metric, accelerate=mode)
    assert prepared.precision is (_bf16.BF16_PASS if bf16 and _bf16.native_bf16() else _bf16.FP32_PASS)
    assert torch.equal(search(q, prepared, 5)[1], search(q, g, 5, metric, accelerate=mode)[1])
    assert len(q) <= search_module._FEW_QUERIES  # 'auto', an unprepared gallery and few queries: fp32 pass
    assert torch.equal(search(q, g, 5, metric)[1], torch.from_numpy(brute_topk(q, g, 5, metric)[1]))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_search_prunes_massive_ties_exactly(monkeypatch, metric):
    g = torch.ones(300, 4)  # everything tied, plus a few distinct items
    g[::13] = torch.randn(24, 4, generator=torch.Generator().manual_seed(8))
    q = torch.cat([g[:2], torch.randn(4, 4, generator=torch.Generator().manual_seed(9))])
    monkeypatch.setattr(search_module, "_POOL_PAIRS", -(10**9))  # prune after every gallery block
    s, i = search(q, g, 7, metric, chunk_size=4, memory_budget=2**10)
    want_s, want_i = brute_topk(q, g, 7, metric)
    assert np.array_equal(i.numpy(), want_i)
    assert np.allclose(s.numpy(), want_s, atol=1e-6)


def test_search_validation():
    g = torch.randn(20, 4)
    assert search(g[:3], g, 0)[1].shape == (3, 0)
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer between 0 and the gallery size 20"):
            search(g[:3], g, bad)
    with pytest.raises(ValueError, match="queries have 2 dimensions, the gallery 4"):
        search(g[:3, :2], g, 1)
    with pytest.raises(ValueError, match="metric must be one of"):
        search(g[:3], g, 1, "manhattan")
    with pytest.raises(ValueError, match="prepared for cosine, not euclidean"):
        search(g[:3], prepare_gallery(g, "cosine"), 1, "euclidean")
    g[0, 0] = float("inf")
    with pytest.raises(ValueError, match="gallery features contain NaN, inf"):
        search(g[1:3], g, 1)


def test_search_orders_and_excludes_self():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    s, idx = search(g[:1], g, 2, "cosine", exclude=[0])
    assert idx[0].tolist() == [3, 2] and s[0].tolist() == pytest.approx([1.0, 0.6])
    s, idx = search(g[:1], g, 3, "euclidean")
    assert idx[0].tolist() == [0, 3, 2] and s[0, 0] == 0


def brute_excluding(q, g, k, metric, exclude):
    """brute_topk of each query over the gallery without its excluded index (None: nothing excluded)."""
    out_s, out_i = [], []
    for row, e in zip(q, exclude):
        keep = np.array([j for j in range(len(g)) if j != e])
        s, i = brute_topk(row[None], g[keep], k, metric)
        out_s.append(s[0])
        out_i.append(keep[i[0]])
    return np.array(out_s), np.array(out_i)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["duplicates", "ties"])
def test_exclude_equals_brute_force_without_the_item(metric, kind):
    g, _ = make_data(kind, n=80, seed=16)
    q = g[:12].clone()
    exclude = [0, 1, None, 3, 4, 5, 6, None, 8, 9, 10, 11]  # the query itself, some queries without
    for k in (1, 4, 79):
        s, i = search(q, g, k, metric, exclude=exclude, chunk_size=5)
        want_s, want_i = brute_excluding(q, g, k, metric, exclude)
        assert np.array_equal(i.numpy(), want_i)
        assert np.allclose(s.numpy(), want_s, atol=1e-6)
    s, i = search(q, g, 80, metric, exclude=torch.tensor([0] + [-1] * 11))  # k = N: the excluded row ends short
    assert i[0, -1] == -1 and np.isnan(s[0, -1].item()) and 0 not in i[0].tolist()
    assert (i[1:] >= 0).all() and sorted(i[1].tolist()) == list(range(80))


def test_scores_dtype_scale_and_index_kinds():
    x, _ = near_tie_data(7, n=96)  # float64
    s, i = search(x[:9], x, 6, "cosine")
    want_s, want_i = brute_topk(x[:9], x, 6, "cosine")
    assert s.dtype == torch.float64 and np.array_equal(i.numpy(), want_i)
    np.testing.assert_allclose(s.numpy(), want_s, rtol=0, atol=1e-12)
    plain, ids32 = search(x[:9].float(), x.float(), 6, "cosine")
    scaled, same = search(x[:9].float(), x.float(), 6, "cosine", scale=4.0)
    assert scaled.dtype == torch.float32 and torch.equal(same, ids32) and torch.equal(scaled, plain / 4)
    dist, _ = search(x[:9], x, 6, "euclidean", scale=4.0)  # distances are never scaled
    np.testing.assert_allclose(dist.numpy(), brute_topk(x[:9], x, 6, "euclidean")[0], atol=1e-12)
    from common.ann import build_index

    index = build_index(x, "cosine", "exact")
    s2, i2 = search(x[:9], None, 6, exclude=range(9), index=index)
    want_s, want_i = brute_excluding(x[:9], x, 6, "cosine", range(9))
    assert np.array_equal(i2.numpy(), want_i)
    with pytest.raises(ValueError, match="prepared for cosine"):
        search(x[:9], None, 6, "euclidean", index=index)


def test_search_refuses_bad_exclude_and_accelerate():
    g = torch.randn(20, 4)
    with pytest.raises(ValueError, match="exclude"):
        search(g[:3], g, 2, exclude=[0, 1])
    with pytest.raises(ValueError, match="exclude"):
        search(g[:3], g, 2, exclude=[0, 1, 20])
    with pytest.raises(ValueError, match="accelerate"):
        search(g[:3], g, 2, accelerate="numpy")
    with pytest.raises(ValueError, match="gallery features"):
        search(g[:3], g[0], 2)
    with pytest.raises(ValueError, match="gallery features or an index"):
        search(g[:3], None, 2)
