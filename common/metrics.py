"""Exact, memory-bounded retrieval metrics (Recall@K, MAP@R, R-precision) and exact top-k search.

Similarity is the inner product of the given features. The caller L2-normalises them, and for unit vectors
``|a - b|^2 = 2 - 2 a.b``, so ranking by inner product equals ranking by Euclidean distance.

**Tie rule.** For one query, gallery items are ordered by descending similarity, ties broken by ascending gallery
index: exactly the order of the stable brute force ``torch.sort(-s, stable=True)``. Every metric here is identical
(not approximately equal) to that brute force run on the same similarity values. (BLAS may round a dot product
differently for different chunk shapes; that moves a score by at most one ulp and only matters for exact ties.)

**Recall@K on CPU** (float32/64 features, a CPU with bf16 arithmetic: AMX or AVX512-BF16) takes a faster route with
the same guarantee against a float64 brute force: a bf16 GEMM gives every score up to a rigorous per-query error
bound; per query, the items above / below the window that bound leaves around its best positive's exact score are
counted as better / worse, and the few inside are re-scored in float64 -- only when some K falls in the rank range
they leave open (see ``_bf16_recall_hits``). :func:`search_topk` uses the same pass for exact top-k search.

**Self-exclusion.** Without a gallery the query set is its own gallery and each query's own row is removed *by
index*, so an exact duplicate of a query still counts as a neighbour (at rank 1).

**Memory.** Queries are processed in chunks of rows; the chunk size is derived from ``memory_budget`` counting every
temporary of shape ``rows x N_gallery`` (the score block, plus on CUDA a float32 counting block; on CPU the counting
buffer is a fixed block of a few rows that stays in cache), so the peak extra memory is about ``memory_budget``
whatever the data set size (the bf16 route: a bf16 copy of the gallery plus at most 1,024 queries' bf16 scores).
Everything stays on the features' device (CPU or CUDA). On CPU, float32/64 score blocks are computed by numpy's BLAS
and counted with numpy (see ``_matmul_into``); its OpenBLAS threads follow ``OPENBLAS_NUM_THREADS``, not
``torch.set_num_threads`` (the bf16 GEMM is torch's and follows the latter).
"""

from __future__ import annotations

import functools
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

__all__ = [
    "recall_at_k",
    "map_at_r",
    "r_precision",
    "retrieval_metrics",
    "exact_topk",
    "search_topk",
    "prepare_gallery",
    "PreparedGallery",
]

Labels = Union[Tensor, np.ndarray, Sequence[int]]
DEFAULT_BUDGET = 512 * 2**20
_ROW_BYTES_PER_POSITIVE = 96  # gathered positive indices/scores, top-R indices, cumsums (int64/float64 each)
CPU_NUMPY = True  # CPU float32/64 scores via numpy (see _numpy_path); False: torch ops only, as on CUDA
_CPU_BLOCK_BYTES = 4 * 2**20  # scores counted per block on CPU: stays in L2/L3 between the two comparisons
_NUMPY_OPS = {"gt": np.greater, "ge": np.greater_equal, "eq": np.equal}
_popcount = getattr(np, "bitwise_count", None)


@dataclass
class _Setup:
    """Validated inputs plus, per query, where its positives sit in the label-sorted gallery."""

    query: Tensor  # (Q, d)
    gallery: Tensor  # (N, d)
    query_labels: Tensor  # (Q,) int64
    gallery_labels: Tensor  # (N,) int64
    self_excluded: bool
    order: Tensor  # (N,) gallery indices sorted by label, ascending index within a label
    pos_start: Tensor  # (Q,) offset of the query's label block in ``order``
    pos_count: Tensor  # (Q,) size of that block (self included when self-excluded)
    num_relevant: Tensor  # (Q,) R = positives of the query, self excluded
    rows: int  # queries per chunk
    chunk_size: Optional[int] = None  # as given (the bf16 path sizes its own chunks)
    budget: int = 0


@dataclass
class _Chunk:
    """One block of queries and its similarity scores (self already set to -inf)."""

    start: int
    scores: Tensor  # (B, N)
    scratch: Any  # counting buffer from _new_scratch (numpy bool or torch float32)
    labels: Tensor  # (B,)
    num_relevant: Tensor  # (B,)


def _as_labels(labels: Labels, n: int, device: torch.device, name: str) -> Tensor:
    """Labels given as list / numpy / tensor -> (n,) int64 tensor on ``device``."""
    t = labels.detach() if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({n},) to match the features")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be integers, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _check_ranks(ranks: Sequence[int], available: int) -> List[int]:
    """Ranks must be positive ints, each at most the number of gallery items a query can retrieve."""
    ranks = list(ranks)
    if not ranks or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ranks):
        raise ValueError(f"ranks must be a non-empty list of positive integers, got {ranks}")
    if max(ranks) > available:
        raise ValueError(f"rank {max(ranks)} exceeds the {available} gallery items each query can retrieve")
    return [int(k) for k in ranks]


def _setup(
    query_features: Tensor,
    query_labels: Labels,
    gallery_features: Optional[Tensor],
    gallery_labels: Optional[Labels],
    chunk_size: Optional[int],
    memory_budget: int,
) -> _Setup:
    """Validate shapes and build the per-query positive lists (a label sort, no Q x N work)."""
    if (gallery_features is None) != (gallery_labels is None):
        raise ValueError("gallery_features and gallery_labels must be given together")
    self_excluded = gallery_features is None
    query = query_features.detach()
    gallery = query if self_excluded else gallery_features.detach()
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"features must be (n, d) with equal d, got {tuple(query.shape)} and {tuple(gallery.shape)}")
    if query.shape[0] == 0 or gallery.shape[0] == 0:
        raise ValueError("query and gallery sets must not be empty")
    if query.dtype != gallery.dtype or query.device != gallery.device:
        raise ValueError(
            f"query and gallery features differ: {query.dtype}/{query.device} vs {gallery.dtype}/{gallery.device}"
        )
    ql = _as_labels(query_labels, query.shape[0], query.device, "query_labels")
    gl = ql if self_excluded else _as_labels(gallery_labels, gallery.shape[0], query.device, "gallery_labels")
    sorted_labels, order = torch.sort(gl, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.searchsorted(uniq, ql).clamp(max=uniq.numel() - 1)
    found = uniq[slot] == ql
    pos_count = torch.where(found, counts[slot], torch.zeros_like(slot))
    num_relevant = pos_count - int(self_excluded)
    rows = _chunk_rows(query, gallery, int(pos_count.max()), chunk_size, memory_budget)
    return _Setup(
        query,
        gallery,
        ql,
        gl,
        self_excluded,
        order,
        starts[slot],
        pos_count,
        num_relevant,
        rows,
        chunk_size,
        memory_budget,
    )


def _chunk_rows(query: Tensor, gallery: Tensor, max_pos: int, chunk_size: Optional[int], budget: int) -> int:
    """Queries per chunk: ``chunk_size`` if given, else as many rows as fit in ``budget`` bytes."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        return min(int(chunk_size), query.shape[0])
    n, cpu = gallery.shape[0], gallery.device.type == "cpu"
    per_row = n * gallery.element_size() + max_pos * _ROW_BYTES_PER_POSITIVE
    scratch = _new_scratch(query.shape[0], gallery, allocate=False)
    if cpu:  # one cache-sized counting block, whatever the chunk
        budget -= scratch[0] * scratch[1] * (1 if _numpy_path(gallery) else 4)
    else:  # a float32 counting block per chunk row
        per_row += 4 * n
    return max(1, min(query.shape[0], budget // per_row))


def _numpy_path(t: Tensor) -> bool:
    """CPU float32/64 goes through numpy: OpenBLAS GEMM and single-threaded counting (see _matmul_into, _count)."""
    return CPU_NUMPY and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _new_scratch(rows: int, gallery: Tensor, allocate: bool = True):
    """Counting buffer: on CPU a cache-sized block of rows (numpy bool, width padded to whole uint64 words, or
    torch float32); elsewhere a float32 block as tall as the chunk. ``allocate=False`` returns only its shape."""
    n = gallery.shape[0]
    if gallery.device.type != "cpu":
        shape = (rows, n)
    else:
        shape = (max(1, min(rows, _CPU_BLOCK_BYTES // (n * gallery.element_size()))), n)
    if _numpy_path(gallery):
        shape = (shape[0], -(-n // 8) * 8)
        return np.zeros(shape, dtype=bool) if allocate else shape
    return torch.empty(shape, dtype=torch.float32, device=gallery.device) if allocate else shape


def _matmul_into(query: Tensor, gallery: Tensor, out: Tensor) -> None:
    """``out = query @ gallery.T``. On CPU float32/64 this calls numpy's BLAS (OpenBLAS in the numpy wheels): on an
    AMD EPYC (Zen 4) it ran sgemm 1.6x faster than torch's MKL, which dispatches non-Intel CPUs to slower kernels."""
    if _numpy_path(out):
        np.matmul(query.numpy(), gallery.numpy().T, out=out.numpy())
    else:
        torch.mm(query, gallery.T, out=out)


def _chunks(st: _Setup) -> Iterator[_Chunk]:
    """Yield score blocks ``query[i:i+B] @ gallery.T`` computed into two reused buffers."""
    n, rows = st.gallery.shape[0], st.rows
    scores = torch.empty(rows, n, dtype=st.query.dtype, device=st.query.device)
    scratch = _new_scratch(rows, st.gallery)
    for i in range(0, st.query.shape[0], rows):
        b = min(rows, st.query.shape[0] - i)
        s = scores[:b]
        _matmul_into(st.query[i : i + b], st.gallery, s)
        if st.self_excluded:
            s.diagonal(offset=i).fill_(float("-inf"))
        yield _Chunk(i, s, scratch, st.query_labels[i : i + b], st.num_relevant[i : i + b])


def _count(ops: Sequence[str], scores: Tensor, threshold: Tensor, scratch) -> List[Tensor]:
    """Per-row counts of ``scores <op> threshold[:, None]`` for each op in 'gt' / 'ge' / 'eq'. (B, N) -> (B,) int64.

    Rows go in blocks of the scratch's height so that all ops on a block run while it is still in cache.
    """
    counts = torch.empty(len(ops), scores.shape[0], dtype=torch.int64, device=scores.device)
    step = scratch.shape[0]
    for i in range(0, scores.shape[0], step):
        block, thr = scores[i : i + step], threshold[i : i + step, None]
        for j, op in enumerate(ops):
            counts[j, i : i + step] = _count_block(op, block, thr, scratch)
    return list(counts)


def _count_block(op: str, block: Tensor, thr: Tensor, scratch):
    """Counts for one block. numpy scratch (CPU): bool compare + popcount of the bytes read as uint64 words, in one
    thread -- thousands of tiny torch parallel regions stall when another process holds a core. torch scratch:
    compare written as float32 and summed as floats (~5x faster than torch's int64-widening bool sum), exact below
    2**24, float64 accumulation beyond."""
    b, n = block.shape
    if isinstance(scratch, np.ndarray):
        _NUMPY_OPS[op](block.numpy(), thr.numpy(), out=scratch[:b, :n])
        if _popcount is None:  # numpy < 2.0
            return torch.from_numpy(np.count_nonzero(scratch[:b], axis=1))
        return torch.from_numpy(_popcount(scratch[:b].view(np.uint64)).sum(1, dtype=np.int64))
    dtype = torch.float32 if n < 2**24 else torch.float64
    return getattr(torch, op)(block, thr, out=scratch[:b]).sum(1, dtype=dtype)


def _best_positive(st: _Setup, ch: _Chunk) -> Tuple[Tensor, Tensor]:
    """Score and gallery index of each query's best positive (smallest index among equal scores).

    Gathers only the positives' scores (B x max class size), no (B, N) label mask. Shapes (B,), (B,).
    """
    sl = slice(ch.start, ch.start + ch.scores.shape[0])
    width = max(int(st.pos_count[sl].max()), 1)
    offsets = torch.arange(width, device=ch.scores.device)
    valid = offsets < st.pos_count[sl, None]
    slots = (st.pos_start[sl, None] + offsets).clamp(max=st.order.numel() - 1)
    index = st.order[slots]  # ascending gallery index within a row
    vals = ch.scores.gather(1, index).masked_fill(~valid, float("-inf"))
    best = vals.amax(1)
    first = torch.where(valid & (vals == best[:, None]), index, st.order.numel()).amin(1)
    return best, first


def _positive_ranks(st: _Setup, ch: _Chunk) -> Tuple[Tensor, Tensor]:
    """0-based rank of the best positive under the tie rule, and whether a positive exists. Shapes (B,), (B,).

    rank = #{i: s_i > s_p} + #{i < p: s_i == s_p}; the second term is only evaluated on rows that have ties.
    """
    best, first = _best_positive(st, ch)
    has_pos = ch.num_relevant > 0
    greater, at_least = _count(("gt", "ge"), ch.scores, best, ch.scratch)
    tied = (has_pos & (at_least - greater > 1)).nonzero().flatten().tolist()
    for r in tied:
        p = int(first[r])
        greater[r] += int((ch.scores[r, :p] == best[r]).sum())
    return greater, has_pos


def _exact_topk(similarity: Tensor, k: int, scratch: Any = None) -> Tuple[Tensor, Tensor]:
    """:func:`exact_topk`, optionally counting boundary ties with a counting buffer from _new_scratch."""
    b, n = similarity.shape
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be between 0 and the row length {n}")
    if k == 0:
        return similarity.new_empty(b, 0), torch.empty(b, 0, dtype=torch.int64, device=similarity.device)
    vals, index = torch.topk(similarity, k, dim=1)  # descending; boundary ties picked arbitrarily
    kth = vals[:, -1].contiguous()
    taken = (vals == kth[:, None]).sum(1)  # boundary items topk took (at the tail)
    if scratch is None:
        available = (similarity == kth[:, None]).sum(1)
    else:
        available = _count(("eq",), similarity, kth, scratch)[0]
    for r in (available > taken).nonzero().flatten().tolist():  # keep the lowest-index boundary items
        t = int(taken[r])
        index[r, k - t :] = (similarity[r] == kth[r]).nonzero().flatten()[:t]
    index, perm = index.sort(1)
    vals = vals.gather(1, perm)
    order = vals.sort(dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), index.gather(1, order)


def exact_topk(similarity: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-``k`` of each row of a score matrix, ordered by (descending value, ascending index).

    Identical to ``torch.sort(-similarity, stable=True)[..., :k]``, but O(N) per row: ``torch.topk`` finds the k-th
    largest value v, and among the items equal to v only the lowest-index ones are kept.
    Shapes: similarity (B, N) -> values (B, k), indices (B, k) int64.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be (B, N), got {tuple(similarity.shape)}")
    with torch.inference_mode():
        return _exact_topk(similarity, int(k))


def _precision_at_r(st: _Setup, ch: _Chunk) -> Tuple[Tensor, Tensor]:
    """Per-query AP@R and R-precision (float64, (B,)); rows with R = 0 hold 0 and are masked by the caller."""
    r = ch.num_relevant
    k = int(r.max())
    if k <= 0:
        zeros = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
        return zeros, zeros
    _, index = _exact_topk(ch.scores, k, ch.scratch)  # self is -inf and k <= N - 1: never retrieved
    positions = torch.arange(1, k + 1, device=r.device, dtype=torch.float64)
    rel = (st.gallery_labels[index] == ch.labels[:, None]) & (positions <= r[:, None])
    hits = rel.cumsum(1, dtype=torch.float64)
    denom = r.clamp(min=1).double()
    ap = (hits / positions * rel).sum(1) / denom
    return ap, hits[:, -1] / denom


@torch.inference_mode()
def _evaluate(st: _Setup, ranks: Sequence[int], want_recall: bool, want_ap: bool) -> Dict[str, float]:
    """One pass over the query chunks computing the requested metrics."""
    q = st.query.shape[0]
    if want_recall and not want_ap and _bf16_ready(st.query, st.gallery):
        return {f"recall@{k}": h / q for k, h in zip(ranks, _bf16_recall_hits(st, ranks))}
    hits = torch.zeros(len(ranks), dtype=torch.int64, device=st.query.device)
    ks = torch.tensor(list(ranks), device=st.query.device)
    ap = torch.zeros(q, dtype=torch.float64, device=st.query.device)
    rp = torch.zeros_like(ap)
    for ch in _chunks(st):
        if want_recall:
            rank, has_pos = _positive_ranks(st, ch)
            hits += (has_pos[:, None] & (rank[:, None] < ks)).sum(0)
        if want_ap:
            sl = slice(ch.start, ch.start + ch.scores.shape[0])
            ap[sl], rp[sl] = _precision_at_r(st, ch)
    out = {f"recall@{k}": h / q for k, h in zip(ranks, hits.tolist())}
    if want_ap:
        valid = st.num_relevant > 0
        n = max(int(valid.sum()), 1)
        out["map@r"] = float(ap[valid].sum()) / n
        out["r_precision"] = float(rp[valid].sum()) / n
    return out


def recall_at_k(
    query_features: Tensor,
    query_labels: Labels,
    ranks: Sequence[int],
    gallery_features: Optional[Tensor] = None,
    gallery_labels: Optional[Labels] = None,
    *,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_BUDGET,
) -> List[float]:
    """Recall@K: fraction of queries whose best positive ranks in the top K (one value per rank, same order).

    Exact and sort-free: with p the best positive (max score, lowest index among equal scores), its 0-based rank is
    #{i: s_i > s_p} + #{i < p: s_i == s_p}; a hit at K iff a positive exists and rank < K.
    Shapes: query_features (Q, d), gallery_features (N, d) or None (queries are their own gallery, self removed by
    index); labels (Q,) / (N,) as list, numpy array or tensor. ``chunk_size`` (rows) overrides ``memory_budget``.
    Raises ValueError for a rank above the gallery size (minus one when self-excluded) or mismatched lengths.
    """
    st = _setup(query_features, query_labels, gallery_features, gallery_labels, chunk_size, memory_budget)
    ranks = _check_ranks(ranks, st.gallery.shape[0] - int(st.self_excluded))
    return list(_evaluate(st, ranks, True, False).values())


def map_at_r(
    query_features: Tensor,
    query_labels: Labels,
    ranks: Optional[Sequence[int]] = None,
    gallery_features: Optional[Tensor] = None,
    gallery_labels: Optional[Labels] = None,
    *,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_BUDGET,
) -> float:
    """MAP@R (Musgrave et al. 2020, as in pytorch-metric-learning), averaged over queries with R > 0.

    R = number of positives of the query in the gallery (self excluded); AP@R = (1/R) sum_{i<=R} P@i * rel_i over the
    exact top-R under the tie rule. Queries with R = 0 are skipped (PML's default); 0.0 if no query has a positive.
    ``ranks`` is accepted for a signature shared with :func:`recall_at_k` and ignored. Shapes as in recall_at_k.
    """
    st = _setup(query_features, query_labels, gallery_features, gallery_labels, chunk_size, memory_budget)
    return _evaluate(st, [], False, True)["map@r"]


def r_precision(
    query_features: Tensor,
    query_labels: Labels,
    ranks: Optional[Sequence[int]] = None,
    gallery_features: Optional[Tensor] = None,
    gallery_labels: Optional[Labels] = None,
    *,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_BUDGET,
) -> float:
    """R-precision (as in pytorch-metric-learning): fraction of positives in the exact top-R, mean over R > 0.

    Queries with R = 0 are skipped; 0.0 if none has a positive. ``ranks`` is ignored. Shapes as in recall_at_k.
    """
    st = _setup(query_features, query_labels, gallery_features, gallery_labels, chunk_size, memory_budget)
    return _evaluate(st, [], False, True)["r_precision"]


def retrieval_metrics(
    query_features: Tensor,
    query_labels: Labels,
    ranks: Sequence[int],
    gallery_features: Optional[Tensor] = None,
    gallery_labels: Optional[Labels] = None,
    *,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_BUDGET,
) -> Dict[str, float]:
    """``{'recall@K': ..., 'map@r': ..., 'r_precision': ...}`` from a single pass over the score chunks.

    Same arguments, shapes and errors as :func:`recall_at_k`; each score block is computed once and shared.
    """
    st = _setup(query_features, query_labels, gallery_features, gallery_labels, chunk_size, memory_budget)
    ranks = _check_ranks(ranks, st.gallery.shape[0] - int(st.self_excluded))
    return _evaluate(st, ranks, True, True)


# ---- rounded candidate pass + exact re-check (CPU Recall@K, top-k search) ---------------------------------------
# Scores are first computed from features rounded to bfloat16 (an AMX / AVX512-BF16 GEMM runs several times the fp32
# rate) under a rigorous per-query bound on |rounded score - exact score|. Only the items that bound cannot place are
# re-scored in float64 and compared under the tie rule, so results equal a float64 brute force. Scores are laid out
# (gallery, queries): the gallery is the GEMM's large operand, so no per-call repacking of it.
BF16 = True  # False: recall_at_k keeps the fp32 counting path; search uses an fp32 candidate pass
_PASS_QUERIES = 1024  # queries per GEMM: full AMX speed with modest score blocks
_BLOCK_BYTES = 2**19  # score rows filtered at a time (stay in cache between the comparisons)
_RECHECK_PAIRS = 4096  # (query, item) pairs re-scored in float64 at a time
_FEW_QUERIES = 256  # search_topk on an unprepared gallery: up to this many queries use an fp32 pass
_POOL_PAIRS = 2**20  # search candidates beyond 4 k per query that trigger an exact pruning
_U32, _U64, _TINY = 2.0**-24, 2.0**-53, 2.0**-126  # unit roundoffs; smallest normal float (subnormals are flushed)


@dataclass(frozen=True)
class _Precision:
    """A candidate pass: GEMM dtype, the integer type its scores are compared as, and its output rounding."""

    dtype: torch.dtype
    raw: type  # np.int16 / np.int32: a score's bits, compared through _order_key
    raw_torch: torch.dtype
    out_unit: float  # |stored score - fp32 accumulator| <= out_unit * |accumulator| (+ _TINY)


_BF16 = _Precision(torch.bfloat16, np.int16, torch.int16, 2.0**-7)  # one bf16 ulp (round-to-nearest needs only half)
_FP32 = _Precision(torch.float32, np.int32, torch.int32, 0.0)  # the output is the accumulator


@functools.cache
def _native_bf16() -> bool:
    """bf16 GEMM in hardware (AMX or AVX512-BF16); elsewhere torch emulates it, slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def _safe(*features: Tensor) -> bool:
    """Finite, and small enough that no rounded product or sum can overflow."""
    big = [float(max(x.max(), -x.min())) if x.numel() else 0.0 for x in features]
    return all(np.isfinite(big)) and np.prod(big) * features[0].shape[1] < 2.0**100


def _bf16_ready(query: Tensor, gallery: Tensor) -> bool:
    return (
        BF16
        and _native_bf16()
        and query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.float64)
        and _safe(query, gallery)
    )


@dataclass
class _Rounded:
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


def _as_float(raw: np.ndarray, prec: _Precision) -> np.ndarray:
    """Values (float32) of scores given by their bits."""
    if prec.raw is np.int16:
        return (raw.astype(np.int32) << 16).view(np.float32)
    return raw.view(np.float32)


def _round(x: Tensor, prec: _Precision, side: Optional[str] = None, rows: int = 16384) -> _Rounded:
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
    return _Rounded(half, orig, norm, resid, half_norm, absmax, offset)


def _bound(q: _Rounded, g: _Rounded, width: int) -> np.ndarray:
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


def _float64_margin(q: _Rounded, g: _Rounded, euclid: bool) -> np.ndarray:
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
class _Bounds:
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


def _chunk_bounds(q: _Rounded, g: _Rounded, prec: _Precision, euclid: bool) -> _Bounds:
    e = _bound(q, g, q.half.shape[1]) + _float64_margin(q, g, euclid)
    return _Bounds(e, prec.out_unit * (1 + 1e-9), q.half_norm * g.half_norm.max())


def _order_key(raw: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Integers ordered like the floats whose bits ``raw`` holds: negatives get their magnitude bits flipped.

    -0.0 keys just below +0.0; the map is its own inverse.
    """
    bits = raw.dtype.itemsize * 8 - 1
    out = np.right_shift(raw, bits, out=out)
    np.bitwise_and(out, raw.dtype.type((1 << bits) - 1), out=out)
    return np.bitwise_xor(out, raw, out=out)


def _key_value(key: np.ndarray, prec: _Precision) -> np.ndarray:
    """float64 value of each order key."""
    raw = _order_key(np.ascontiguousarray(key, dtype=prec.raw))
    with np.errstate(invalid="ignore"):
        return _as_float(raw, prec).astype(np.float64)


def _keys_at_least(x: np.ndarray, prec: _Precision, strict: bool = False) -> np.ndarray:
    """Smallest order key whose value is >= x (> x if ``strict``), elementwise; a score passes iff its key does.

    The largest key (a NaN pattern, never a score here) means "nothing passes".
    """
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32).view(np.int32)
    inf = np.array([-np.inf, np.inf], np.float32).view(np.int32)
    if prec.raw is np.int16:
        f, inf = (f >> 16).astype(np.int16), (inf >> 16).astype(np.int16)
    lo_key, hi_key = _order_key(inf).astype(np.int64)
    base = _order_key(f).astype(np.int64)
    best = np.full(x.shape, np.iinfo(prec.raw).max, np.int64)
    for delta in range(3, -4, -1):  # f is x truncated after one rounding: the answer is a step or two from base
        k = np.clip(base + delta, lo_key, hi_key)
        v = _key_value(k, prec)
        ok = v > x if strict else v >= x
        if delta == -3 and (ok & (k > lo_key)).any():
            raise AssertionError("order key search window too narrow")
        best = np.where(ok, k, best)
    return best.astype(prec.raw)


def _gemm(gallery: Tensor, query: Tensor, out: Tensor) -> None:
    """``out (n, b) = gallery (n, d') @ query (b, d').T`` in the pass's precision."""
    if out.dtype == torch.float32:
        np.matmul(gallery.numpy(), query.numpy().T, out=out.numpy())
    else:
        torch.mm(gallery, query.T, out=out)


def _exact(query64: np.ndarray, qi: np.ndarray, gallery: np.ndarray, gi: np.ndarray, euclid: bool) -> np.ndarray:
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


def _workers() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _map_rows(pool: ThreadPoolExecutor, fn: Callable[[int, int], Any], n: int, step: int) -> List[Any]:
    """``fn(a, z)`` on contiguous row ranges (multiples of ``step``), one per worker thread (numpy frees the GIL)."""
    parts = _workers()
    size = -(-max(n, 1) // parts)
    size = -(-size // step) * step
    return list(pool.map(lambda a: fn(a, min(a + size, n)), range(0, n, size)))


def _keys_view(block: np.ndarray, thresholds: Sequence[np.ndarray], tmp: np.ndarray) -> np.ndarray:
    """Order keys of a score block; for non-negative thresholds the raw bits already compare right."""
    if all((th >= 0).all() for th in thresholds):
        return block
    return _order_key(block, out=tmp[: block.shape[0], : block.shape[1]])


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


def _pairs_between(
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
    """Queries per GEMM: ``chunk_size`` if given, else what the budget allows (at most _PASS_QUERIES)."""
    if chunk_size is not None:
        return min(int(chunk_size), total)
    return max(1, min(total, _PASS_QUERIES, (budget - fixed) // per_query))


def _positives(st: _Setup, qidx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
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


def _float64_ranks(st: _Setup, qidx: np.ndarray, gallery64: np.ndarray) -> np.ndarray:
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
def _bf16_recall_hits(st: _Setup, ranks: Sequence[int]) -> List[int]:
    """Recall@K hit counts from a bf16 pass: see :func:`_bf16_chunk_ranks`."""
    prec, n, d = _BF16, *st.gallery.shape
    g = _round(st.gallery, prec)
    ks = np.asarray(ranks, np.int64)
    hits = np.zeros(len(ks), np.int64)
    fixed = n * d * 2 + 4 * _workers() * _BLOCK_BYTES
    per_query = n * 2 + int(st.pos_count.max()) * _ROW_BYTES_PER_POSITIVE
    rows = _pass_queries(n, fixed, per_query, st.chunk_size, st.budget, st.query.shape[0])
    buf = torch.empty(n * rows, dtype=prec.dtype)
    wide: List[np.ndarray] = []  # queries whose windows are too wide to re-check item by item
    with ThreadPoolExecutor(_workers()) as pool:
        for i in range(0, st.query.shape[0], rows):
            q = _round(st.query[i : i + rows], prec)
            t = buf[: n * q.half.shape[0]].view(n, -1)
            _gemm(g.half, q.half, t)
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
    st: _Setup, i: int, raw: np.ndarray, q: _Rounded, g: _Rounded, ks: np.ndarray, pool: ThreadPoolExecutor
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For queries i.. with bf16 scores ``raw`` (N, B): the rank of each best positive p, exact wherever it decides
    a hit, whether a positive exists, and the queries left to :func:`_float64_ranks` (their rank counts no hit here).

    rank = #{s_j > s_p} + #{j < p: s_j == s_p}. p is found among the positives whose rounded score could be the best
    (re-scored in float64); then items whose rounded score lies above the window around s_p count as better, those
    below as worse, and those inside are re-scored in float64 -- only where some K falls inside the rank interval
    the window leaves open."""
    prec, (n, b), none = _BF16, raw.shape, np.iinfo(np.int16).max
    gx, q64 = st.gallery.numpy(), st.query[i : i + b].numpy().astype(np.float64)
    bounds = _chunk_bounds(q, g, prec, False)
    index, valid = _positives(st, np.arange(i, i + b))
    tv = np.where(valid, _as_float(raw[index, np.arange(b)[:, None]], prec), -np.inf)
    cand = valid & (tv >= bounds.at_least(tv.max(1))[:, None])
    qi, pj = np.nonzero(cand)
    s = np.full(cand.shape, -np.inf)
    s[qi, pj] = _exact(q64, qi, gx, index[qi, pj], False)
    sp = s.max(1)
    p = np.where(cand & (s == sp[:, None]), index, n).min(1)
    has_pos = valid.any(1)
    lo, hi = bounds.window(sp)
    hi, lo = _keys_at_least(hi, prec, strict=True), _keys_at_least(lo, prec)
    hi[~has_pos], lo[~has_pos] = none, none
    better, at_least = _count_at_least(raw, [hi, lo], pool)  # at_least includes p itself
    open_ = has_pos & ((better[:, None] < ks) & (ks <= at_least[:, None] - 1)).any(1)
    cols, size = np.flatnonzero(open_), (at_least - better)[open_]
    far = size > _wide_limit(n)
    rank = better.copy()
    rank[cols[far]] = ks.max()  # decided later from whole float64 rows
    for group in _column_groups(cols[~far], size[~far], 2**21):
        gi, qc = _pairs_between(raw, group, lo[group], hi[group], pool)
        if st.self_excluded:
            keep = gi != qc + i
            gi, qc = gi[keep], qc[keep]
        sw = _exact(q64, qc, gx, gi, False)
        win = (sw > sp[qc]) | ((sw == sp[qc]) & (gi < p[qc]))
        rank += np.bincount(qc[win], minlength=b)
    return rank, has_pos, cols[far]


# ---- exact top-k search --------------------------------------------------------------------------------------
METRICS = {"cosine": "cosine", "ip": "cosine", "inner_product": "cosine", "euclidean": "euclidean", "l2": "euclidean"}


@dataclass
class PreparedGallery:
    """A gallery rounded once for repeated exact searches with :func:`search_topk`."""

    features: Tensor  # (N, d) float32/64 on CPU: the values results are exact for
    metric: str  # 'cosine' (inner product of the given vectors, larger first) or 'euclidean'
    rounded: _Rounded
    precision: _Precision

    def __len__(self) -> int:
        return self.features.shape[0]


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric]


def _cpu_features(x: Tensor, name: str) -> Tensor:
    x = x.detach().cpu()
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half precision converts exactly
    if not _safe(x):
        raise ValueError(f"{name} contain NaN, inf or values too large to multiply")
    return x.contiguous()


def prepare_gallery(features: Tensor, metric: str = "cosine", few_queries: bool = False) -> PreparedGallery:
    """Round a gallery (N, d) once: bf16 where the CPU has bf16 arithmetic, else fp32 (then the pass is an fp32
    GEMM and only its few float32-ambiguous items are re-scored). ``few_queries``: fp32 too, since for a few queries
    rounding the gallery costs more than the GEMM it speeds up (float32 features are then used without a copy)."""
    metric = _check_metric(metric)
    x = _cpu_features(features, "gallery features")
    prec = _BF16 if BF16 and _native_bf16() and not few_queries else _FP32
    return PreparedGallery(x, metric, _round(x, prec, "gallery" if metric == "euclidean" else None), prec)


def _select(qc: np.ndarray, gi: np.ndarray, tv: np.ndarray, theta: np.ndarray, k: int, bounds: _Bounds):
    """Keep the candidates that can still be in some query's exact top-k; raise theta (k-th best stored score)."""
    order = np.lexsort((-tv, qc))
    qc, gi, tv = qc[order], gi[order], tv[order]
    counts = np.bincount(qc, minlength=len(theta))
    full = np.flatnonzero(counts >= k)
    starts = np.cumsum(counts) - counts
    theta[full] = np.maximum(theta[full], tv[starts[full] + k - 1])
    keep = tv >= bounds.at_least(theta)[qc]
    return qc[keep], gi[keep], tv[keep]


def _exact_top(qc: np.ndarray, gi: np.ndarray, s: np.ndarray, b: int, k: int, partial: bool = False) -> np.ndarray:
    """Positions (b, k) of each query's k best candidates by (descending exact score, ascending gallery index);
    ``partial``: a flat array of at most k per query."""
    order = np.lexsort((gi, -s, qc))
    counts = np.bincount(qc, minlength=b)
    starts = np.cumsum(counts) - counts
    if partial:
        return order[np.arange(len(order)) - np.repeat(starts, counts) < k]
    if counts.min() < k:  # cannot happen: the k best rounded scores always pass the threshold
        raise AssertionError("exact search lost candidates")
    return order[starts[:, None] + np.arange(k)]


def _head_theta(query: Tensor, gallery: Tensor, k: int, prec: _Precision) -> np.ndarray:
    """A first threshold: each query's k-th best rounded score over the first gallery rows (a query-major GEMM,
    so the selection runs along contiguous rows). Any k items scoring >= it bound the k-th exact score."""
    head = torch.empty(query.shape[0], min(len(gallery), max(16 * k, 16384)), dtype=prec.dtype)
    _gemm(query, gallery[: head.shape[1]], head)
    keys = _order_key(head.view(prec.raw_torch).numpy())
    return _key_value(np.partition(keys, -k, axis=1)[:, -k], prec)


def search_topk(
    queries: Tensor,
    gallery: Union[Tensor, PreparedGallery],
    k: int,
    metric: Optional[str] = None,
    *,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_BUDGET,
    progress: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Exact top-``k`` gallery items of each query: (scores (Q, k) float32, indices (Q, k) int64), best first.

    ``metric`` 'cosine' ranks by the inner product of the given vectors (normalise them for cosine), larger first;
    'euclidean' returns distances, smaller first. Ties go to the smaller gallery index. Results equal a float64
    brute force: a rounded (bf16) pass keeps, per query, every item whose bounded score error could place it in the
    top k, and only those are re-scored in float64. ``chunk_size`` queries (default 1024) share each pass over the
    gallery; their score blocks take about ``memory_budget`` / 2 bytes, beside the prepared gallery
    (:func:`prepare_gallery`: pass one to search the same gallery repeatedly). Runs on CPU.
    """
    q = _cpu_features(queries, "query features")
    if not isinstance(gallery, PreparedGallery):
        gallery = prepare_gallery(gallery, metric or "cosine", few_queries=q.shape[0] <= _FEW_QUERIES)
    elif metric is not None and _check_metric(metric) != gallery.metric:
        raise ValueError(f"gallery was prepared for {gallery.metric}, not {metric}")
    n, d = gallery.features.shape
    if q.shape[1] != d:
        raise ValueError(f"queries have {q.shape[1]} dimensions, the gallery {d}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer between 0 and the gallery size {n}, got {k}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    scores = torch.empty(q.shape[0], k, dtype=torch.float32)
    index = torch.empty(q.shape[0], k, dtype=torch.int64)
    if k == 0:
        return scores, index
    prec, g, euclid = gallery.precision, gallery.rounded, gallery.metric == "euclidean"
    item = torch.empty(0, dtype=prec.dtype).element_size()
    rows = min(q.shape[0], int(chunk_size or _PASS_QUERIES))  # many queries per pass over the gallery
    step = max(1, min(n, memory_budget // (2 * rows * item)))  # gallery rows per score block
    gx = gallery.features.numpy()
    bar = tqdm(total=-(-q.shape[0] // rows) * -(-n // step), desc="search", disable=not progress, leave=False)
    with ThreadPoolExecutor(_workers()) as pool, torch.inference_mode(), bar:
        buf = torch.empty(step * rows, dtype=prec.dtype)
        for i in range(0, q.shape[0], rows):
            qx = q[i : i + rows]
            b = qx.shape[0]
            qr = _round(qx, prec, "query" if euclid else None)
            q64 = qx.numpy().astype(np.float64)
            bounds = _chunk_bounds(qr, g, prec, euclid)
            theta = _head_theta(qr.half, g.half, k, prec)  # k-th best rounded score so far, per query
            qc, gi, tv = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))
            for a in range(0, n, step):
                t = buf[: min(step, n - a) * b].view(-1, b)
                _gemm(g.half[a : a + step], qr.half, t)
                raw = t.view(prec.raw_torch).numpy()
                lo = _keys_at_least(bounds.at_least(theta), prec)
                r, c = _pairs_between(raw, np.arange(b), lo, None, pool)
                qc, gi = np.concatenate([qc, c]), np.concatenate([gi, r + a])
                tv = np.concatenate([tv, _as_float(raw[r, c], prec).astype(np.float64)])
                qc, gi, tv = _select(qc, gi, tv, theta, k, bounds)
                if len(qc) > 4 * b * k + _POOL_PAIRS:  # massive ties: keep each query's exact top k so far
                    keep = _exact_top(qc, gi, _exact(q64, qc, gx, gi, euclid), b, k, partial=True)
                    qc, gi, tv = qc[keep], gi[keep], tv[keep]
                bar.update()
            s = _exact(q64, qc, gx, gi, euclid)
            take = _exact_top(qc, gi, s, b, k)
            best = s[take]
            scores[i : i + b] = torch.from_numpy(np.sqrt(np.maximum(-2 * best, 0)) if euclid else best)
            index[i : i + b] = torch.from_numpy(gi[take])
    return scores, index
