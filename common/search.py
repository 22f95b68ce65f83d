"""Ranking a gallery: the one search of the toolkit (exact, or through a faiss index), and exact top-k of a score
block. Inference, the search service, ablation and post-processing rank through :func:`search`; the metrics and
re-ranking reduce their score blocks with :func:`exact_topk`.

**Tie rule.** Gallery items are ordered by descending similarity (ascending distance), ties broken by ascending
gallery index: the order of a stable brute-force sort.

**Exact search.** A rounded pass (a bf16 GEMM on CPUs with bf16 arithmetic, else fp32; :mod:`common._bf16`) keeps,
per query, every item whose bounded score error could place it in the top k, and only those are re-scored in
float64: results equal a float64 brute force whatever the pass. ``chunk_size`` queries (default 1,024) share each
pass over the gallery, whose score blocks take about ``memory_budget`` / 2 bytes beside the rounded gallery
(:func:`prepare_gallery`: prepare once to search the same gallery repeatedly). Runs on CPU.

**Approximate search.** An :class:`Index` of kind 'ivf' / 'hnsw' (built by :func:`common.ann.build_index`) answers
through faiss instead; it may find fewer than k items (id -1, score NaN).

    scores, ids = search(queries, gallery_features, k=10, metric="cosine", exclude=[3, None])
"""

from __future__ import annotations

import numbers
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from common import _bf16

__all__ = ["search", "exact_topk", "prepare_gallery", "PreparedGallery", "Index", "METRICS", "ACCELERATE"]

METRICS = {"cosine": "cosine", "ip": "cosine", "inner_product": "cosine", "euclidean": "euclidean", "l2": "euclidean"}
ACCELERATE = ("auto", "bf16", "off")  # the rounded pass: bf16 where the CPU has it (auto), bf16, or fp32 (off)
DEFAULT_BUDGET = 512 * 2**20
_FEW_QUERIES = 256  # an unprepared gallery and up to this many queries: an fp32 pass (rounding costs more)
_POOL_PAIRS = 2**20  # candidates beyond 4 k per query that trigger an exact pruning


# ---- top-k of a score block ------------------------------------------------------------------------------------
def exact_topk(scores: Tensor, k: int, largest: bool = True) -> Tuple[Tensor, Tensor]:
    """Top-``k`` of each row of a score matrix (smallest ``k`` if not ``largest``), ties by ascending index.

    Identical to ``torch.sort(-scores, stable=True)[..., :k]`` (``scores`` when not ``largest``), but O(N) per row:
    ``torch.topk`` of k + 1 shows the rows whose k-th value continues past the boundary, and only in those the
    lowest-index items of that value are kept. Shapes: scores (B, N) -> values (B, k), indices (B, k) int64.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got {tuple(scores.shape)}")
    b, n = scores.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= n:
        raise ValueError(f"k={k} must be an integer between 0 and the row length {n}")
    k = int(k)
    if k == 0:
        return scores.new_empty(b, 0), torch.empty(b, 0, dtype=torch.int64, device=scores.device)
    vals, idx = torch.topk(scores, min(k + 1, n), dim=1, largest=largest)
    tied = (vals[:, k] == vals[:, k - 1]).nonzero().flatten().tolist() if k < n else []
    vals, idx = vals[:, :k], idx[:, :k].clone()
    for r in tied:  # boundary ties: the lowest-index items of the k-th value
        kth = vals[r, -1]
        t = int((vals[r] == kth).sum())
        idx[r, k - t :] = (scores[r] == kth).nonzero().flatten()[:t]
    idx, perm = idx.sort(1)
    vals = vals.gather(1, perm)
    order = vals.sort(dim=1, descending=largest, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


# ---- galleries and indexes -------------------------------------------------------------------------------------
@dataclass
class PreparedGallery:
    """A gallery rounded once for repeated exact searches."""

    features: Tensor  # (N, d) float32/64 on CPU: the values results are exact for
    metric: str  # 'cosine' (inner product of the given vectors, larger first) or 'euclidean'
    rounded: _bf16.Rounded
    precision: _bf16.Precision

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass
class Index:
    """A gallery indexed for search: exact (a :class:`PreparedGallery`) or a faiss IVF / HNSW index."""

    kind: str  # 'exact' | 'ivf' | 'hnsw'
    metric: str  # 'cosine' (inner product, larger first) | 'euclidean'
    size: int
    dim: int
    exact: Optional[PreparedGallery] = None  # kind 'exact'
    faiss_index: Any = None  # kinds 'ivf' / 'hnsw'
    build_seconds: Optional[float] = None  # training + adding (None when loaded from a file)
    tune_seconds: Optional[float] = None  # measuring Recall@10 and widening the search to reach the target
    recall_at_10: Optional[float] = None  # measured at build time against the exact search

    def describe(self) -> str:
        setting = {
            "ivf": lambda: f"nlist={self.faiss_index.nlist}, nprobe={self.faiss_index.nprobe}",
            "hnsw": lambda: f"M={self.faiss_index.hnsw.nb_neighbors(1)}, efSearch={self.faiss_index.hnsw.efSearch}",
        }.get(self.kind, lambda: "")()
        text = f"{self.kind} index ({self.metric}{', ' + setting if setting else ''}) over {self.size} x {self.dim}"
        if self.kind != "exact" and self.build_seconds is not None:
            text += f", built in {self.build_seconds:.1f} s"
        if self.tune_seconds is not None:
            text += f" + {self.tune_seconds:.1f} s tuning"
        if self.recall_at_10 is not None:
            text += f", Recall@10 vs exact search {self.recall_at_10:.4f}"
        return text


def check_metric(metric: str) -> str:
    """The canonical name ('cosine' or 'euclidean') of a metric name."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric]


def cpu_features(x: Tensor, name: str) -> Tensor:
    """Detached, contiguous float32/64 CPU rows, refused when empty, non-finite or too large to multiply."""
    x = x.detach().cpu()
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half precision converts exactly
    if not _bf16.safe(x):
        raise ValueError(f"{name} contain NaN, inf or values too large to multiply")
    return x.contiguous()


def _check_accelerate(accelerate: str) -> str:
    if accelerate not in ACCELERATE:
        raise ValueError(f"accelerate must be one of {ACCELERATE}, got {accelerate!r}")
    if accelerate == "bf16" and not _bf16.native_bf16():
        raise ValueError("accelerate='bf16' needs a CPU with bf16 arithmetic (AMX or AVX512-BF16)")
    return accelerate


def prepare_gallery(
    features: Tensor, metric: str = "cosine", few_queries: bool = False, accelerate: str = "auto"
) -> PreparedGallery:
    """Round a gallery (N, d) once for the pass ``accelerate`` chooses: 'auto' rounds to bf16 where the CPU has
    bf16 arithmetic, else to fp32 (then the pass is an fp32 GEMM and only its few float32-ambiguous items are
    re-scored); 'bf16' / 'off' choose bf16 / fp32. ``few_queries`` (with 'auto'): fp32 too, since for a few queries
    rounding the gallery costs more than the GEMM it speeds up (float32 features are then used without a copy)."""
    metric = check_metric(metric)
    accelerate = _check_accelerate(accelerate)
    x = cpu_features(features, "gallery features")
    bf16 = accelerate == "bf16" or (accelerate == "auto" and _bf16.native_bf16() and not few_queries)
    prec = _bf16.BF16_PASS if bf16 else _bf16.FP32_PASS
    return PreparedGallery(x, metric, _bf16.round_rows(x, prec, "gallery" if metric == "euclidean" else None), prec)


# ---- the exact pass --------------------------------------------------------------------------------------------
def _select(qc: np.ndarray, gi: np.ndarray, tv: np.ndarray, theta: np.ndarray, k: int, bounds: _bf16.Bounds):
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


def _head_theta(query: Tensor, gallery: Tensor, k: int, prec: _bf16.Precision) -> np.ndarray:
    """A first threshold: each query's k-th best rounded score over the first gallery rows (a query-major GEMM,
    so the selection runs along contiguous rows). Any k items scoring >= it bound the k-th exact score."""
    head = torch.empty(query.shape[0], min(len(gallery), max(16 * k, 16384)), dtype=prec.dtype)
    _bf16.gemm(query, gallery[: head.shape[1]], head)
    keys = _bf16.order_key(head.view(prec.raw_torch).numpy())
    return _bf16.key_value(np.partition(keys, -k, axis=1)[:, -k], prec)


@torch.inference_mode()
def _exact_search(
    q: Tensor, gallery: PreparedGallery, k: int, chunk_size: Optional[int], memory_budget: int, progress: bool
) -> Tuple[np.ndarray, np.ndarray]:
    """float64 scores (inner product, or -|q - g|^2 / 2) and gallery indices (Q, k) of the exact top k, best first."""
    n = len(gallery)
    best, index = np.empty((q.shape[0], k)), np.empty((q.shape[0], k), np.int64)
    prec, g, euclid = gallery.precision, gallery.rounded, gallery.metric == "euclidean"
    item = torch.empty(0, dtype=prec.dtype).element_size()
    rows = min(q.shape[0], int(chunk_size or _bf16.PASS_QUERIES))  # many queries per pass over the gallery
    step = max(1, min(n, memory_budget // (2 * rows * item)))  # gallery rows per score block
    gx = gallery.features.numpy()
    bar = tqdm(total=-(-q.shape[0] // rows) * -(-n // step), desc="search", disable=not progress, leave=False)
    with ThreadPoolExecutor(_bf16.workers()) as pool, bar:
        buf = torch.empty(step * rows, dtype=prec.dtype)
        for i in range(0, q.shape[0], rows):
            qx = q[i : i + rows]
            b = qx.shape[0]
            qr = _bf16.round_rows(qx, prec, "query" if euclid else None)
            q64 = qx.numpy().astype(np.float64)
            bounds = _bf16.chunk_bounds(qr, g, prec, euclid)
            theta = _head_theta(qr.half, g.half, k, prec)  # k-th best rounded score so far, per query
            qc, gi, tv = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))
            for a in range(0, n, step):
                t = buf[: min(step, n - a) * b].view(-1, b)
                _bf16.gemm(g.half[a : a + step], qr.half, t)
                raw = t.view(prec.raw_torch).numpy()
                lo = _bf16.keys_at_least(bounds.at_least(theta), prec)
                r, c = _bf16.pairs_between(raw, np.arange(b), lo, None, pool)
                qc, gi = np.concatenate([qc, c]), np.concatenate([gi, r + a])
                tv = np.concatenate([tv, _bf16.as_float(raw[r, c], prec).astype(np.float64)])
                qc, gi, tv = _select(qc, gi, tv, theta, k, bounds)
                if len(qc) > 4 * b * k + _POOL_PAIRS:  # massive ties: keep each query's exact top k so far
                    keep = _exact_top(qc, gi, _bf16.exact_scores(q64, qc, gx, gi, euclid), b, k, partial=True)
                    qc, gi, tv = qc[keep], gi[keep], tv[keep]
                bar.update()
            s = _bf16.exact_scores(q64, qc, gx, gi, euclid)
            take = _exact_top(qc, gi, s, b, k)
            best[i : i + b], index[i : i + b] = s[take], gi[take]
    return best, index


def _faiss_search(index: Index, q: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """An ANN index's top k: inner products or distances (faiss gives squared ones); missing: id -1, score NaN."""
    scores, ids = index.faiss_index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)
    scores = scores.astype(np.float32)
    if index.metric == "euclidean":
        scores = np.sqrt(np.maximum(scores, 0))
    scores[ids < 0] = np.nan
    return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))


# ---- the search ------------------------------------------------------------------------------------------------
def _excluded(exclude: Union[Tensor, Sequence[Optional[int]], None], q: int, n: int) -> Optional[Tensor]:
    """One gallery index per query (-1: none) as an int64 tensor, or None when nothing is excluded."""
    if exclude is None:
        return None
    if isinstance(exclude, Tensor):
        ex = exclude.detach().cpu().to(torch.int64).flatten()
    else:
        ex = torch.tensor([-1 if e is None else int(e) for e in exclude], dtype=torch.int64)
    if ex.numel() != q or (ex >= n).any():
        raise ValueError(f"exclude must hold one gallery index (< {n}) or None per query ({q}), got {ex.tolist()}")
    return ex if (ex >= 0).any() else None


def _drop(scores: Tensor, ids: Tensor, ex: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Each row's first k results other than its excluded index; a row short of k ends in id -1, score NaN."""
    drop = (ids == ex[:, None]) & (ex[:, None] >= 0)
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices[:, :k]
    scores, ids, gone = scores.gather(1, order), ids.gather(1, order), drop.gather(1, order)
    return scores.masked_fill(gone, float("nan")), ids.masked_fill(gone, -1)


def search(
    queries: Tensor,
    gallery: Union[Tensor, PreparedGallery, None],
    k: int,
    metric: Optional[str] = None,
    scale: float = 1.0,
    exclude: Union[Tensor, Sequence[Optional[int]], None] = None,
    index: Optional[Index] = None,
    *,
    accelerate: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_BUDGET,
    progress: bool = False,
) -> Tuple[Tensor, Tensor]:
    """The ``k`` best gallery items of each query (Q, d): (scores (Q, k), gallery indices (Q, k) int64), best first.

    ``metric`` 'cosine' ranks by the inner product of the given vectors (normalise them for cosine), larger first,
    the score divided by ``scale`` (REIR's concatenated unit vectors: the mean per-learner cosine); 'euclidean'
    returns distances, smaller first. Default: the prepared gallery's / index's metric, else 'cosine'.
    ``exclude``: per query one gallery index it never retrieves (the query itself), or None; k may then still be
    the gallery size, and a row that loses an item ends in id -1, score NaN. ``gallery``: features (N, d), or a
    :func:`prepare_gallery` result; ignored when ``index`` is given (its kind 'exact' holds the prepared gallery).
    Exact results (see the module docstring) equal a float64 brute force under the tie rule, their scores are
    float64 when queries and gallery are, else float32; ``accelerate`` chooses the rounded pass (:data:`ACCELERATE`;
    see :func:`prepare_gallery`), never the results. ``chunk_size`` / ``memory_budget`` / ``progress``: exact only.
    """
    _check_accelerate(accelerate)
    if index is not None and index.kind == "exact":
        gallery, index = index.exact, None
    if index is not None:
        name, n, dim = index.metric, index.size, index.dim
    elif isinstance(gallery, PreparedGallery):
        name, (n, dim) = gallery.metric, gallery.features.shape
    elif gallery is None:
        raise ValueError("search needs gallery features or an index")
    elif gallery.dim() != 2 or gallery.shape[0] == 0:
        raise ValueError(f"gallery features must be a non-empty (n, d) tensor, got shape {tuple(gallery.shape)}")
    else:
        name, (n, dim) = check_metric(metric or "cosine"), gallery.shape
    if metric is not None and check_metric(metric) != name:
        raise ValueError(f"the gallery was prepared for {name}, not {metric}")
    q = cpu_features(queries, "query features")
    if q.shape[1] != dim:
        raise ValueError(f"queries have {q.shape[1]} dimensions, the gallery {dim}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer between 0 and the gallery size {n}, got {k}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    ex = _excluded(exclude, q.shape[0], n)
    wanted = min(int(k) + (ex is not None), n)
    divide = scale if name == "cosine" and scale != 1 else None
    if index is not None:
        scores, ids = _faiss_search(index, q, wanted)
        scores = scores if divide is None else scores / divide
    else:
        if not isinstance(gallery, PreparedGallery):
            gallery = prepare_gallery(gallery, name, q.shape[0] <= _FEW_QUERIES, accelerate)
        best, ids = np.empty((q.shape[0], 0)), np.empty((q.shape[0], 0), np.int64)
        if wanted:
            best, ids = _exact_search(q, gallery, wanted, chunk_size, memory_budget, progress)
        best = np.sqrt(np.maximum(-2 * best, 0)) if name == "euclidean" else best
        best = best if divide is None else best / divide
        dtype = torch.promote_types(q.dtype, gallery.features.dtype)
        scores, ids = torch.from_numpy(best).to(dtype), torch.from_numpy(ids)
    return (scores, ids) if ex is None else _drop(scores, ids, ex, int(k))
