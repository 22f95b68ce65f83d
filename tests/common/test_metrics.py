"""common.metrics against an independent brute force (full stable sort in Python), plus hand-computed examples.

Features are dyadic rationals (multiples of 1/8, small d) so every dot product is exact in float32 whatever the
BLAS summation order: the brute force and the chunked implementation see bit-identical scores.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import metrics
from common.metrics import _chunk_rows, _new_scratch, exact_topk, map_at_r, r_precision, recall_at_k, retrieval_metrics

REPO = Path(__file__).resolve().parents[2]
RANKS = [1, 2, 4, 8]


# ---- independent brute force ----------------------------------------------------------------------------------
def brute_force(q, ql, ranks, g=None, gl=None):
    """Recall@K, MAP@R, R-precision from a full stable sort per query (float64 scores, Python loops)."""
    self_excluded = g is None
    q = np.asarray(q, dtype=np.float64)
    g = q if self_excluded else np.asarray(g, dtype=np.float64)
    ql = np.asarray(ql)
    gl = ql if self_excluded else np.asarray(gl)
    hits, aps, rps = np.zeros(len(ranks)), [], []
    for i in range(len(q)):
        s = g @ q[i]
        cands = [j for j in range(len(g)) if not (self_excluded and j == i)]
        order = sorted(cands, key=lambda j: (-s[j], j))
        rel = [gl[j] == ql[i] for j in order]
        for a, k in enumerate(ranks):
            hits[a] += any(rel[:k])
        r = sum(rel)
        if r:
            precs = [sum(rel[: n + 1]) / (n + 1) for n in range(r) if rel[n]]
            aps.append(sum(precs) / r)
            rps.append(sum(rel[:r]) / r)
    mean = (lambda xs: sum(xs) / len(xs)) if aps else (lambda xs: 0.0)
    return list(hits / len(q)), mean(aps), mean(rps)


def make_data(kind, n=60, d=8, num_classes=9, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.integers(-8, 9, size=(n, d)) / 8.0
    elif kind == "ties":  # 3-value features in 3 dims: only a handful of distinct scores
        x = rng.integers(-1, 2, size=(n, 3)).astype(np.float64)
    elif kind == "duplicates":
        x = rng.integers(-8, 9, size=(n, d)) / 8.0
        x[n // 2 :] = x[: n - n // 2]  # second half repeats the first half
    labels = rng.integers(0, num_classes, size=n)
    if kind == "duplicates":
        labels[n // 2 :] = labels[: n - n // 2]
    return torch.tensor(x, dtype=torch.float32), labels


def check_all(q, ql, g=None, gl=None, ranks=RANKS, **kw):
    want_recall, want_map, want_rp = brute_force(q, ql, ranks, g, gl)
    assert recall_at_k(q, ql, ranks, g, gl, **kw) == want_recall  # exact: same integer hit counts
    assert map_at_r(q, ql, None, g, gl, **kw) == pytest.approx(want_map, rel=1e-12, abs=1e-12)
    assert r_precision(q, ql, None, g, gl, **kw) == pytest.approx(want_rp, rel=1e-12, abs=1e-12)
    both = retrieval_metrics(q, ql, ranks, g, gl, **kw)
    assert [both[f"recall@{k}"] for k in ranks] == want_recall
    assert both["map@r"] == pytest.approx(want_map, rel=1e-12, abs=1e-12)
    assert both["r_precision"] == pytest.approx(want_rp, rel=1e-12, abs=1e-12)


# ---- against brute force --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "ties", "duplicates"])
@pytest.mark.parametrize("seed", [0, 1])
def test_self_excluded_matches_brute_force(kind, seed):
    check_all(*make_data(kind, seed=seed))


@pytest.mark.parametrize("kind", ["random", "ties", "duplicates"])
def test_query_gallery_matches_brute_force(kind):
    q, ql = make_data(kind, n=25, seed=3)
    g, gl = make_data(kind, n=70, seed=4)
    check_all(q, ql, g, gl, ranks=[1, 5, 70])


def test_continuous_features_match_brute_force():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(80, 16), dim=1)
    labels = torch.randint(0, 10, (80,))
    check_all(x, labels)


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("chunk", [dict(chunk_size=1), dict(chunk_size=7), dict(memory_budget=1)])
def test_tiny_chunks_identical(kind, chunk):
    x, labels = make_data(kind, n=50, seed=5)
    assert recall_at_k(x, labels, RANKS, **chunk) == recall_at_k(x, labels, RANKS)
    many, one = retrieval_metrics(x, labels, RANKS, **chunk), retrieval_metrics(x, labels, RANKS)
    assert many == pytest.approx(one, rel=1e-12)
    check_all(x, labels, **chunk)


@pytest.mark.parametrize("block_bytes", [1, 4 * 50 * 3])  # counting blocks of 1 and 3 rows
@pytest.mark.parametrize("numpy_path", [True, False])
def test_small_counting_blocks_identical(monkeypatch, block_bytes, numpy_path):
    monkeypatch.setattr(metrics, "_CPU_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(metrics, "CPU_NUMPY", numpy_path)
    x, labels = make_data("ties", n=50, seed=7)
    check_all(x, labels, chunk_size=8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])  # float16 takes the torch path on CPU too
def test_other_dtypes_match_brute_force(dtype):
    x, labels = make_data("random", n=40, seed=9)  # dyadic scores are exact in float16 as well
    check_all(x.to(dtype), labels, chunk_size=9)


def test_popcount_fallback_for_old_numpy(monkeypatch):
    monkeypatch.setattr(metrics, "_popcount", None)
    check_all(*make_data("ties", n=40, seed=10))


def test_torch_mm_path_matches_brute_force(monkeypatch):
    monkeypatch.setattr(metrics, "CPU_NUMPY", False)  # torch ops only: the path CUDA and half precision take
    check_all(*make_data("duplicates", seed=8), chunk_size=16)


@pytest.mark.parametrize("convert", [list, np.asarray, torch.as_tensor, lambda a: a.astype(np.int32)])
def test_label_containers(convert):
    x, labels = make_data("random", n=30, seed=6)
    want = recall_at_k(x, torch.as_tensor(labels), RANKS)
    assert recall_at_k(x, convert(labels), RANKS) == want
    assert recall_at_k(x, convert(labels), RANKS, x, convert(labels)) == recall_at_k(x, labels, RANKS, x, labels)


# ---- hand-computed examples -----------------------------------------------------------------------------------
def test_hand_computed_query_gallery():
    # every query is [1, 0]; gallery scores 0.9 > 0.8 > 0.7 > 0.6 > 0.5 with labels A B A B A (A=0, B=1)
    g = torch.tensor([[0.9, 0], [0.8, 0], [0.7, 0], [0.6, 0], [0.5, 0]])
    gl = [0, 1, 0, 1, 0]
    q, ql = torch.tensor([[1.0, 0]] * 3), [0, 1, 2]  # label 2 has no positive
    assert recall_at_k(q, ql, [1, 2, 5], g, gl) == [1 / 3, 2 / 3, 2 / 3]
    # A: R=3, top-3 A B A -> AP = (1 + 2/3)/3 = 5/9, R-prec 2/3.  B: R=2, top-2 A B -> AP = (1/2)/2, R-prec 1/2.
    assert map_at_r(q, ql, None, g, gl) == pytest.approx((5 / 9 + 1 / 4) / 2)
    assert r_precision(q, ql, None, g, gl) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_ties_broken_by_gallery_index():
    g = torch.ones(4, 2)  # all scores equal -> order is 0, 1, 2, 3
    q = torch.ones(1, 2)
    assert recall_at_k(q, [7], [1, 2, 3, 4], g, [0, 0, 7, 7]) == [0.0, 0.0, 1.0, 1.0]
    assert map_at_r(q, [7], None, g, [0, 0, 7, 7]) == 0.0  # top-2 = items 0, 1: no positive
    assert r_precision(q, [7], None, g, [7, 0, 7, 0]) == 0.5


def test_exact_duplicate_counts_at_rank_one():
    # rows 0 and 1 are the same image (label 0); self is removed by index, so each finds the other first
    x = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    labels = [0, 0, 1, 1]
    assert recall_at_k(x, labels, [1]) == [0.5]  # queries 0 and 1 hit; 2 and 3 only see score-0 items first
    assert map_at_r(x, labels) == pytest.approx((1 + 1 + 0 + 0) / 4)


def test_query_without_positive():
    x = torch.tensor([[1.0, 0], [0.5, 0], [0, 1]])
    labels = [0, 0, 1]  # query 2 is alone in its class
    assert recall_at_k(x, labels, [1, 2]) == [2 / 3, 2 / 3]
    assert map_at_r(x, labels) == 1.0  # query 2 skipped
    assert r_precision(x, labels) == 1.0
    assert map_at_r(x, [0, 1, 2]) == 0.0  # nobody has a positive


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
    with pytest.raises(ValueError):
        exact_topk(torch.zeros(2, 3), 4)


# ---- validation and memory bound -------------------------------------------------------------------------------
def test_rank_larger_than_gallery_raises():
    x, labels = make_data("random", n=10)
    assert len(recall_at_k(x, labels, [9])) == 1  # self-excluded: 9 others available
    with pytest.raises(ValueError, match="rank 10 exceeds"):
        recall_at_k(x, labels, [1, 10])
    assert len(recall_at_k(x[:3], labels[:3], [10], x, labels)) == 1
    with pytest.raises(ValueError, match="rank 11 exceeds"):
        retrieval_metrics(x[:3], labels[:3], [11], x, labels)


@pytest.mark.parametrize("ranks", [[], [0], [-1], [1.5], [True]])
def test_bad_ranks_raise(ranks):
    x, labels = make_data("random", n=10)
    with pytest.raises(ValueError):
        recall_at_k(x, labels, ranks)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: recall_at_k(x, y[:-1], [1]),
        lambda x, y: recall_at_k(x, y, [1], x[:5], y),
        lambda x, y: recall_at_k(x, y, [1], x, None),
        lambda x, y: map_at_r(x, y, None, x[:, :3], y),
        lambda x, y: r_precision(x, np.zeros((10, 2), dtype=int)),
    ],
)
def test_bad_lengths_raise(call):
    x, labels = make_data("random", n=10)
    with pytest.raises(ValueError):
        call(x, labels)


def test_chunk_rows_respect_budget():
    x = torch.zeros(10_000, 4)
    per_row = 1000 * 4 + 12 * 96  # float32 scores + positive lists; CPU counting buffer is one fixed small block
    scratch = _new_scratch(10_000, x[:1000]).nbytes
    assert scratch <= 2**20
    assert _chunk_rows(x, x[:1000], 12, None, scratch + 50 * per_row) == 50
    assert _chunk_rows(x, x[:1000], 12, None, 1) == 1
    assert _chunk_rows(x, x[:1000], 12, 20_000, 1) == 10_000


def test_sop_scale_chunk_fits_budget():
    # 60,502 x 512 float32 (SOP): every rows x N temporary plus the scratch block stays within the 512 MiB default
    q = torch.empty(60_502, 512)
    rows = _chunk_rows(q, q, 12, None, 512 * 2**20)
    assert rows > 1000
    assert rows * (60_502 * 4 + 12 * 96) + _new_scratch(rows, q).nbytes <= 512 * 2**20


# ---- benchmark smoke test ------------------------------------------------------------------------------------
def test_recall_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("recall_benchmark", REPO / "benchmarks" / "recall_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["recall_benchmark"] = bench
    spec.loader.exec_module(bench)
    args = bench.get_args_parser().parse_args(
        [
            "--num_queries",
            "500",
            "--dim",
            "16",
            "--num_classes",
            "100",
            "--ranks",
            "1,10",
            "--in-process",
            "--output",
            str(tmp_path / "out.csv"),
        ]
    )
    rows = {r["method"]: r for r in bench.main(args)}
    assert (tmp_path / "out.csv").exists()
    assert {"ours", "ours_fp32", "full", "gemm_fp32", "gemm_bf16"} <= set(rows)
    assert all(r["identical"] for m, r in rows.items() if r["status"] == "ok" and not m.startswith("gemm"))
    assert rows["ours"]["recall@10"] == brute_force(*bench.make_data(500, 16, 100, 0, 2.3), [1, 10])[0][1]


# ---- bf16 candidate pass: error bound, order keys, near ties -------------------------------------------------
needs_bf16 = pytest.mark.skipif(not metrics._native_bf16(), reason="CPU without bf16 arithmetic: fp32 path only")
BF16, FP32 = metrics._BF16, metrics._FP32


def all_keys(prec):
    """Every non-NaN key of a precision with its float64 value (bf16: all 65,536 bit patterns)."""
    info = np.iinfo(prec.raw)
    keys = np.arange(info.min, info.max + 1, dtype=np.int64).astype(prec.raw)
    vals = metrics._key_value(keys, prec)
    ok = ~np.isnan(vals)
    return keys[ok], vals[ok]


def test_order_key_sorts_like_the_values():
    keys, vals = all_keys(BF16)
    assert np.all(np.diff(vals[np.argsort(keys, kind="stable")]) >= 0)
    raw = np.random.default_rng(0).integers(-(2**15), 2**15, 1000).astype(np.int16)
    assert np.array_equal(metrics._order_key(metrics._order_key(raw)), raw)  # its own inverse


@pytest.mark.parametrize("prec", [BF16, FP32])
@pytest.mark.parametrize("strict", [False, True])
def test_keys_at_least_is_the_smallest_passing_key(prec, strict):
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.standard_normal(300) * 10.0 ** rng.integers(-40, 38, 300),
            [0.0, -0.0, 1e-45, -1e-45, 2**-133, -(2**-133), 1.0, -1.0, 0.5 + 2**-9, 3e38, -3e38, np.inf, -np.inf],
        ]
    )
    got = metrics._keys_at_least(x, prec, strict)
    if prec is BF16:  # brute force over every bf16 value
        keys, vals = all_keys(prec)
        for xi, k in zip(x, got):
            ok = keys[(vals > xi) if strict else (vals >= xi)]
            assert k == (ok.min() if ok.size else np.iinfo(np.int16).max)
    else:  # float32: the key found passes, the one below does not
        v = metrics._key_value(got, prec)
        below = metrics._key_value(np.maximum(got.astype(np.int64) - 1, np.iinfo(np.int32).min).astype(np.int32), prec)
        finite = np.abs(x) < 3.4e38
        assert np.all(((v > x) if strict else (v >= x))[finite])
        assert not np.any(((below > x) if strict else (below >= x))[finite & (got > -(2**31) + 1)])


def exact_scores(q, g, euclid=False):
    q64, g64 = q.double(), g.double()
    return -0.5 * torch.cdist(q64, g64).square() if euclid else q64 @ g64.T


@needs_bf16
@pytest.mark.parametrize("euclid", [False, True])
@pytest.mark.parametrize("scale,dim", [(1.0, 64), (1e-3, 8), (300.0, 512), (1.0, 1000)])
def test_bf16_error_bound_holds_for_every_pair(euclid, scale, dim):
    # The bound the exactness rests on: every rounded score lies inside the window computed around its exact score
    # (items outside a query's window around s_p are thus certainly better / worse than s_p).
    gen = torch.Generator().manual_seed(dim)
    g = torch.randn(300, dim, generator=gen) * scale
    q = torch.cat([torch.randn(40, dim, generator=gen) * scale, g[:10]])  # includes queries equal to items
    side = ("query", "gallery") if euclid else (None, None)
    qr, gr = metrics._round(q, BF16, side[0]), metrics._round(g, BF16, side[1])
    t = torch.empty(len(g), len(q), dtype=torch.bfloat16)
    metrics._gemm(gr.half, qr.half, t)
    t = t.T.double().numpy()
    s = exact_scores(q, g, euclid).numpy()
    if euclid:  # the pass ranks by q.g - |g|^2/2 = -|q - g|^2/2 + |q|^2/2
        s = s + (q.double().square().sum(1, keepdim=True) / 2).numpy()
    bounds = metrics._chunk_bounds(qr, gr, BF16, euclid)
    lo, hi = metrics._Bounds(bounds.e[:, None], bounds.c, bounds.scale[:, None]).window(s)
    assert np.all((lo <= t) & (t <= hi))
    err = np.abs(t - s).max(1)
    assert np.all(err <= bounds.e + 2 * bounds.c * np.abs(s).max(1) + 1e-30)
    assert err.max() > 0  # the pass really is rounded


def near_tie_data(seed, n=320, d=32, classes=40):
    """Clusters whose members differ from shared vectors by 1e-3 .. 1e-7 (far below the bf16 error) or not at all."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(n // 8, d, dtype=torch.float64, generator=gen), dim=1)
    x = base.repeat_interleave(8, 0)
    eps = 10.0 ** -torch.randint(3, 8, (n, 1), generator=gen).double()
    exact_copy = torch.rand(n, 1, generator=gen) < 0.3
    x = torch.where(exact_copy, x, x + eps * torch.randn(n, d, dtype=torch.float64, generator=gen))
    labels = torch.randint(0, classes, (n,), generator=gen)
    return x[torch.randperm(n, generator=gen)], labels


@needs_bf16
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bf16_recall_near_ties_matches_float64_brute_force(seed, dtype):
    x, labels = near_tie_data(seed)
    x = x.to(dtype)
    ranks = [1, 2, 3, 5, 8, 13, 50]
    want, _, _ = brute_force(x, labels, ranks)
    assert recall_at_k(x, labels, ranks) == want
    assert recall_at_k(x, labels, ranks, chunk_size=7) == want
    q, ql = x[:90], labels[:90]
    want_qg, _, _ = brute_force(q, ql, ranks, x[90:], labels[90:])
    assert recall_at_k(q, ql, ranks, x[90:], labels[90:]) == want_qg


@needs_bf16
def test_bf16_recall_with_negative_scores():
    # best positives score below zero: thresholds cross zero, where bf16 bits no longer sort like the values
    gen = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(120, 6, generator=gen), dim=1)
    labels = torch.arange(120) % 30
    x[labels == 1] = -x[labels == 1][0]  # some exact ties among negatives too
    want, _, _ = brute_force(x, labels, RANKS)
    assert recall_at_k(x, labels, RANKS) == want
    assert recall_at_k(-x, labels, RANKS) == brute_force(-x, labels, RANKS)[0]


@needs_bf16
def test_bf16_recall_equals_fp32_path_and_uses_threads(monkeypatch):
    x, labels = make_data("ties", n=200, seed=11)
    fast = recall_at_k(x, labels, RANKS, chunk_size=64)
    monkeypatch.setattr(metrics, "_workers", lambda: 3)  # rows split over worker threads
    assert recall_at_k(x, labels, RANKS, chunk_size=64) == fast
    monkeypatch.setattr(metrics, "BF16", False)
    assert recall_at_k(x, labels, RANKS, chunk_size=64) == fast == brute_force(x, labels, RANKS)[0]


@needs_bf16
@pytest.mark.parametrize("kind", ["ties", "duplicates", "near", "collapsed"])
def test_bf16_recall_wide_windows_ranked_from_float64_rows(monkeypatch, kind):
    # windows too wide to re-check item by item (massive ties) are ranked from whole float64 score rows
    if kind == "near":
        x, labels = near_tie_data(5, n=160)
    elif kind == "collapsed":  # features collapsed to a point, plus a few distinct ones
        x, labels = torch.ones(80, 4), np.arange(80) % 7
        x[::9] = torch.randn(9, 4, generator=torch.Generator().manual_seed(6))
    else:
        x, labels = make_data(kind, n=120, seed=15)
    want = brute_force(x, labels, RANKS)[0]
    assert recall_at_k(x, labels, RANKS) == want
    monkeypatch.setattr(metrics, "_wide_limit", lambda n: 0)
    assert recall_at_k(x, labels, RANKS, chunk_size=16) == want
    assert recall_at_k(x[:30], labels[:30], RANKS, x, labels) == brute_force(x[:30], labels[:30], RANKS, x, labels)[0]


def test_non_finite_features_take_the_fp32_path():
    x, labels = make_data("random", n=40, seed=12)
    x[3, 0] = float("nan")
    assert not metrics._bf16_ready(x, x)
    assert len(recall_at_k(x, labels, [1])) == 1


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
def test_search_topk_matches_float64_brute_force(monkeypatch, metric, kind, bf16):
    monkeypatch.setattr(metrics, "BF16", bf16)
    monkeypatch.setattr(metrics, "_FEW_QUERIES", 0)  # the pass of large query sets even for these few
    if kind == "near":
        g, _ = near_tie_data(4, n=240)
        q = g[::7] + 1e-6
    else:
        g, _ = make_data(kind, n=240, seed=13)
        q, _ = make_data(kind, n=30, seed=14)
        q = q if kind != "ties" else q[:, :3]
    for k in (1, 5, 240):
        s, i = metrics.search_topk(q, g, k, metric, chunk_size=8, memory_budget=2**14)  # many gallery blocks
        want_s, want_i = brute_topk(q, g, k, metric)
        assert np.array_equal(i.numpy(), want_i)
        assert np.allclose(s.numpy(), want_s, rtol=1e-6, atol=1e-6)
    prepared = metrics.prepare_gallery(g, metric)
    assert prepared.precision is (metrics._BF16 if bf16 and metrics._native_bf16() else metrics._FP32)
    assert torch.equal(metrics.search_topk(q, prepared, 5)[1], metrics.search_topk(q, g, 5, metric)[1])
    monkeypatch.setattr(metrics, "_FEW_QUERIES", 10**6)  # an unprepared gallery and few queries: fp32 pass
    assert torch.equal(metrics.search_topk(q, g, 5, metric)[1], torch.from_numpy(brute_topk(q, g, 5, metric)[1]))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_search_topk_prunes_massive_ties_exactly(monkeypatch, metric):
    g = torch.ones(300, 4)  # everything tied, plus a few distinct items
    g[::13] = torch.randn(24, 4, generator=torch.Generator().manual_seed(8))
    q = torch.cat([g[:2], torch.randn(4, 4, generator=torch.Generator().manual_seed(9))])
    monkeypatch.setattr(metrics, "_POOL_PAIRS", -(10**9))  # prune after every gallery block
    s, i = metrics.search_topk(q, g, 7, metric, chunk_size=4, memory_budget=2**10)
    want_s, want_i = brute_topk(q, g, 7, metric)
    assert np.array_equal(i.numpy(), want_i)
    assert np.allclose(s.numpy(), want_s, atol=1e-6)


def test_search_topk_validation():
    g = torch.randn(20, 4)
    assert metrics.search_topk(g[:3], g, 0)[1].shape == (3, 0)
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError):
            metrics.search_topk(g[:3], g, bad)
    with pytest.raises(ValueError):
        metrics.search_topk(g[:3, :2], g, 1)
    with pytest.raises(ValueError):
        metrics.search_topk(g[:3], g, 1, "manhattan")
    with pytest.raises(ValueError):
        metrics.search_topk(g[:3], metrics.prepare_gallery(g, "cosine"), 1, "euclidean")
    g[0, 0] = float("inf")
    with pytest.raises(ValueError):
        metrics.search_topk(g[1:3], g, 1)
