"""Post-processing of a retrieval ranking: k-reciprocal re-ranking, alpha-query expansion, database-side
augmentation and flip test, memory-bounded so that they run at Stanford Online Products scale (60,502 images).

Features are rows of a matrix, ranked by inner product after L2 normalisation (every public function normalises its
inputs; for REIR's concatenated per-learner unit vectors this divides by sqrt(E) and keeps the ranking). The query
set is either its own gallery (``gallery=None``: CUB/CARS/SOP protocol, each query's own row excluded *by index*) or
a separate gallery. Rankings and neighbour lists come from :func:`common.search.search` (exact, ties broken by
ascending gallery index, as in :mod:`common.metrics`); the metrics of the lists from
:func:`common.metrics.metrics_from_ranking`.

**Memory.** Nothing of size ``N x N`` is built: the search and the re-ranking graph go through blocks of query rows
(``memory_budget`` bytes per block) reduced at once to neighbour lists of size k; re-ranking keeps sparse
k-reciprocal encodings (about 100 non-zeros a row with the defaults) and an inverted index of them.

**Re-ranking** (Zhong et al., CVPR 2017, as in fast-reid's ``evaluation/rerank.py``): with ``d`` the squared
Euclidean distance divided by its maximum over the row (all query and gallery items), ``R(i, k)`` the k-reciprocal
neighbours of i among its k+1 nearest (itself first), ``R*(i)`` = R(i, k1) plus R(c, round(k1/2)) of every c in
R(i, k1) that shares more than 2/3 of it, ``V[i, j] = exp(-d[i, j])`` on R*(i), normalised to sum 1, averaged over
the k2 nearest rows of i (local query expansion), ``jaccard = 1 - m / (2 - m)`` with ``m = sum_k min(V[i, k], V[j, k])``
and the final distance ``(1 - lambda) * jaccard + lambda * d``. For a block of queries the final distance to every
gallery item is formed in one ``rows x G`` block (a second pass of similarities, plus the Jaccard terms added from
the inverted index of V) and reduced to its top-``topk`` at once: the exact result of the dense algorithm.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from common.errors import UserError
from common.search import exact_topk, search

__all__ = ["alpha_query_expansion", "database_augmentation", "k_reciprocal_rerank", "flip_embed", "postprocess_rank"]

DEFAULT_BUDGET = 128 * 2**20  # bytes of one block of similarities (and of one batch of Jaccard terms)
_JACCARD_BYTES_PER_TERM = 64  # temporaries per (query, shared column, gallery item) term of the Jaccard numerator

Embed = Callable[[nn.Module, Tensor], Tensor]


# ---- checks ---------------------------------------------------------------------------------------------------
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _features(x: Tensor, name: str) -> Tensor:
    """Detached, L2-normalised float32/64 rows."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return F.normalize(x.detach(), dim=1)


def _pair(query: Tensor, gallery: Optional[Tensor], exclude_self: Optional[bool]) -> Tuple[Tensor, Tensor, bool]:
    """Normalised (query, gallery, exclude_self); gallery None -> the query set itself, self excluded."""
    q = _features(query, "query")
    if gallery is None:
        if exclude_self is False:
            raise ValueError("without a gallery the query set is its own gallery and self must be excluded")
        return q, q, True
    g = _features(gallery, "gallery").to(q.dtype)
    if q.shape[1] != g.shape[1] or q.device != g.device:
        raise ValueError(f"query {tuple(q.shape)} on {q.device} and gallery {tuple(g.shape)} on {g.device} differ")
    exclude_self = bool(exclude_self)
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError("exclude_self pairs query i with gallery i: the sets must have the same size")
    return q, g, exclude_self


# ---- nearest neighbours ---------------------------------------------------------------------------------------
def _nearest(query: Tensor, gallery: Tensor, k: int, exclude_self: bool, budget: int) -> Tuple[Tensor, Tensor]:
    """Cosine similarities and gallery indices (Q, k) of each query's k nearest, best first (ties by index), on the
    query's device and in its dtype; ``exclude_self``: query i never retrieves gallery item i."""
    exclude = torch.arange(query.shape[0]) if exclude_self else None
    sims, idx = search(query, gallery, k, "cosine", exclude=exclude, memory_budget=budget)
    return sims.to(query.device, query.dtype), idx.to(query.device)


def _graph(nodes: Tensor, k: int, budget: int) -> Tuple[Tensor, Tensor]:
    """The re-ranking graph from one pass of similarity blocks: each node's k nearest nodes, itself first, then the
    others by similarity (ties by index), and each node's smallest similarity to another. Shapes (N, k), (N,)."""
    n = nodes.shape[0]
    rows = min(n, max(1, budget // (n * nodes.element_size())))
    nbr = torch.empty(n, k, dtype=torch.int64)
    row_min = nodes.new_empty(n)
    block = nodes.new_empty(rows, n)
    starts = range(0, n, rows)
    for a in tqdm(starts, desc="rerank graph", leave=False, dynamic_ncols=True, disable=len(starts) < 8):
        s = block[: min(n, a + rows) - a]
        torch.mm(nodes[a : a + rows], nodes.T, out=s)
        s.diagonal(offset=a).fill_(float("inf"))  # itself first
        row_min[a : a + rows] = s.amin(1)
        nbr[a : a + rows] = exact_topk(s, k)[1]
    return nbr, row_min


# ---- alpha-QE and DBA -----------------------------------------------------------------------------------------
def _weighted_sum(query: Tensor, gallery: Tensor, k: int, alpha: float, exclude_self: bool, budget: int) -> Tensor:
    """normalise(q + sum over the k-1 nearest gallery items g of max(q.g, 0)^alpha * g) for every query row q."""
    if k == 1:
        return query.clone()
    k = min(k - 1, gallery.shape[0] - int(exclude_self))
    sims, idx = _nearest(query, gallery, k, exclude_self, budget)
    weights = sims.clamp(min=0).pow(alpha)
    out = query.clone()
    rows = max(1, budget // (k * gallery.shape[1] * gallery.element_size()))
    for a in range(0, query.shape[0], rows):
        b = min(query.shape[0], a + rows)
        out[a:b] += torch.einsum("qk,qkd->qd", weights[a:b], gallery[idx[a:b]])
    return out.div_(out.norm(dim=1, keepdim=True))  # norm >= 1: the query itself has weight 1


@torch.inference_mode()
def alpha_query_expansion(
    query: Tensor,
    gallery: Optional[Tensor] = None,
    *,
    k: int = 5,
    alpha: float = 3.0,
    exclude_self: Optional[bool] = None,
    memory_budget: int = DEFAULT_BUDGET,
) -> Tensor:
    """alpha-QE (Radenovic et al., TPAMI 2019): each query becomes the L2-normalised sum of itself (weight 1) and
    its k-1 nearest gallery items, each weighted by its cosine similarity to the query (clamped at 0) to the power
    ``alpha``. k counts the query, as fast-reid's QE_K does; k = 1 leaves the queries unchanged. ``gallery=None``
    expands against the query set itself without its own row. Returns (Q, d) unit rows."""
    q, g, excl = _pair(query, gallery, exclude_self)
    return _weighted_sum(q, g, _positive_int(k, "qe_k"), float(alpha), excl, memory_budget)


@torch.inference_mode()
def database_augmentation(
    gallery: Tensor, *, k: int = 5, alpha: float = 3.0, memory_budget: int = DEFAULT_BUDGET
) -> Tensor:
    """alpha-DBA: every gallery vector replaced by the normalised similarity^alpha-weighted sum of its k nearest
    gallery items, itself included (weight 1), i.e. alpha-QE of the gallery against itself. Returns (G, d)."""
    g = _features(gallery, "gallery")
    return _weighted_sum(g, g, _positive_int(k, "dba_k"), float(alpha), True, memory_budget)


# ---- k-reciprocal re-ranking ----------------------------------------------------------------------------------
def _reciprocal(nbr: Tensor, k: int) -> Tensor:
    """R(i, k): i's k+1 nearest (``nbr`` columns, itself first) that have i among their own k+1 nearest.

    Shape (N, k+1) int64, non-members set to -1 (members keep their place in i's neighbour order)."""
    forward = nbr[:, : k + 1].contiguous()
    out = torch.empty_like(forward)
    rows = max(1, 2**22 // forward.shape[1] ** 2)
    for a in range(0, forward.shape[0], rows):
        f = forward[a : a + rows]
        own = torch.arange(a, a + f.shape[0])[:, None, None]
        out[a : a + rows] = torch.where((forward[f] == own).any(-1), f, -1)
    return out


def _expansion_sets(r_full: Tensor, r_half: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """R*(i) as a CSR pattern (indptr, sorted column indices): R(i, k1) plus each R(c, k1/2), c in R(i, k1),
    that has more than 2/3 of its members in R(i, k1)."""
    n, width = r_full.shape
    rows = max(1, 2**23 // (width * width * r_half.shape[1]))
    counts, cols = [], []
    for a in range(0, n, rows):
        rk = r_full[a : a + rows]  # (B, K1)
        rc = r_half[rk.clamp(min=0)]  # (B, K1, H)
        member = (rc >= 0) & (rk >= 0)[..., None]
        rc = torch.where(member, rc, -1)
        shared = ((rc[..., None] == rk[:, None, None, :]).any(-1) & member).sum(-1)
        take = 3 * shared > 2 * member.sum(-1)  # |R(c) & R(i)| > 2/3 |R(c)|, in integers
        cand = torch.cat([rk, torch.where(take[..., None], rc, -1).flatten(1)], 1).sort(1).values
        cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1  # drop repeats; the rest stays sorted
        keep = cand >= 0
        counts.append(keep.sum(1))
        cols.append(cand[keep])
    indptr = np.concatenate([[0], torch.cat(counts).cumsum(0).numpy()])
    return indptr, torch.cat(cols).numpy()


def _pair_sims(x: Tensor, y: Tensor, rows: np.ndarray, cols: np.ndarray, step: int = 2**13) -> Tensor:
    """x[rows[t]] . y[cols[t]] for every t, a batch of pairs at a time."""
    rows, cols = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    out = x.new_empty(len(rows))
    for a in range(0, len(rows), step):
        out[a : a + step] = (x[rows[a : a + step]] * y[cols[a : a + step]]).sum(1)
    return out


def _norm_dist(sims: Tensor, dmax: Tensor) -> Tensor:
    """Squared Euclidean distance of unit vectors, 2 - 2 s, divided by its row maximum."""
    return (2 - 2 * sims).clamp(min=0) / dmax


def _encodings(nodes: Tensor, nbr: Tensor, dmax: Tensor, k1: int, k2: int) -> sp.csr_matrix:
    """Sparse V after local query expansion: (N, N) CSR with sorted indices, rows summing to 1."""
    n = nodes.shape[0]
    r_full = _reciprocal(nbr, min(k1, nbr.shape[1] - 1))
    r_half = _reciprocal(nbr, min(int(round(k1 / 2)), nbr.shape[1] - 1))  # round half to even, like np.around
    indptr, cols = _expansion_sets(r_full, r_half)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    w = torch.exp(-_norm_dist(_pair_sims(nodes, nodes, rows, cols), dmax[torch.from_numpy(rows)]))
    w /= torch.zeros(n, dtype=w.dtype).index_add_(0, torch.from_numpy(rows), w)[torch.from_numpy(rows)]
    v = sp.csr_matrix((w.numpy(), cols, indptr), shape=(n, n))
    if k2 > 1:
        near = nbr[:, :k2].numpy()
        avg = sp.csr_matrix(
            (
                np.full(near.size, 1.0 / near.shape[1], dtype=w.numpy().dtype),
                near.ravel(),
                np.arange(0, near.size + 1, near.shape[1]),
            ),
            shape=(n, n),
        )
        v = (avg @ v).tocsr()
    v.sort_indices()
    return v


def _add_shared_mass(mass: Tensor, vq: sp.csr_matrix, inv: sp.csr_matrix, width: int) -> Tensor:
    """mass[i * width + j] += sum_k min(vq[i, k], V[j, k]) over the k where both are non-zero (Zhong et al.'s
    inverted-index loop, vectorised); returns the touched flat positions (with repeats). ``inv`` is the gallery's V
    transposed: its row k lists the gallery items j with V[j, k] != 0."""
    row = np.repeat(np.arange(vq.shape[0]), np.diff(vq.indptr))
    lens = np.diff(inv.indptr)[vq.indices]
    total = int(lens.sum())
    pos = np.repeat(inv.indptr[vq.indices] - (np.cumsum(lens) - lens), lens) + np.arange(total)
    terms = torch.from_numpy(np.minimum(np.repeat(vq.data, lens), inv.data[pos])).to(mass.dtype)
    flat = torch.from_numpy(np.repeat(row * width, lens) + inv.indices[pos])
    mass.index_add_(0, flat, terms)
    return flat


def _query_batches(vq: sp.csr_matrix, inv: sp.csr_matrix, rows: int, budget: int) -> Sequence[Tuple[int, int]]:
    """Consecutive query ranges of at most ``rows`` rows whose Jaccard terms fit in ``budget`` bytes (>= 1 row)."""
    row = np.repeat(np.arange(vq.shape[0]), np.diff(vq.indptr))
    per_row = np.bincount(row, weights=np.diff(inv.indptr)[vq.indices], minlength=vq.shape[0])
    limit = max(1, budget // _JACCARD_BYTES_PER_TERM)
    batches, a, acc = [], 0, 0
    for i, t in enumerate(per_row.tolist()):
        if i > a and (i - a == rows or acc + t > limit):
            batches.append((a, i))
            a, acc = i, 0
        acc += t
    batches.append((a, per_row.size))
    return batches


def _rerank_options(k1: int, k2: int, lambda_value: float) -> Tuple[int, int, float]:
    if not 0.0 <= lambda_value <= 1.0:
        raise UserError(f"lambda_value must be in [0, 1], got {lambda_value}")
    return _positive_int(k1, "k1"), _positive_int(k2, "k2"), float(lambda_value)


def _rerank(
    nodes: Tensor, nq: int, shared: bool, excl: bool, topk: int, k1: int, k2: int, lam: float, budget: int
) -> Tuple[Tensor, Tensor]:
    """:func:`k_reciprocal_rerank` on checked, normalised CPU features: ``nodes`` holds the ``nq`` queries, then the
    gallery unless ``shared`` (the queries are the gallery)."""
    q, g = nodes[:nq], nodes if shared else nodes[nq:]
    n, ng = nodes.shape[0], g.shape[0]
    nbr, row_min = _graph(nodes, min(n, max(k1 + 1, k2)), budget)
    dmax = (2 - 2 * row_min).clamp(min=torch.finfo(q.dtype).tiny)
    v = _encodings(nodes, nbr, dmax, k1, min(k2, n))
    del nbr
    inv = (v if shared else v[nq:]).T.tocsr()
    vq = v if shared else v[:nq]
    del v
    idx = torch.empty(nq, topk, dtype=torch.int64)
    dist = q.new_empty(nq, topk)
    rows = max(1, budget // (2 * ng * q.element_size()))  # distance and mass blocks
    batches = _query_batches(vq, inv, rows, budget)
    block, mass = q.new_empty(min(rows, nq), ng), q.new_zeros(min(rows, nq) * ng)
    for a, b in tqdm(batches, desc="rerank", leave=False, dynamic_ncols=True, disable=len(batches) < 8):
        f = block[: b - a]
        torch.mm(q[a:b], g.T, out=f)
        scale = (2 * lam) / dmax[a:b, None]  # lambda * d = scale * (1 - s)
        f.mul_(-scale).add_(scale + (1 - lam)).clamp_(min=1 - lam)  # jaccard = 1 where no mass is shared
        flat = _add_shared_mass(mass, vq[a:b], inv, ng)
        m = mass[flat]
        f.view(-1)[flat] = f.view(-1)[flat] - (1 - lam) * m / (2 - m)  # the rest: 1 - m / (2 - m)
        mass[flat] = 0
        if excl:
            f.diagonal(offset=a).fill_(float("inf"))
        dist[a:b], idx[a:b] = exact_topk(f, topk, largest=False)
    return idx, dist


@torch.inference_mode()
def k_reciprocal_rerank(
    query: Tensor,
    gallery: Optional[Tensor] = None,
    *,
    topk: int = 100,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    exclude_self: Optional[bool] = None,
    memory_budget: int = DEFAULT_BUDGET,
) -> Tuple[Tensor, Tensor]:
    """k-reciprocal re-ranking (see the module docstring): the ``topk`` gallery items of smallest final distance
    per query, ties by index, and those distances (in [0, 1]); the exact top-``topk`` of the dense algorithm.

    ``gallery=None``: the query set is the gallery (one graph of N items, each query's own row excluded). With a
    gallery, queries and gallery form one graph of Q + G items, as in fast-reid; ``exclude_self=True`` then drops
    gallery item i for query i. Shapes (Q, topk) int64, (Q, topk). Runs on CPU (moves the features there).
    """
    q, g, excl = _pair(query, gallery, exclude_self)
    topk = _positive_int(topk, "topk")
    if topk > g.shape[0] - int(excl):
        raise ValueError(f"topk={topk} exceeds the {g.shape[0] - int(excl)} gallery items a query can retrieve")
    k1, k2, lam = _rerank_options(k1, k2, lambda_value)
    nodes = q.cpu() if gallery is None else torch.cat([q.cpu(), g.cpu()])
    idx, dist = _rerank(nodes, q.shape[0], gallery is None, excl, topk, k1, k2, lam, memory_budget)
    return idx.to(q.device), dist.to(q.device)


# ---- flip test ------------------------------------------------------------------------------------------------
def flip_embed(embed: Optional[Embed] = None, keep_norm: bool = False) -> Embed:
    """fast-reid's TEST.FLIP: wrap ``embed(model, images) -> features`` (default ``model(images)``) into one that
    returns the L2-normalised mean of the features of the images and of their horizontal mirrors (images are
    (B, C, H, W)); the result is the same for an image and its mirror. ``keep_norm`` rescales each row to the norm
    of the image's own features (REIR's concatenated unit vectors have norm sqrt(E), which its scores divide out)."""
    base = embed if embed is not None else (lambda model, images: model(images))

    @functools.wraps(base)
    def flipped(model: nn.Module, images: Tensor) -> Tensor:
        features = base(model, images)
        mean = F.normalize(features + base(model, images.flip(-1)), dim=-1)
        return mean * features.norm(dim=-1, keepdim=True) if keep_norm else mean

    return flipped


# ---- one entry point and metrics from ranked lists -----------------------------------------------------------
@torch.inference_mode()
def postprocess_rank(
    query_feats: Tensor,
    gallery_feats: Optional[Tensor] = None,
    *,
    same_set: bool,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    qe_k: int = 0,
    qe_alpha: float = 3.0,
    dba_k: int = 0,
    dba_alpha: float = 3.0,
    topk: int = 100,
    memory_budget: int = DEFAULT_BUDGET,
) -> Tuple[Tensor, Tensor]:
    """Rank the gallery for every query with optional DBA, then alpha-QE, then k-reciprocal re-ranking.

    ``same_set``: the queries are the gallery (``gallery_feats`` None or the same rows) and query i never retrieves
    item i. ``qe_k`` / ``dba_k`` = 0 turn QE / DBA off; with ``same_set`` DBA changes the one shared set, and QE then
    changes only the query side. ``topk`` is capped at the number of items a query can retrieve.
    Returns gallery indices (Q, topk) int64, best first (ties by index), and scores, larger is better: cosine
    similarity, or 1 - the re-ranked distance with ``rerank``.
    """
    if same_set:  # one set: g is q until QE changes the query side
        if gallery_feats is not None and gallery_feats.shape != query_feats.shape:
            raise ValueError("same_set needs gallery_feats None or the query features themselves")
        gallery_feats = None
    elif gallery_feats is None:
        raise ValueError("gallery_feats is required unless same_set")
    for name, value in (("qe_k", qe_k), ("dba_k", dba_k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise UserError(f"{name} must be 0 (off) or a positive integer, got {value}")
    q = _features(query_feats, "query")
    g = q if same_set else _features(gallery_feats, "gallery").to(q.dtype)
    topk = min(_positive_int(topk, "topk"), g.shape[0] - int(same_set))
    if topk < 1:
        raise UserError("the gallery has no item a query could retrieve")
    if rerank:
        k1, k2, lambda_value = _rerank_options(k1, k2, lambda_value)
    if dba_k:
        g = _weighted_sum(g, g, dba_k, float(dba_alpha), True, memory_budget)
        q = g if same_set else q
    if qe_k:
        q = _weighted_sum(q, g, qe_k, float(qe_alpha), same_set, memory_budget)
    if rerank:
        device, nq, shared = q.device, q.shape[0], same_set and q is g
        nodes = q.cpu() if shared else torch.cat([q.cpu(), g.cpu()])
        del q, g  # one copy of the features while re-ranking
        idx, dist = _rerank(nodes, nq, shared, same_set, topk, k1, k2, lambda_value, memory_budget)
        return idx.to(device), (1 - dist).to(device)
    vals, idx = _nearest(q, g, topk, same_set, memory_budget)
    return idx, vals
