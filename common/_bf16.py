"""Rounded candidate pass with a proven error bound, and an exact float64 re-check: the CPU accelerator behind
``recall_at_k(..., accelerate=...)`` (:mod:`common.metrics`) and the exact top-k search (:mod:`common.search`).

Scores are first computed from features rounded to bfloat16 (an AMX / AVX512-BF16 GEMM runs several times the fp32
rate; :data:`FP32_PASS` is the same pass in float32) under a rigorous per-query bound on |rounded score - exact
score|. Only the items that bound cannot place are re-scored in float64 and compared under the tie rule (descending
score, ascending gallery index), so results equal a float64 brute force. Scores are laid out (gallery, queries): the
gallery is the GEMM's large operand, so no per-call repacking of it.

For Recall@K (:func:`recall_hits`), per query the items above / below the window the bound leaves around its best
positive's exact score are counted as better / worse, and the few inside are re-scored in float64 -- only when some
K falls in the rank range they leave open. Nothing here is chosen by a module setting: the callers decide.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

PASS_QUERIES = 1024  # queries per GEMM: full AMX speed with modest score blocks
_BLOCK_BYTES = 2**19  # score rows filtered at a time (stay in cache between the comparisons)
_RECHECK_PAIRS = 4096  # (query, item) pairs re-scored in float64 at a time
_U32, _U64, _TINY = 2.0**-24, 2.0**-53, 2.0**-126  # unit roundoffs; smallest normal float (subnormals are flushed)


@dataclass(frozen=True)
class Precision:
    """A candidate pass: GEMM dtype, the integer type its scores are compared as, and its output rounding."""

    dtype: torch.dtype
    raw: type  # np.int16 / np.int32: a score's bits, compared through order_key
    raw_torch: torch.dtype
    out_unit: float  # |stored score - fp32 accumulator| <= out_unit * |accumulator| (+ _TINY)


BF16_PASS = Precision(torch.bfloat16, np.int16, torch.int16, 2.0**-7)  # one bf16 ulp (round-to-nearest needs only half)
FP32_PASS = Precision(torch.float32, np.int32, torch.int32, 0.0)  # the output is the accumulator


@functools.cache
def native_bf16() -> bool:
    """bf16 GEMM in hardware (AMX or AVX512-BF16); elsewhere torch emulates it, slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def safe(*features: Tensor) -> bool:
    """Finite, and small enough that no rounded product or sum can overflow."""
    big = [float(max(x.max(), -x.min())) if x.numel() else 0.0 for x in features]
    return all(np.isfinite(big)) and np.prod(big) * features[0].shape[1] < 2.0**100


@dataclass
class Rounded:
    """Features rounded for a candidate pass and upper bounds on the norms the error bound needs (float64, numpy).

    The Euclidean gallery appends h = |g|^2/2 split in two rounded parts (hi + lo) and the query appends (-1, -1),
    so the rounded inner product approximates q.g - |g|^2/2, which ranks like -|q - g|^2.
    """

    half: Tensor  # (n, d') rounded (augmented) features
    orig: np.ndarray  # (n,) |x| of the given features
    norm: np.ndarray  # (n,) |x'| of the exact augmented vector the bound compares with
    resid: np.ndarray  # (n,) |x' - round(x')|
    half_norm: np.ndarray  # (n,) |round(x')|
    absmax: float  # largest |entry| of round(x')
    offset_err: float  # Euclidean gallery: float64 error of h itself


def _sumsq(a: np.ndarray) -> np.ndarray:
    """Row sums of squares, rounded up past any summation error (|error| <= d u |sum| in the array's precision)."""
    return np.einsum("ij,ij->i", a, a).astype(np.float64) * (1 + 4 * (a.shape[1] + 2) * np.finfo(a.dtype).eps)


def as_float(raw: np.ndarray, prec: Precision) -> np.ndarray:
    """Values (float32) of scores given by their bits."""
    if prec.raw is np.int16:
        return (raw.astype(np.int32) << 16).view(np.float32)
    return raw.view(np.float32)


def round_rows(x: Tensor, prec: Precision, side: Optional[str] = None, rows: int = 16384) -> Rounded:
    """Round ``x`` (n, d) for the pass; ``side`` 'query' / 'gallery' adds the Euclidean augmentation.

    |round(x)| is bounded by |x| + |x - round(x)| and any entry by the row norm, which saves passes over x."""
    n, d = x.shape
    half = x.to(prec.dtype).contiguous()
    if side:
        half = torch.cat([half, torch.empty(n, 2, dtype=prec.dtype)], 1)
    orig, norm, resid, half_norm = (np.empty(n) for _ in range(4))
    absmax, offset = 1.0 if side == "query" else 0.0, 0.0
    for a in range(0, n, rows):
        xn = x[a : a + rows].numpy()
        hn = half[a : a + rows, :d].float().numpy()
        o2 = _sumsq(xn)
        r2 = np.zeros_like(o2) if half is x else _sumsq(xn - hn)  # the difference is exact
        n2, h2 = o2.copy(), (np.sqrt(o2) + np.sqrt(r2)) ** 2
        if side == "gallery":
            h = np.einsum("ij,ij->i", xn.astype(np.float64), xn.astype(np.float64)) / 2
            hi = torch.from_numpy(h).to(prec.dtype)
            lo = torch.from_numpy(h - hi.double().numpy()).to(prec.dtype)
            hi64, lo64 = hi.double().numpy(), lo.double().numpy()
            half[a : a + rows, d], half[a : a + rows, d + 1] = hi, lo
            n2 += (h - lo64) ** 2 + lo64**2  # the exact vector: [g, h - lo, lo]
            r2 += (h - hi64 - lo64) ** 2
            h2 += hi64**2 + lo64**2
            offset = max(offset, float((d * _U64 * h).max(initial=0)))  # h itself was rounded in float64
        elif side == "query":
            half[a : a + rows, d:] = -1
            n2 += 2
            h2 += 2
        for out, val in ((orig, o2), (norm, n2), (resid, r2), (half_norm, h2)):
            out[a : a + rows] = np.sqrt(val) * (1 + 1e-12)
        absmax = max(absmax, float(half_norm[a : a + rows].max(initial=0)))
    return Rounded(half, orig, norm, resid, half_norm, absmax, offset)


def _bound(q: Rounded, g: Rounded, width: int) -> np.ndarray:
    """Per query e >= |fp32 accumulator of the rounded GEMM - exact (augmented) score| for every gallery item.

    |q.g - q^.g^| <= |q - q^| |g| + |q^| |g - g^| (Cauchy-Schwarz), plus fp32 accumulation over ``width`` terms
    (products of bf16 values are exact in fp32) and flushed subnormal inputs, products and sums.
    """
    return (
        q.resid * g.norm.max()
        + q.half_norm * g.resid.max()
        + g.offset_err
        + 2 * width * _U32 * q.half_norm * g.half_norm.max()
        + 2 * width * _TINY * (q.absmax + g.absmax + 1)
    )


def _float64_margin(q: Rounded, g: Rounded, euclid: bool) -> np.ndarray:
    """Twice the rounding error of two float64 re-scored values, so no float64 comparison can escape the bound."""
    d = q.half.shape[1]
    if euclid:
        return 4 * (d + 2) * _U64 * (q.orig + g.orig.max()) ** 2
    return 4 * d * _U64 * q.orig * g.orig.max()


def _up(y: np.ndarray, c: float) -> np.ndarray:
    """Largest stored score an accumulator y can give (without the _TINY term): y + c|y|."""
    return np.where(y >= 0, y * (1 + c), y * (1 - c))


def _down(y: np.ndarray, c: float) -> np.ndarray:
    return np.where(y >= 0, y * (1 - c), y * (1 + c))


def _below(t: np.ndarray, c: float) -> np.ndarray:
    """Smallest accumulator that can be stored as a score >= t: the inverse of :func:`_up`."""
    return np.where(t >= 0, t / (1 + c), t / (1 - c))


def _widen(x: np.ndarray, scale: np.ndarray, sign: int) -> np.ndarray:
    """Move a float64 threshold outwards by far more than the rounding of the few operations that made it."""
    return x + sign * 1e-12 * (np.abs(x) + scale)


@dataclass
class Bounds:
    """Per-query error terms of one chunk: e (input rounding, accumulation, float64 re-scoring), c, scale."""

    e: np.ndarray
    c: float
    scale: np.ndarray

    def at_least(self, best: np.ndarray) -> np.ndarray:
        """Threshold on stored scores that every item scoring at least as well (exactly) as some item whose
        stored score is ``best`` passes: s >= below(best) - e, so t >= down(below(best) - 2e)."""
        with np.errstate(invalid="ignore"):
            worst = _below(best - _TINY, self.c) - self.e
            return _widen(_down(worst - self.e, self.c) - _TINY, self.scale, -1)

    def window(self, s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(lo, hi): a stored score > hi is exactly better than s, one < lo exactly worse."""
        with np.errstate(invalid="ignore"):
            return self._window(s)

    def _window(self, s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        hi = _widen(_up(s + self.e, self.c) + _TINY, self.scale, 1)
        lo = _widen(_down(s - self.e, self.c) - _TINY, self.scale, -1)
        return lo, hi


def chunk_bounds(q: Rounded, g: Rounded, prec: Precision, euclid: bool) -> Bounds:
    e = _bound(q, g, q.half.shape[1]) + _float64_margin(q, g, euclid)
    return Bounds(e, prec.out_unit * (1 + 1e-9), q.half_norm * g.half_norm.max())


def order_key(raw: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Integers ordered like the floats whose bits ``raw`` holds: negatives get their magnitude bits flipped.

    -0.0 keys just below +0.0; the map is its own inverse.
    """
    bits = raw.dtype.itemsize * 8 - 1
    out = np.right_shift(raw, bits, out=out)
    np.bitwise_and(out, raw.dtype.type((1 << bits) - 1), out=out)
    return np.bitwise_xor(out, raw, out=out)


def key_value(key: np.ndarray, prec: Precision) -> np.ndarray:
    """float64 value of each order key."""
    raw = order_key(np.ascontiguousarray(key, dtype=prec.raw))
    with np.errstate(invalid="ignore"):
        return as_float(raw, prec).astype(np.float64)


def keys_at_least(x: np.ndarray, prec: Precision, strict: bool = False) -> np.ndarray:
    """Smallest order key whose value is >= x (> x if ``strict``), elementwise; a score passes iff its key does.

    The largest key (a NaN pattern, never a score here) means "nothing passes".
    """
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32).view(np.int32)
    inf = np.array([-np.inf, np.inf], np.float32).view(np.int32)
    if prec.raw is np.int16:
        f, inf = (f >> 16).astype(np.int16), (inf >> 16).astype(np.int16)
    lo_key, hi_key = order_key(inf).astype(np.int64)
    base = order_key(f).astype(np.int64)
    best = np.full(x.shape, np.iinfo(prec.raw).max, np.int64)
    for delta in range(3, -4, -1):  # f is x truncated after one rounding: the answer is a step or two from base
        k = np.clip(base + delta, lo_key, hi_key)
        v = key_value(k, prec)
        ok = v > x if strict else v >= x
        if delta == -3 and (ok & (k > lo_key)).any():
            raise AssertionError("order key search window too narrow")
        best = np.where(ok, k, best)
    return best.astype(prec.raw)


def gemm(gallery: Tensor, query: Tensor, out: Tensor) -> None:
    """``out (n, b) = gallery (n, d') @ query (b, d').T`` in the pass's precision."""
    if out.dtype == torch.float32:
        np.matmul(gallery.numpy(), query.numpy().T, out=out.numpy())
    else:
        torch.mm(gallery, query.T, out=out)


def exact_scores(query64: np.ndarray, qi: np.ndarray, gallery: np.ndarray, gi: np.ndarray, euclid: bool) -> np.ndarray:
    """float64 scores of the pairs (query64[qi], gallery[gi]): inner product, or -|q - g|^2 / 2 for Euclidean.

    One fixed summation per pair, so equal vectors always get equal scores."""
    out = np.empty(len(qi), np.float64)
    for a in range(0, len(qi), _RECHECK_PAIRS):
        q, g = query64[qi[a : a + _RECHECK_PAIRS]], gallery[gi[a : a + _RECHECK_PAIRS]].astype(np.float64)
        if euclid:
            q = q - g
            out[a : a + len(q)] = np.einsum("ij,ij->i", q, q) * -0.5
        else:
            out[a : a + len(q)] = np.einsum("ij,ij->i", q, g)
    return out


def workers() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _map_rows(pool: ThreadPoolExecutor, fn: Callable[[int, int], Any], n: int, step: int) -> List[Any]:
    """``fn(a, z)`` on contiguous row ranges (multiples of ``step``), one per worker thread (numpy frees the GIL)."""
    parts = workers()
    size = -(-max(n, 1) // parts)
    size = -(-size // step) * step
    return list(pool.map(lambda a: fn(a, min(a + size, n)), range(0, n, size)))


def _keys_view(block: np.ndarray, thresholds: Sequence[np.ndarray], tmp: np.ndarray) -> np.ndarray:
    """Order keys of a score block; for non-negative thresholds the raw bits already compare right."""
    if all((th >= 0).all() for th in thresholds):
        return block
    return order_key(block, out=tmp[: block.shape[0], : block.shape[1]])


def _count_at_least(raw: np.ndarray, thresholds: Sequence[np.ndarray], pool: ThreadPoolExecutor) -> List[np.ndarray]:
    """Per column j and threshold th: #{rows i: key(raw[i, j]) >= th[j]}. raw (n, b) -> list of (b,) int64.

    Masks are summed as uint8 over groups of 255 rows (no overflow), then widened: fewer bytes to move."""
    n, b = raw.shape
    step = 255 * max(1, _BLOCK_BYTES // (255 * b * raw.itemsize))

    def work(a: int, z: int) -> List[np.ndarray]:
        mask, tmp = np.empty((step, b), bool), np.empty((step, b), raw.dtype)
        counts = [np.zeros(b, np.int64) for _ in thresholds]
        for r in range(a, z, step):
            keys = _keys_view(raw[r : min(r + step, z)], thresholds, tmp)
            m = mask[: keys.shape[0]]
            full = m.shape[0] // 255 * 255
            for c, th in zip(counts, thresholds):
                np.greater_equal(keys, th, out=m)
                u = m.view(np.uint8)
                c += np.add.reduce(u[:full].reshape(-1, 255, b), axis=1, dtype=np.uint8).sum(0, dtype=np.int64)
                c += np.add.reduce(u[full:], axis=0, dtype=np.int64)
        return counts

    parts = _map_rows(pool, work, n, step)
    return [sum(p[j] for p in parts) for j in range(len(thresholds))]


def pairs_between(
    raw: np.ndarray, cols: np.ndarray, lo: np.ndarray, hi: Optional[np.ndarray], pool: ThreadPoolExecutor
) -> Tuple[np.ndarray, np.ndarray]:
    """(row, column) of the entries of columns ``cols`` with lo <= key < hi (hi None: no upper limit)."""
    n = raw.shape[0]
    thresholds = [lo] if hi is None else [lo, hi]
    step = max(1, _BLOCK_BYTES // (max(len(cols), 1) * raw.itemsize))
    whole = len(cols) == raw.shape[1]

    def work(a: int, z: int) -> Tuple[np.ndarray, np.ndarray]:
        tmp = np.empty((step, len(cols)), raw.dtype)
        rows, found = [], []
        for r in range(a, z, step):
            block = raw[r : min(r + step, z)]
            keys = _keys_view(block if whole else block[:, cols], thresholds, tmp)
            hit = keys >= lo
            if hi is not None:
                hit &= keys < hi
            rr, cc = _nonzero_sparse(hit)
            rows.append(rr + r)
            found.append(cc)
        return np.concatenate(rows), np.concatenate(found)

    parts = _map_rows(pool, work, n, step)
    rows = np.concatenate([p[0] for p in parts])
    return rows, cols[np.concatenate([p[1] for p in parts])]


def _nonzero_sparse(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a mostly-False 2-D bool array, skipping empty 8-byte words."""
    flat = mask.reshape(-1)
    n8 = flat.size // 8 * 8
    words = np.flatnonzero(flat[:n8].view(np.uint64))
    pos = (words[:, None] * 8 + np.arange(8))[flat[:n8].reshape(-1, 8)[words]]
    pos = np.concatenate([pos, n8 + np.flatnonzero(flat[n8:])])
    return np.divmod(pos, mask.shape[1])


def _pass_queries(n: int, fixed: int, per_query: int, chunk_size: Optional[int], budget: int, total: int) -> int:
    """Queries per GEMM: ``chunk_size`` if given, else what the budget allows (at most PASS_QUERIES)."""
    if chunk_size is not None:
        return min(int(chunk_size), total)
    return max(1, min(total, PASS_QUERIES, (budget - fixed) // per_query))


def _positives(st: Any, qidx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Gallery indices (B, P) of the positives of queries ``qidx`` (ascending) and which entries are real."""
    n = st.gallery.shape[0]
    qidx = torch.from_numpy(qidx)
    width = max(int(st.pos_count[qidx].max()), 1)
    offsets = torch.arange(width)
    valid = (offsets < st.pos_count[qidx, None]).numpy()
    index = st.order[(st.pos_start[qidx, None] + offsets).clamp(max=n - 1)].numpy()
    if st.self_excluded:
        valid &= index != qidx.numpy()[:, None]
    return index, valid


def _float64_ranks(st: Any, qidx: np.ndarray, gallery64: np.ndarray) -> np.ndarray:
    """Exact rank of each query's best positive from its whole float64 score row: for windows too wide to re-check
    item by item (massive ties, e.g. collapsed features)."""
    n = gallery64.shape[0]
    index, valid = _positives(st, qidx)
    q64 = st.query[torch.from_numpy(qidx)].numpy().astype(np.float64)
    out = np.empty(len(qidx), np.int64)
    step = max(1, 16 * _BLOCK_BYTES // (8 * n))
    for a in range(0, len(qidx), step):
        z = min(a + step, len(qidx))
        s = q64[a:z] @ gallery64.T
        r = np.arange(z - a)[:, None]
        if st.self_excluded:
            s[r[:, 0], qidx[a:z]] = -np.inf
        pv = np.where(valid[a:z], s[r, index[a:z]], -np.inf)
        sp = pv.max(1, keepdims=True)
        p = np.where(valid[a:z] & (pv == sp), index[a:z], n).min(1, keepdims=True)
        out[a:z] = (s > sp).sum(1) + ((s == sp) & (np.arange(n) < p)).sum(1)
    return out


def _wide_limit(n: int) -> int:
    """Window size beyond which a whole float64 row (n dot products, one GEMM row) beats item-by-item re-checks."""
    return max(4096, n // 16)


def _column_groups(cols: np.ndarray, sizes: np.ndarray, cap: int) -> Iterator[np.ndarray]:
    """Consecutive groups of ``cols`` whose ``sizes`` add up to at most ``cap`` (a single larger one alone)."""
    ends = np.cumsum(sizes)
    start = 0
    while start < len(cols):
        end = max(start + 1, int(np.searchsorted(ends, ends[start] - sizes[start] + cap, side="right")))
        yield cols[start:end]
        start = end


@torch.inference_mode()
def recall_hits(st: Any, ranks: Sequence[int], per_positive: int) -> List[int]:
    """Recall@K hit counts from a bf16 pass (see :func:`_bf16_chunk_ranks`). ``st``: the validated inputs of
    :mod:`common.metrics` (features, label-sorted positives, chunk size, memory budget); ``per_positive``: bytes
    each positive of a query takes in a chunk."""
    prec, n, d = BF16_PASS, *st.gallery.shape
    g = round_rows(st.gallery, prec)
    ks = np.asarray(ranks, np.int64)
    hits = np.zeros(len(ks), np.int64)
    fixed = n * d * 2 + 4 * workers() * _BLOCK_BYTES
    per_query = n * 2 + int(st.pos_count.max()) * per_positive
    rows = _pass_queries(n, fixed, per_query, st.chunk_size, st.budget, st.query.shape[0])
    buf = torch.empty(n * rows, dtype=prec.dtype)
    wide: List[np.ndarray] = []  # queries whose windows are too wide to re-check item by item
    with ThreadPoolExecutor(workers()) as pool:
        for i in range(0, st.query.shape[0], rows):
            q = round_rows(st.query[i : i + rows], prec)
            t = buf[: n * q.half.shape[0]].view(n, -1)
            gemm(g.half, q.half, t)
            if st.self_excluded:
                t.diagonal(-i).fill_(float("-inf"))
            rank, has_pos, far = _bf16_chunk_ranks(st, i, t.view(prec.raw_torch).numpy(), q, g, ks, pool)
            hits += (has_pos[:, None] & (rank[:, None] < ks)).sum(0)
            wide.append(i + far)
    wide = np.concatenate(wide)
    if len(wide):
        rank = _float64_ranks(st, wide, st.gallery.numpy().astype(np.float64))
        hits += (rank[:, None] < ks).sum(0)
    return hits.tolist()


def _bf16_chunk_ranks(
    st: Any, i: int, raw: np.ndarray, q: Rounded, g: Rounded, ks: np.ndarray, pool: ThreadPoolExecutor
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For queries i.. with bf16 scores ``raw`` (N, B): the rank of each best positive p, exact wherever it decides
    a hit, whether a positive exists, and the queries left to :func:`_float64_ranks` (their rank counts no hit here).

    rank = #{s_j > s_p} + #{j < p: s_j == s_p}. p is found among the positives whose rounded score could be the best
    (re-scored in float64); then items whose rounded score lies above the window around s_p count as better, those
    below as worse, and those inside are re-scored in float64 -- only where some K falls inside the rank interval
    the window leaves open."""
    prec, (n, b), none = BF16_PASS, raw.shape, np.iinfo(np.int16).max
    gx, q64 = st.gallery.numpy(), st.query[i : i + b].numpy().astype(np.float64)
    bounds = chunk_bounds(q, g, prec, False)
    index, valid = _positives(st, np.arange(i, i + b))
    tv = np.where(valid, as_float(raw[index, np.arange(b)[:, None]], prec), -np.inf)
    cand = valid & (tv >= bounds.at_least(tv.max(1))[:, None])
    qi, pj = np.nonzero(cand)
    s = np.full(cand.shape, -np.inf)
    s[qi, pj] = exact_scores(q64, qi, gx, index[qi, pj], False)
    sp = s.max(1)
    p = np.where(cand & (s == sp[:, None]), index, n).min(1)
    has_pos = valid.any(1)
    lo, hi = bounds.window(sp)
    hi, lo = keys_at_least(hi, prec, strict=True), keys_at_least(lo, prec)
    hi[~has_pos], lo[~has_pos] = none, none
    better, at_least = _count_at_least(raw, [hi, lo], pool)  # at_least includes p itself
    open_ = has_pos & ((better[:, None] < ks) & (ks <= at_least[:, None] - 1)).any(1)
    cols, size = np.flatnonzero(open_), (at_least - better)[open_]
    far = size > _wide_limit(n)
    rank = better.copy()
    rank[cols[far]] = ks.max()  # decided later from whole float64 rows
    for group in _column_groups(cols[~far], size[~far], 2**21):
        gi, qc = pairs_between(raw, group, lo[group], hi[group], pool)
        if st.self_excluded:
            keep = gi != qc + i
            gi, qc = gi[keep], qc[keep]
        sw = exact_scores(q64, qc, gx, gi, False)
        win = (sw > sp[qc]) | ((sw == sp[qc]) & (gi < p[qc]))
        rank += np.bincount(qc[win], minlength=b)
    return rank, has_pos, cols[far]
