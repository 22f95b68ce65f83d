"""Search a large gallery: exact, or through an approximate faiss index whose Recall@10 is measured when built.

``kind='exact'`` is :func:`common.metrics.search_topk` (chunked and memory-bounded: a bf16 pass and a float64
re-check, identical to a float64 brute force). ``'ivf'`` (faiss IndexIVFFlat) and ``'hnsw'`` (IndexHNSWFlat) trade
exactness for speed on collections too large to scan per query; their search breadth (IVF ``nprobe``, HNSW
``efSearch``) is raised at build time until Recall@10 against the exact search reaches ``target_recall`` on a
sample of the gallery, and both figures are printed. Recall@10 here is the fraction of each query's exact 10 nearest
neighbours that the index returns among its 10 (the usual ANN definition), averaged over the sample.

    index = build_index(features, "cosine", kind="ivf")   # prints build time, nprobe and Recall@10
    scores, ids = search(index, queries, k=10)
    save_index(index, "run_data_base.ivf")                 # next to the database; atomic
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from common.errors import UserError
from common.metrics import PreparedGallery, _check_metric, _cpu_features, prepare_gallery, search_topk
from common.runio import atomic_write

__all__ = ["Index", "build_index", "search", "recall_at_k_vs_exact", "save_index", "load_index", "KINDS"]

KINDS = ("exact", "ivf", "hnsw")


@dataclass
class Index:
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


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is in requirements.txt
        raise UserError(f"approximate indexes need faiss (pip install faiss-cpu): {e}") from None
    return faiss


def _numpy32(features: Tensor) -> np.ndarray:
    return np.ascontiguousarray(_cpu_features(features, "features").numpy(), dtype=np.float32)


def default_nlist(n: int) -> int:
    """IVF lists: about sqrt(n) (a power of two), so a list holds ~sqrt(n) items, with >= 39 training points each."""
    return int(max(1, min(2 ** round(np.log2(max(np.sqrt(n), 1))), n // 39)))


def build_index(
    features: Tensor,
    metric: str = "cosine",
    kind: str = "exact",
    *,
    nlist: Optional[int] = None,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    target_recall: float = 0.95,
    sample: int = 200,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = print,
) -> Index:
    """Index gallery ``features`` (N, d) for top-k search with ``metric`` ('cosine' = inner product of the given
    vectors, normalise them first; or 'euclidean'). ANN kinds: see the module docstring; ``sample`` gallery items
    (searched for their 10 nearest others) measure Recall@10, 0 skips that and the tuning."""
    metric = _check_metric(metric)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    start = time.perf_counter()
    if kind == "exact":
        gallery = prepare_gallery(features, metric)
        index = Index(kind, metric, *gallery.features.shape, exact=gallery)
        index.build_seconds = time.perf_counter() - start
        return index
    faiss = _faiss()
    x = _numpy32(features)
    n, d = x.shape
    space = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "ivf":
        nlist = int(nlist or default_nlist(n))
        quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
        ann = faiss.IndexIVFFlat(quantizer, d, nlist, space)
        ann.cp.seed = seed
        train = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
        ann.train(x[np.sort(train)])
        ann.add(x)
        ann.nprobe = min(8, nlist)
    else:
        ann = faiss.IndexHNSWFlat(d, hnsw_m, space)
        ann.hnsw.efConstruction = ef_construction
        ann.add(x)
        ann.hnsw.efSearch = 32
    index = Index(kind, metric, n, d, faiss_index=ann)
    index.build_seconds = time.perf_counter() - start
    if sample:
        start = time.perf_counter()
        _tune(index, features, target_recall, sample, seed)
        index.tune_seconds = time.perf_counter() - start
    if log is not None:
        log(index.describe())
    return index


def _tune(index: Index, features: Tensor, target: float, sample: int, seed: int) -> None:
    """Widen the ANN search (double nprobe / efSearch) until Recall@10 on gallery items reaches ``target``."""
    n = index.size
    pick = np.sort(np.random.default_rng(seed + 1).choice(n, min(n, sample), replace=False))
    queries = _cpu_features(features, "features")[torch.from_numpy(pick)]
    k = min(10, n - 1)
    if k < 1:
        return
    truth = _drop_self(search_topk(queries, features, k + 1, index.metric)[1].numpy(), pick, k)
    ann = index.faiss_index
    while True:
        found = _drop_self(search(index, queries, k + 1)[1].numpy(), pick, k)
        index.recall_at_10 = _overlap(found, truth)
        widest = ann.nprobe >= ann.nlist if index.kind == "ivf" else ann.hnsw.efSearch >= n
        if index.recall_at_10 >= target or widest:
            return
        if index.kind == "ivf":
            ann.nprobe = min(2 * ann.nprobe, ann.nlist)
        else:
            ann.hnsw.efSearch = 2 * ann.hnsw.efSearch


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k results other than the query's own gallery index."""
    keep = ids != self_ids[:, None]
    rows = [row[m][:k] for row, m in zip(ids, keep)]
    return np.stack([np.pad(r, (0, k - len(r)), constant_values=-1) for r in rows])


def _overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found row ∩ truth row| / k (missing results are -1 and never match)."""
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return hits / truth.size


def recall_at_k_vs_exact(index: Index, queries: Tensor, gallery_features: Tensor, k: int = 10) -> float:
    """Recall@k of ``index`` against the exact search of ``gallery_features`` for ``queries`` (not gallery items)."""
    truth = search_topk(queries, gallery_features, k, index.metric)[1].numpy()
    return _overlap(search(index, queries, k)[1].numpy(), truth)


def search(index: Index, queries: Tensor, k: int, *, progress: bool = False) -> Tuple[Tensor, Tensor]:
    """Top-``k`` of each query: (scores (Q, k) float32, indices (Q, k) int64), best first. Scores are inner
    products ('cosine') or distances ('euclidean'). An ANN index may find fewer than k: index -1, score NaN."""
    if index.kind == "exact":
        return search_topk(queries, index.exact, k, progress=progress)
    q = _numpy32(queries)
    if q.shape[1] != index.dim:
        raise ValueError(f"queries have {q.shape[1]} dimensions, the index {index.dim}")
    if not 0 <= k <= index.size:
        raise ValueError(f"k must be between 0 and the index size {index.size}, got {k}")
    scores, ids = index.faiss_index.search(q, k)
    scores = scores.astype(np.float32)
    if index.metric == "euclidean":
        scores = np.sqrt(np.maximum(scores, 0))  # faiss returns squared distances
    scores[ids < 0] = np.nan
    return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))


def save_index(index: Index, path: os.PathLike) -> None:
    """Write an ANN index atomically (:func:`common.runio.atomic_write`: temporary file beside it, then rename). An
    exact index is just the gallery's features, which the database already holds."""
    if index.kind == "exact":
        raise ValueError("an exact index is the gallery features themselves; save the database instead")
    data = _faiss().serialize_index(index.faiss_index)
    atomic_write(path, lambda f: f.write(memoryview(data)))


def load_index(path: os.PathLike) -> Index:
    """Read an index written by :func:`save_index` (kind, metric and search breadth come back with it)."""
    faiss = _faiss()
    if not Path(path).is_file():
        raise UserError(f"index file {path} does not exist")
    try:
        ann = faiss.read_index(str(path))  # comes back as its own class
    except RuntimeError as e:
        raise UserError(f"cannot read index {path}: {str(e).splitlines()[0]}") from None
    if isinstance(ann, faiss.IndexIVFFlat):
        kind = "ivf"
    elif isinstance(ann, faiss.IndexHNSWFlat):
        kind = "hnsw"
    else:
        raise UserError(f"{path} holds a {type(ann).__name__}, not an IVF-Flat or HNSW-Flat index")
    metric = "cosine" if ann.metric_type == faiss.METRIC_INNER_PRODUCT else "euclidean"
    return Index(kind, metric, ann.ntotal, ann.d, faiss_index=ann)
