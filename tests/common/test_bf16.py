"""common._bf16, the rounded candidate pass under the exact metrics and search: its order keys against every bf16
value, and its error bound against float64 scores for every (query, item) pair."""

import numpy as np
import pytest
import torch

from common import _bf16

needs_bf16 = pytest.mark.skipif(not _bf16.native_bf16(), reason="CPU without bf16 arithmetic: fp32 path only")
BF16, FP32 = _bf16.BF16_PASS, _bf16.FP32_PASS


def all_keys(prec):
    """Every non-NaN key of a precision with its float64 value (bf16: all 65,536 bit patterns)."""
    info = np.iinfo(prec.raw)
    keys = np.arange(info.min, info.max + 1, dtype=np.int64).astype(prec.raw)
    vals = _bf16.key_value(keys, prec)
    ok = ~np.isnan(vals)
    return keys[ok], vals[ok]


def test_order_key_sorts_like_the_values():
    keys, vals = all_keys(BF16)
    assert np.all(np.diff(vals[np.argsort(keys, kind="stable")]) >= 0)
    raw = np.random.default_rng(0).integers(-(2**15), 2**15, 1000).astype(np.int16)
    assert np.array_equal(_bf16.order_key(_bf16.order_key(raw)), raw)  # its own inverse


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
    got = _bf16.keys_at_least(x, prec, strict)
    if prec is BF16:  # brute force over every bf16 value
        keys, vals = all_keys(prec)
        for xi, k in zip(x, got):
            ok = keys[(vals > xi) if strict else (vals >= xi)]
            assert k == (ok.min() if ok.size else np.iinfo(np.int16).max)
    else:  # float32: the key found passes, the one below does not
        v = _bf16.key_value(got, prec)
        below = _bf16.key_value(np.maximum(got.astype(np.int64) - 1, np.iinfo(np.int32).min).astype(np.int32), prec)
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
    qr, gr = _bf16.round_rows(q, BF16, side[0]), _bf16.round_rows(g, BF16, side[1])
    t = torch.empty(len(g), len(q), dtype=torch.bfloat16)
    _bf16.gemm(gr.half, qr.half, t)
    t = t.T.double().numpy()
    s = exact_scores(q, g, euclid).numpy()
    if euclid:  # the pass ranks by q.g - |g|^2/2 = -|q - g|^2/2 + |q|^2/2
        s = s + (q.double().square().sum(1, keepdim=True) / 2).numpy()
    bounds = _bf16.chunk_bounds(qr, gr, BF16, euclid)
    lo, hi = _bf16.Bounds(bounds.e[:, None], bounds.c, bounds.scale[:, None]).window(s)
    assert np.all((lo <= t) & (t <= hi))
    err = np.abs(t - s).max(1)
    assert np.all(err <= bounds.e + 2 * bounds.c * np.abs(s).max(1) + 1e-30)
    assert err.max() > 0  # the pass really is rounded
