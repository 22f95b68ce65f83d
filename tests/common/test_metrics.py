"""common.metrics against an independent brute force (full stable sort in Python), plus hand-computed examples;
every ``accelerate`` route (bf16 pass, numpy, torch ops only) gives the brute force's results.

Features are dyadic rationals (multiples of 1/8, small d) so every dot product is exact in float32 whatever the
BLAS summation order: the brute force and the chunked implementation see bit-identical scores.
"""

import numpy as np
import pytest
import torch

from common import _bf16, metrics
from common.metrics import (
    _chunk_rows,
    _new_scratch,
    map_at_r,
    metrics_from_ranking,
    r_precision,
    recall_at_k,
    required_topk,
    retrieval_metrics,
)

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
@pytest.mark.parametrize("accelerate", ["numpy", "off"])  # numpy or torch counting blocks
def test_small_counting_blocks_identical(monkeypatch, block_bytes, accelerate):
    monkeypatch.setattr(metrics, "_CPU_BLOCK_BYTES", block_bytes)
    x, labels = make_data("ties", n=50, seed=7)
    check_all(x, labels, chunk_size=8, accelerate=accelerate)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])  # float16 takes the torch path on CPU too
def test_other_dtypes_match_brute_force(dtype):
    x, labels = make_data("random", n=40, seed=9)  # dyadic scores are exact in float16 as well
    check_all(x.to(dtype), labels, chunk_size=9)


def test_popcount_fallback_for_old_numpy(monkeypatch):
    monkeypatch.setattr(metrics, "_popcount", None)
    check_all(*make_data("ties", n=40, seed=10))


def test_torch_mm_path_matches_brute_force():
    # torch ops only: the path CUDA and half precision take
    check_all(*make_data("duplicates", seed=8), chunk_size=16, accelerate="off")


def test_unknown_accelerate_is_refused():
    x, labels = make_data("random", n=10)
    with pytest.raises(ValueError, match="accelerate"):
        recall_at_k(x, labels, [1], accelerate="gpu")


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


# ---- the definitions on ranked lists ------------------------------------------------------------------------
def test_metrics_from_ranking_needs_enough_items_and_counts_by_hand():
    labels = [0, 0, 1, 1, 1]
    idx = torch.tensor([[1, 2, 3], [2, 0, 3], [0, 3, 4], [4, 2, 0], [0, 1, 2]])
    out = metrics_from_ranking(idx, labels, None, [1, 2])
    assert out["recall@1"] == pytest.approx(2 / 5)  # q0, q3
    assert out["recall@2"] == pytest.approx(4 / 5)  # q0..q3
    # per-query AP@R: q0 R=1 [1 hit] 1; q1 R=1 [2 miss] 0; q2 R=2 [0 miss, 3 hit] 1/4; q3 R=2 [4, 2] 1; q4 [0, 1] 0
    assert out["map@r"] == pytest.approx((1 + 0 + 0.25 + 1 + 0) / 5)
    assert out["r_precision"] == pytest.approx((1 + 0 + 0.5 + 1 + 0) / 5)
    assert required_topk([1], labels) == 2
    with pytest.raises(ValueError, match="rank at least"):
        metrics_from_ranking(idx[:, :1], labels, None, [1])


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
    with pytest.raises(ValueError, match="ranks must be a non-empty list of positive integers"):
        recall_at_k(x, labels, ranks)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: recall_at_k(x, y[:-1], [1]), r"query_labels has shape \(9,\), expected \(10,\)"),
        (lambda x, y: recall_at_k(x, y, [1], x[:5], y), r"gallery_labels has shape \(10,\), expected \(5,\)"),
        (lambda x, y: recall_at_k(x, y, [1], x, None), "must be given together"),
        (lambda x, y: map_at_r(x, y, None, x[:, :3], y), "equal d"),
        (lambda x, y: r_precision(x, np.zeros((10, 2), dtype=int)), r"shape \(10, 2\)"),
    ],
)
def test_bad_lengths_raise(call, message):
    x, labels = make_data("random", n=10)
    with pytest.raises(ValueError, match=message):
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
    from benchmarks import recall_benchmark as bench

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


# ---- bf16 candidate pass: near ties (its numerics: tests/common/test_bf16.py) --------------------------------
needs_bf16 = pytest.mark.skipif(not _bf16.native_bf16(), reason="CPU without bf16 arithmetic: fp32 path only")


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
    assert recall_at_k(x, labels, ranks, accelerate="bf16") == want
    assert recall_at_k(x, labels, ranks, chunk_size=7, accelerate="bf16") == want
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
    monkeypatch.setattr(_bf16, "workers", lambda: 3)  # rows split over worker threads
    assert recall_at_k(x, labels, RANKS, chunk_size=64, accelerate="bf16") == fast
    assert recall_at_k(x, labels, RANKS, chunk_size=64, accelerate="numpy") == fast == brute_force(x, labels, RANKS)[0]


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
    monkeypatch.setattr(_bf16, "_wide_limit", lambda n: 0)
    assert recall_at_k(x, labels, RANKS, chunk_size=16) == want
    assert recall_at_k(x[:30], labels[:30], RANKS, x, labels) == brute_force(x[:30], labels[:30], RANKS, x, labels)[0]


def test_non_finite_features_take_the_fp32_path():
    x, labels = make_data("random", n=40, seed=12)
    x[3, 0] = float("nan")
    assert not _bf16.safe(x, x)
    assert len(recall_at_k(x, labels, [1])) == 1
