"""Retrieval metrics -- Recall@K, MAP@R, R-precision -- exact and memory-bounded: the reference definitions.

Similarity is the inner product of the given features. The caller L2-normalises them, and for unit vectors
``|a - b|^2 = 2 - 2 a.b``, so ranking by inner product equals ranking by Euclidean distance.

**Definitions.** R = the positives of a query in the gallery (same label, itself excluded). Recall@K: a query hits
at K when a positive is among its K best items, averaged over all queries. AP@R = (1/R) sum_{i<=R} P@i * rel_i over
its R best items; R-precision = the positives among its R best, divided by R; MAP@R and R-precision average over the
queries with R > 0 (as in pytorch-metric-learning). :func:`_precision_at_r` computes both for every path here, and
:func:`metrics_from_ranking` applies the same definitions to ranked lists (post-processed rankings).

**Tie rule.** For one query, gallery items are ordered by descending similarity, ties broken by ascending gallery
index: exactly the order of the stable brute force ``torch.sort(-s, stable=True)``. Every metric here is identical
(not approximately equal) to that brute force run on the same similarity values. (BLAS may round a dot product
differently for different chunk shapes; that moves a score by at most one ulp and only matters for exact ties.)

**Self-exclusion.** Without a gallery the query set is its own gallery and each query's own row is removed *by
index*, so an exact duplicate of a query still counts as a neighbour (at rank 1).

**The exact path.** Queries go in chunks of rows: a score block ``query[i:i+B] @ gallery.T``; Recall@K needs no sort
(:func:`_positive_ranks` counts the items above the best positive), AP needs each row's exact top-R
(:func:`common.search.exact_topk`). The chunk size is derived from ``memory_budget`` counting every temporary of
shape ``rows x N_gallery`` (the score block, plus on CUDA a float32 counting block; on CPU the counting buffer is a
fixed block of a few rows that stays in cache), so the peak extra memory is about ``memory_budget`` whatever the data
set size. Everything stays on the features' device (CPU or CUDA).

**Acceleration** (``accelerate``, never a change of results; :data:`ACCELERATE`): on CPU, float32/64 score blocks
are computed by numpy's BLAS and counted with numpy ('numpy'; its OpenBLAS threads follow ``OPENBLAS_NUM_THREADS``),
and Recall@K can come from a bf16 GEMM under a proven error bound with the undecided items re-scored in float64
('bf16'; :mod:`common._bf16`: a bf16 copy of the gallery plus at most 1,024 queries' bf16 scores). 'auto' takes
both where they apply (bf16 where the CPU has bf16 arithmetic); 'off' keeps torch ops only, the path CUDA takes.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from common import _bf16
from common.search import exact_topk

__all__ = [
    "recall_at_k",
    "map_at_r",
    "r_precision",
    "retrieval_metrics",
    "metrics_from_ranking",
    "required_topk",
    "ACCELERATE",
]

Labels = Union[Tensor, np.ndarray, Sequence[int]]
DEFAULT_BUDGET = 512 * 2**20
_ROW_BYTES_PER_POSITIVE = 96  # gathered positive indices/scores, top-R indices, cumsums (int64/float64 each)
ACCELERATE = ("auto", "bf16", "numpy", "off")  # see the module docstring
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
    numpy: bool = False  # CPU float32/64 scores through numpy (see _numpy_path)
    bf16: bool = False  # Recall@K may take the bf16 pass (when the features are safe to round)


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


def _label_blocks(query_labels: Tensor, gallery_labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gallery indices sorted by label (ascending index within a label) and, per query, the offset and size of its
    label's block in that order (size 0 when the gallery lacks the label): a label sort, no Q x N work."""
    sorted_labels, order = torch.sort(gallery_labels, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.searchsorted(uniq, query_labels).clamp(max=uniq.numel() - 1)
    size = torch.where(uniq[slot] == query_labels, counts[slot], torch.zeros_like(slot))
    return order, starts[slot], size


def _routes(accelerate: str, features: Tensor) -> Tuple[bool, bool]:
    """(numpy, bf16) for ``accelerate`` (:data:`ACCELERATE`): whether the CPU float32/64 score blocks go through
    numpy, and whether Recall@K may take the bf16 pass."""
    if accelerate not in ACCELERATE:
        raise ValueError(f"accelerate must be one of {ACCELERATE}, got {accelerate!r}")
    if accelerate == "bf16" and not _bf16.native_bf16():
        raise ValueError("accelerate='bf16' needs a CPU with bf16 arithmetic (AMX or AVX512-BF16)")
    cpu = features.device.type == "cpu" and features.dtype in (torch.float32, torch.float64)
    return cpu and accelerate != "off", cpu and accelerate in ("auto", "bf16") and _bf16.native_bf16()


def _setup(
    query_features: Tensor,
    query_labels: Labels,
    gallery_features: Optional[Tensor],
    gallery_labels: Optional[Labels],
    chunk_size: Optional[int],
    memory_budget: int,
    accelerate: str = "auto",
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
    numpy, bf16 = _routes(accelerate, query)
    order, pos_start, pos_count = _label_blocks(ql, gl)
    num_relevant = pos_count - int(self_excluded)
    rows = _chunk_rows(query, gallery, int(pos_count.max()), chunk_size, memory_budget, numpy)
    return _Setup(
        query,
        gallery,
        ql,
        gl,
        self_excluded,
        order,
        pos_start,
        pos_count,
        num_relevant,
        rows,
        chunk_size,
        memory_budget,
        numpy,
        bf16,
    )


def _chunk_rows(
    query: Tensor, gallery: Tensor, max_pos: int, chunk_size: Optional[int], budget: int, numpy: bool = True
) -> int:
    """Queries per chunk: ``chunk_size`` if given, else as many rows as fit in ``budget`` bytes."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        return min(int(chunk_size), query.shape[0])
    n, cpu = gallery.shape[0], gallery.device.type == "cpu"
    per_row = n * gallery.element_size() + max_pos * _ROW_BYTES_PER_POSITIVE
    scratch = _new_scratch(query.shape[0], gallery, allocate=False, numpy=numpy)
    if cpu:  # one cache-sized counting block, whatever the chunk
        budget -= scratch[0] * scratch[1] * (1 if _numpy_path(gallery, numpy) else 4)
    else:  # a float32 counting block per chunk row
        per_row += 4 * n
    return max(1, min(query.shape[0], budget // per_row))


def _numpy_path(t: Tensor, numpy: bool) -> bool:
    """CPU float32/64 goes through numpy (unless ``numpy`` is off): OpenBLAS GEMM and single-threaded counting
    (see _matmul_into, _count)."""
    return numpy and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _new_scratch(rows: int, gallery: Tensor, allocate: bool = True, numpy: bool = True):
    """Counting buffer: on CPU a cache-sized block of rows (numpy bool, width padded to whole uint64 words, or
    torch float32); elsewhere a float32 block as tall as the chunk. ``allocate=False`` returns only its shape."""
    n = gallery.shape[0]
    if gallery.device.type != "cpu":
        shape = (rows, n)
    else:
        shape = (max(1, min(rows, _CPU_BLOCK_BYTES // (n * gallery.element_size()))), n)
    if _numpy_path(gallery, numpy):
        shape = (shape[0], -(-n // 8) * 8)
        return np.zeros(shape, dtype=bool) if allocate else shape
    return torch.empty(shape, dtype=torch.float32, device=gallery.device) if allocate else shape


def _matmul_into(query: Tensor, gallery: Tensor, out: Tensor, numpy: bool) -> None:
    """``out = query @ gallery.T``. On CPU float32/64 this calls numpy's BLAS (OpenBLAS in the numpy wheels): on an
    AMD EPYC (Zen 4) it ran sgemm 1.6x faster than torch's MKL, which dispatches non-Intel CPUs to slower kernels."""
    if _numpy_path(out, numpy):
        np.matmul(query.numpy(), gallery.numpy().T, out=out.numpy())
    else:
        torch.mm(query, gallery.T, out=out)


def _chunks(st: _Setup) -> Iterator[_Chunk]:
    """Yield score blocks ``query[i:i+B] @ gallery.T`` computed into two reused buffers."""
    n, rows = st.gallery.shape[0], st.rows
    scores = torch.empty(rows, n, dtype=st.query.dtype, device=st.query.device)
    scratch = _new_scratch(rows, st.gallery, numpy=st.numpy)
    for i in range(0, st.query.shape[0], rows):
        b = min(rows, st.query.shape[0] - i)
        s = scores[:b]
        _matmul_into(st.query[i : i + b], st.gallery, s, st.numpy)
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


def _precision_at_r(relevant: Tensor, num_relevant: Tensor) -> Tuple[Tensor, Tensor]:
    """AP@R and R-precision of each query (float64, (Q,)) from the relevance of its ranked list (Q, T), T >= its R:
    the one place both are computed. Queries with R = 0 hold 0 (:func:`_means` leaves them out)."""
    q, t = relevant.shape
    if t == 0:
        zeros = torch.zeros(q, dtype=torch.float64, device=relevant.device)
        return zeros, zeros
    positions = torch.arange(1, t + 1, device=relevant.device, dtype=torch.float64)
    rel = relevant & (positions <= num_relevant[:, None])
    hits = rel.cumsum(1, dtype=torch.float64)
    denom = num_relevant.clamp(min=1).double()
    return (hits / positions * rel).sum(1) / denom, hits[:, -1] / denom


def _means(ap: Tensor, rp: Tensor, num_relevant: Tensor) -> Dict[str, float]:
    """MAP@R and R-precision: means over the queries with R > 0 (PML's default); 0.0 if no query has one."""
    valid = num_relevant > 0
    n = max(int(valid.sum()), 1)
    return {"map@r": float(ap[valid].sum()) / n, "r_precision": float(rp[valid].sum()) / n}


def _chunk_precision(st: _Setup, ch: _Chunk) -> Tuple[Tensor, Tensor]:
    """AP@R and R-precision of a chunk's queries from each row's exact top-R under the tie rule."""
    _, index = exact_topk(ch.scores, int(ch.num_relevant.max()))  # self is -inf and R <= N - 1: never retrieved
    return _precision_at_r(st.gallery_labels[index] == ch.labels[:, None], ch.num_relevant)


@torch.inference_mode()
def _evaluate(st: _Setup, ranks: Sequence[int], want_recall: bool, want_ap: bool) -> Dict[str, float]:
    """One pass over the query chunks computing the requested metrics."""
    q = st.query.shape[0]
    if want_recall and not want_ap and st.bf16 and _bf16.safe(st.query, st.gallery):
        hits = _bf16.recall_hits(st, ranks, _ROW_BYTES_PER_POSITIVE)
        return {f"recall@{k}": h / q for k, h in zip(ranks, hits)}
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
            ap[sl], rp[sl] = _chunk_precision(st, ch)
    out = {f"recall@{k}": h / q for k, h in zip(ranks, hits.tolist())}
    return {**out, **_means(ap, rp, st.num_relevant)} if want_ap else out


def recall_at_k(
    query_features: Tensor,
    query_labels: Labels,
    ranks: Sequence[int],
    gallery_features: Optional[Tensor] = None,
    gallery_labels: Optional[Labels] = None,
    *,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_BUDGET,
    accelerate: str = "auto",
) -> List[float]:
    """Recall@K: fraction of queries whose best positive ranks in the top K (one value per rank, same order).

    Exact and sort-free: with p the best positive (max score, lowest index among equal scores), its 0-based rank is
    #{i: s_i > s_p} + #{i < p: s_i == s_p}; a hit at K iff a positive exists and rank < K.
    Shapes: query_features (Q, d), gallery_features (N, d) or None (queries are their own gallery, self removed by
    index); labels (Q,) / (N,) as list, numpy array or tensor. ``chunk_size`` (rows) overrides ``memory_budget``.
    ``accelerate``: see the module docstring (the bf16 pass is exact against a float64 brute force).
    Raises ValueError for a rank above the gallery size (minus one when self-excluded) or mismatched lengths.
    """
    st = _setup(query_features, query_labels, gallery_features, gallery_labels, chunk_size, memory_budget, accelerate)
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
    accelerate: str = "auto",
) -> float:
    """MAP@R (Musgrave et al. 2020, as in pytorch-metric-learning), averaged over queries with R > 0.

    R = number of positives of the query in the gallery (self excluded); AP@R = (1/R) sum_{i<=R} P@i * rel_i over the
    exact top-R under the tie rule. Queries with R = 0 are skipped (PML's default); 0.0 if no query has a positive.
    ``ranks`` is accepted for a signature shared with :func:`recall_at_k` and ignored. Shapes as in recall_at_k.
    """
    st = _setup(query_features, query_labels, gallery_features, gallery_labels, chunk_size, memory_budget, accelerate)
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
    accelerate: str = "auto",
) -> float:
    """R-precision (as in pytorch-metric-learning): fraction of positives in the exact top-R, mean over R > 0.

    Queries with R = 0 are skipped; 0.0 if none has a positive. ``ranks`` is ignored. Shapes as in recall_at_k.
    """
    st = _setup(query_features, query_labels, gallery_features, gallery_labels, chunk_size, memory_budget, accelerate)
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
    accelerate: str = "auto",
) -> Dict[str, float]:
    """``{'recall@K': ..., 'map@r': ..., 'r_precision': ...}`` from a single pass over the score chunks.

    Same arguments, shapes and errors as :func:`recall_at_k`; each score block is computed once and shared.
    """
    st = _setup(query_features, query_labels, gallery_features, gallery_labels, chunk_size, memory_budget, accelerate)
    ranks = _check_ranks(ranks, st.gallery.shape[0] - int(st.self_excluded))
    return _evaluate(st, ranks, True, True)


# ---- the same definitions on ranked lists ----------------------------------------------------------------------
def _list_labels(query_labels: Labels, gallery_labels: Optional[Labels], q: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(query labels, gallery labels, R per query) on CPU; ``gallery_labels=None``: the query set, self excluded."""
    cpu = torch.device("cpu")
    ql = _as_labels(query_labels, q, cpu, "query_labels")
    gl = ql if gallery_labels is None else _as_labels(gallery_labels, len(gallery_labels), cpu, "gallery_labels")
    return ql, gl, _label_blocks(ql, gl)[2] - int(gallery_labels is None)


def required_topk(ranks: Sequence[int], query_labels: Labels, gallery_labels: Optional[Labels] = None) -> int:
    """Smallest list length for which :func:`metrics_from_ranking` can give Recall@max(ranks) and MAP@R: max(ranks)
    and the largest number of positives of a query. ``gallery_labels=None``: the query set is the gallery."""
    return max(max(ranks), int(_list_labels(query_labels, gallery_labels, len(query_labels))[2].max()))


def metrics_from_ranking(
    indices: Tensor, query_labels: Labels, gallery_labels: Optional[Labels] = None, ranks: Sequence[int] = (1,)
) -> Dict[str, float]:
    """Recall@K, MAP@R and R-precision from ranked gallery indices (Q, T), best first (e.g. re-ranked lists), as
    defined above (Recall@K averaged over all queries; MAP@R and R-precision over queries with R > 0).

    ``gallery_labels=None``: the query set is the gallery and the lists exclude each query itself. Needs
    T >= max(ranks) and T >= every query's R (see :func:`required_topk`); ValueError otherwise.
    """
    indices = indices.detach().cpu()
    q, width = indices.shape
    ql, gl, r = _list_labels(query_labels, gallery_labels, q)
    ranks = [int(k) for k in ranks]
    if not ranks or min(ranks) < 1 or max(ranks) > width or int(r.max()) > width:
        raise ValueError(
            f"ranked lists of length {width} cannot give Recall@{ranks} and MAP@R with R up to "
            f"{int(r.max())}: rank at least {max([*ranks, int(r.max())])} items"
        )
    rel = gl[indices] == ql[:, None]  # (Q, T)
    out = {f"recall@{k}": float(rel[:, :k].any(1).sum()) / q for k in ranks}
    return {**out, **_means(*_precision_at_r(rel, r), r)}
