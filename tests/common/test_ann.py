"""common.ann: the exact kind equals a float64 brute force; ANN indexes return valid results, and the Recall@10
they report is the ANN definition (share of the exact 10 nearest found), checked against an independent count."""

import numpy as np
import pytest
import torch

from common import ann
from common.errors import UserError
from common.search import search


def clustered(n=600, d=16, classes=30, seed=0, noise=0.5):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, d, generator=gen), dim=1)
    x = centres[torch.randint(0, classes, (n,), generator=gen)] + noise * torch.randn(n, d, generator=gen) / d**0.5
    return torch.nn.functional.normalize(x, dim=1)


def brute(q, g, k, metric):
    """Indices and scores of a stable float64 sort per query."""
    q64, g64 = q.double().numpy(), g.double().numpy()
    if metric == "euclidean":
        s = np.sqrt(((q64[:, None] - g64[None]) ** 2).sum(-1))
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    else:
        s = q64 @ g64.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_index_matches_brute_force_with_ties(metric):
    g = clustered()
    g[300:350] = g[:50]  # exact duplicates: ties broken by the smaller index
    q = torch.cat([clustered(40, seed=1), g[:5]])
    index = ann.build_index(g, metric, "exact")
    scores, ids = search(q, None, 12, index=index)
    want_s, want_i = brute(q, g, 12, metric)
    assert np.array_equal(ids.numpy(), want_i)
    assert np.allclose(scores.numpy(), want_s, atol=1e-6)
    assert ids.dtype == torch.int64 and scores.dtype == torch.float32


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ann_results_are_valid(kind, metric):
    g, q = clustered(), clustered(30, seed=2)
    index = ann.build_index(g, metric, kind, sample=0, log=None)
    assert index.recall_at_10 is None and index.build_seconds > 0
    scores, ids = search(q, None, 10, index=index)
    assert ids.shape == scores.shape == (30, 10)
    valid = ids >= 0
    assert valid[:, 0].all() and ids.max() < len(g)
    for row, s, ok in zip(ids.numpy(), scores.numpy(), valid.numpy()):
        assert len(set(row[ok])) == ok.sum()  # no item twice
        assert np.all(np.isnan(s[~ok]))
    # the scores are the metric's values for the returned items, best first
    q64, g64 = q.double().numpy(), g.double().numpy()
    rows = np.arange(30)[:, None]
    if metric == "euclidean":
        want = np.sqrt(((q64[:, None] - g64[np.clip(ids.numpy(), 0, None)]) ** 2).sum(-1))
    else:
        want = np.einsum("qd,qkd->qk", q64, g64[np.clip(ids.numpy(), 0, None)])
    assert np.allclose(scores.numpy()[valid.numpy()], want[valid.numpy()], atol=1e-4)
    step = np.diff(np.where(valid.numpy(), scores.numpy(), np.nan)[rows, np.arange(10)], axis=1)
    assert np.all(np.nan_to_num(step if metric == "euclidean" else -step, nan=0) >= -1e-5)


def overlap(found, truth):
    return np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)])


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_reported_recall_at_10_is_the_share_of_exact_neighbours_found(kind):
    g = clustered(400, noise=1.5)  # wide clusters: an IVF probing 8 of its lists misses some neighbours
    messages = []
    index = ann.build_index(g, "cosine", kind, sample=len(g), target_recall=0.0, log=messages.append)
    # independent count: every gallery item asks for its 10 nearest others
    _, exact = brute(g, g, 11, "cosine")
    _, found = index.faiss_index.search(g.numpy(), 11)
    self_id = np.arange(len(g))[:, None]
    truth = [row[row != i][:10] for row, i in zip(exact, self_id)]
    got = [row[row != i][:10] for row, i in zip(found, self_id)]
    assert index.recall_at_10 == pytest.approx(overlap(got, truth))
    assert "Recall@10" in messages[0] and f"{index.recall_at_10:.4f}" in messages[0]


def test_ivf_breadth_is_raised_until_the_target():
    g = clustered(800, noise=1.5)
    index = ann.build_index(g, "euclidean", "ivf", nlist=64, target_recall=1.0, log=None)
    ivf = index.faiss_index
    assert index.recall_at_10 == 1.0 or ivf.nprobe == ivf.nlist
    if ivf.nprobe == ivf.nlist:  # every list probed: the IVF search is exhaustive
        assert index.recall_at_10 == pytest.approx(1.0, abs=0.005)  # float32 near-ties may swap
    low = ann.build_index(g, "euclidean", "ivf", nlist=64, target_recall=0.0, log=None)
    assert low.faiss_index.nprobe == 8 and low.recall_at_10 <= index.recall_at_10


def test_save_and_load_round_trip(tmp_path):
    g, q = clustered(), clustered(20, seed=4)
    for kind in ("ivf", "hnsw"):
        index = ann.build_index(g, "euclidean", kind, log=None)
        path = tmp_path / kind / "gallery.index"
        ann.save_index(index, path)
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
        loaded = ann.load_index(path)
        assert (loaded.kind, loaded.metric, loaded.size, loaded.dim) == (kind, "euclidean", len(g), g.shape[1])
        for a, b in zip(search(q, None, 5, index=loaded), search(q, None, 5, index=index)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exact index is the gallery features"):
        ann.save_index(ann.build_index(g, "cosine", "exact"), tmp_path / "exact.idx")
    with pytest.raises(UserError, match="does not exist"):
        ann.load_index(tmp_path / "missing.idx")
    (tmp_path / "junk.idx").write_bytes(b"not an index")
    with pytest.raises(UserError, match="cannot read index"):
        ann.load_index(tmp_path / "junk.idx")


def test_bad_arguments():
    g = clustered(50)
    with pytest.raises(ValueError, match="kind must be one of"):
        ann.build_index(g, "cosine", "lsh")
    with pytest.raises(ValueError, match="metric must be one of"):
        ann.build_index(g, "manhattan")
    index = ann.build_index(g, "cosine", "ivf", sample=0, log=None)
    with pytest.raises(ValueError, match="queries have 8 dimensions, the gallery 16"):
        search(g[:2, :8], None, 3, index=index)
    with pytest.raises(ValueError, match="between 0 and the gallery size 50"):
        search(g[:2], None, 51, index=index)


def test_search_benchmark_smoke(tmp_path):
    from benchmarks import search_benchmark as bench

    args = bench.get_args_parser().parse_args(
        ["--num_gallery", "3000", "--num_queries", "40", "--dim", "16", "--output", str(tmp_path / "s.csv")]
    )
    rows = {(r["method"], r["phase"]): r for r in bench.main(args)}
    assert (tmp_path / "s.csv").exists()
    assert rows["faiss_flat", "search"]["same_results"] >= 0.99  # float32 faiss may swap float64 near-ties
    assert 0 <= rows["ivf", "search"]["recall_at_10_vs_exact"] <= 1
    assert rows["exact", "search"]["seconds"] > 0
