"""Approximate faiss indexes for collections too large to scan per query, with their Recall@10 measured at build.

``kind='exact'`` is the exact search of :mod:`common.search` (chunked and memory-bounded: a bf16 pass and a float64
re-check, identical to a float64 brute force) on a gallery prepared once. ``'ivf'`` (faiss IndexIVFFlat) and
``'hnsw'`` (IndexHNSWFlat) trade exactness for speed; their search breadth (IVF ``nprobe``, HNSW ``efSearch``) is
raised at build time until Recall@10 against the exact search reaches ``target_recall`` on a sample of the gallery,
and both figures are printed. Recall@10 here is the fraction of each query's exact 10 nearest neighbours that the
index returns among its 10 (the usual ANN definition), averaged over the sample. Searching an index is
:func:`common.search.search` with ``index=``.

    index = build_index(features, "cosine", kind="ivf")   # prints build time, nprobe and Recall@10
    scores, ids = search(queries, None, k=10, index=index)
    save_index(index, "run_data_base.ivf")                 # next to the database; atomic
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from common.errors import UserError
from common.runio import atomic_write
from common.search import Index, check_metric, cpu_features, prepare_gallery, search

__all__ = ["build_index", "save_index", "load_index", "KINDS"]

KINDS = ("exact", "ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is in requirements.txt
        raise UserError(f"approximate indexes need faiss (pip install faiss-cpu): {e}") from None
    return faiss


def _numpy32(features: Tensor) -> np.ndarray:
    return np.ascontiguousarray(cpu_features(features, "features").numpy(), dtype=np.float32)


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
    metric = check_metric(metric)
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
    queries = cpu_features(features, "features")[torch.from_numpy(pick)]
    k = min(10, n - 1)
    if k < 1:
        return
    truth = search(queries, features, k, index.metric, exclude=torch.from_numpy(pick))[1].numpy()
    ann = index.faiss_index
    while True:
        found = search(queries, None, k, exclude=torch.from_numpy(pick), index=index)[1].numpy()
        index.recall_at_10 = _overlap(found, truth)
        widest = ann.nprobe >= ann.nlist if index.kind == "ivf" else ann.hnsw.efSearch >= n
        if index.recall_at_10 >= target or widest:
            return
        if index.kind == "ivf":
            ann.nprobe = min(2 * ann.nprobe, ann.nlist)
        else:
            ann.hnsw.efSearch = 2 * ann.hnsw.efSearch


def _overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found row ∩ truth row| / k (missing results are -1 and never match)."""
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return hits / truth.size


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
