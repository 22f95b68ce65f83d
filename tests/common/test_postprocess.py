"""common.postprocess against straightforward dense references written here (full N x N matrices, Python loops over
sets, float64): k-reciprocal re-ranking as in Zhong et al. / fast-reid's rerank.py, alpha-QE, DBA, flip test, and
the ranked-list metrics against common.metrics.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from common.metrics import metrics_from_ranking, required_topk, retrieval_metrics
from common.postprocess import (
    alpha_query_expansion,
    database_augmentation,
    flip_embed,
    k_reciprocal_rerank,
    postprocess_rank,
)
from common.search import search


def clustered(n, d=8, per_class=6, noise=0.8, seed=0):
    """Unit float64 rows around n // per_class random centres (retrieval-like neighbourhoods), and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % max(1, n // per_class)
    centres = rng.standard_normal((labels.max() + 1, d))
    x = centres[labels] + noise * rng.standard_normal((n, d))
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)), labels


# ---- dense references ------------------------------------------------------------------------------------------
def dense_rerank(q, g=None, k1=20, k2=6, lam=0.3, exclude_self=None):
    """Zhong et al.'s algorithm on full matrices: returns the full (Q, G) final distance, self entries = inf."""
    q = q.numpy()
    shared = g is None
    x = q if shared else np.concatenate([q, g.numpy()])
    n, nq = len(x), len(q)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        return [j for j in rank[i, : k + 1] if i in rank[j, : k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = set(r)
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2.0)))
            if len(set(rc) & set(r)) > 2.0 / 3 * len(rc):
                expansion |= set(rc)
        cols = sorted(expansion)
        w = np.exp(-dist[i, cols])
        v[i, cols] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    shared_mass = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    final = (1 - lam) * (1 - shared_mass / (2 - shared_mass)) + lam * dist
    final = final[:nq] if shared else final[:nq, nq:]
    if shared or exclude_self:
        final[np.arange(nq), np.arange(nq)] = np.inf
    return final


def dense_top(final, k):
    """Indices and values of the k smallest entries per row, ties by index (stable sort)."""
    order = np.argsort(final, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(final, order, 1)


def assert_matches_dense(idx, dist, final, k):
    """The returned lists are a top-k of the dense distances: their own dense distances are the k smallest in order
    (indices may differ from the stable sort only between items tied to rounding), and the values agree."""
    ref_idx, ref_dist = dense_top(final, k)
    own = np.take_along_axis(final, idx.numpy(), 1)
    np.testing.assert_allclose(own, ref_dist, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=0, atol=1e-12)
    assert all(len(set(row)) == k for row in idx.tolist())
    assert (idx.numpy() == ref_idx).mean() > 0.97


def dense_expand(q, g, k, alpha, exclude_self):
    """normalise(q + sum of its k-1 most similar gallery rows weighted by max(sim, 0)^alpha), row by row."""
    out = []
    for i, row in enumerate(q.numpy()):
        s = g.numpy() @ row
        cands = [j for j in range(len(s)) if not (exclude_self and j == i)]
        near = sorted(cands, key=lambda j: (-s[j], j))[: k - 1]
        new = row + sum(max(s[j], 0.0) ** alpha * g.numpy()[j] for j in near)
        out.append(new / np.linalg.norm(new))
    return torch.tensor(np.array(out))


# ---- re-ranking -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (5, 1, 0.0), (7, 3, 0.5), (3, 2, 1.0)])
@pytest.mark.parametrize("topk", [5, 119])
def test_rerank_same_set_matches_dense(k1, k2, lam, topk):
    x, _ = clustered(120)
    idx, dist = k_reciprocal_rerank(x, topk=topk, k1=k1, k2=k2, lambda_value=lam)
    assert_matches_dense(idx, dist, dense_rerank(x, None, k1, k2, lam), topk)


@pytest.mark.parametrize("topk", [3, 10, 100])
def test_rerank_query_gallery_matches_dense(topk):
    x, _ = clustered(130, seed=1)
    q, g = x[:30], x[30:]
    idx, dist = k_reciprocal_rerank(q, g, topk=topk)
    assert_matches_dense(idx, dist, dense_rerank(q, g), topk)


def test_rerank_exclude_self_with_separate_features():
    x, _ = clustered(80, seed=2)
    q = F.normalize(x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype))
    idx, dist = k_reciprocal_rerank(q, x, topk=8, k1=10, k2=3, exclude_self=True)
    assert_matches_dense(idx, dist, dense_rerank(q, x, 10, 3, 0.3, exclude_self=True), 8)
    assert not (idx == torch.arange(80)[:, None]).any()


def test_rerank_tiny_budget_and_items_beyond_the_nearest():
    """Blocks of one row and one query per Jaccard batch give the same result; and the re-ranked top-5 does take
    items from outside each query's 5 nearest (the candidate path beyond the nearest is exercised)."""
    x, _ = clustered(100, seed=3)
    idx, dist = k_reciprocal_rerank(x, topk=5, memory_budget=1)
    assert_matches_dense(idx, dist, dense_rerank(x), 5)
    _, near = search(x, x, 5, exclude=torch.arange(len(x)))
    assert any(set(a.tolist()) - set(b.tolist()) for a, b in zip(idx, near))


def test_rerank_set_smaller_than_k1():
    x, _ = clustered(12, seed=9)
    idx, dist = k_reciprocal_rerank(x, topk=11)
    assert_matches_dense(idx, dist, dense_rerank(x), 11)


def test_rerank_float32_close_to_float64():
    x, _ = clustered(90, seed=4)
    _, dist64 = k_reciprocal_rerank(x, topk=10)
    _, dist32 = k_reciprocal_rerank(x.float(), topk=10)
    assert dist32.dtype == torch.float32
    np.testing.assert_allclose(dist32.numpy(), dist64.numpy(), atol=1e-5)


def test_rerank_rejects_bad_arguments():
    x, _ = clustered(20)
    with pytest.raises(ValueError, match="exceeds"):
        k_reciprocal_rerank(x, topk=20)
    with pytest.raises(UserError, match="lambda"):
        k_reciprocal_rerank(x, topk=5, lambda_value=1.5)
    with pytest.raises(UserError, match="k1"):
        k_reciprocal_rerank(x, topk=5, k1=0)


# ---- alpha-QE and DBA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,alpha", [(5, 3.0), (2, 1.0), (9, 0.5)])
def test_alpha_qe_matches_dense(k, alpha):
    x, _ = clustered(70, seed=5)
    q, g = x[:20], x[20:]
    torch.testing.assert_close(
        alpha_query_expansion(q, g, k=k, alpha=alpha), dense_expand(q, g, k, alpha, False), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        alpha_query_expansion(x, k=k, alpha=alpha), dense_expand(x, x, k, alpha, True), rtol=0, atol=1e-12
    )


def test_dba_matches_dense_and_k1_is_identity():
    x, _ = clustered(70, seed=6)
    out = database_augmentation(x, k=5, alpha=3.0, memory_budget=1)
    torch.testing.assert_close(out, dense_expand(x, x, 5, 3.0, True), rtol=0, atol=1e-12)
    assert not torch.allclose(out, x)
    torch.testing.assert_close(database_augmentation(x, k=1), x, rtol=0, atol=1e-15)


# ---- flip test ------------------------------------------------------------------------------------------------
def test_flip_embed_averages_mirrors_and_is_flip_invariant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 5, 6)).eval()
    images = torch.rand(3, 3, 8, 7)

    def embed(m, x):
        return F.normalize(m(x), dim=1)

    with torch.no_grad():
        out = flip_embed(embed)(model, images)
        manual = embed(model, images) + embed(model, torch.flip(images, dims=[3]))
        torch.testing.assert_close(out, manual / manual.norm(dim=1, keepdim=True))
        assert torch.equal(out, flip_embed(embed)(model, torch.flip(images, dims=[3])))
        assert not torch.allclose(out, embed(model, images), atol=1e-3)  # the model itself is not flip-invariant
        plain = flip_embed()(model, images)
        torch.testing.assert_close(plain, F.normalize(model(images) + model(images.flip(3)), dim=1))


# ---- entry point and metrics ----------------------------------------------------------------------------------
def test_plain_ranking_metrics_equal_common_metrics():
    x, labels = clustered(150, per_class=5, noise=1.2, seed=7)
    ranks = [1, 2, 4, 8]
    idx, scores = postprocess_rank(x, same_set=True, topk=required_topk(ranks, labels))
    assert torch.equal(idx[:, 0] == torch.arange(150), torch.zeros(150, dtype=torch.bool))
    got = metrics_from_ranking(idx, labels, None, ranks)
    want = retrieval_metrics(x, labels, ranks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    q, g, ql, gl = x[:40], x[40:], labels[:40], labels[40:]
    idx, scores = postprocess_rank(q, g, same_set=False, topk=required_topk(ranks, ql, gl))
    torch.testing.assert_close(scores, (q @ g.T).gather(1, idx))
    got, want = metrics_from_ranking(idx, ql, gl, ranks), retrieval_metrics(q, ql, ranks, g, gl)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_entry_point_composes_dba_qe_rerank_like_the_references():
    x, _ = clustered(90, seed=8)
    q, g = x[:25], x[25:]
    idx, scores = postprocess_rank(q, g, same_set=False, rerank=True, k1=10, k2=3, qe_k=3, dba_k=4, topk=12)
    g2 = dense_expand(g, g, 4, 3.0, True)
    q2 = dense_expand(q, g2, 3, 3.0, False)
    assert_matches_dense(idx, 1 - scores, dense_rerank(q2, g2, 10, 3, 0.3), 12)
    # same set with QE: the expanded queries are ranked against the set, each query's own row excluded
    idx, scores = postprocess_rank(x, same_set=True, rerank=True, k1=10, k2=3, qe_k=3, topk=7)
    assert_matches_dense(idx, 1 - scores, dense_rerank(dense_expand(x, x, 3, 3.0, True), x, 10, 3, 0.3, True), 7)


def test_entry_point_caps_topk_and_rejects_bad_options():
    x, _ = clustered(12)
    idx, _ = postprocess_rank(x, same_set=True, topk=100)
    assert idx.shape == (12, 11)
    with pytest.raises(UserError, match="qe_k"):
        postprocess_rank(x, same_set=True, qe_k=-1)
    with pytest.raises(ValueError, match="gallery_feats"):
        postprocess_rank(x, same_set=False)


def test_rerank_benchmark_smoke(tmp_path):
    from benchmarks import rerank_benchmark as bench

    argv = ["--num_images", "300", "--dim", "16", "--num_classes", "60", "--in-process"]
    rows = {
        r["config"]: r
        for r in bench.main(bench.get_args_parser().parse_args(argv + ["--output", str(tmp_path / "o.csv")]))
    }
    assert set(rows) == set(bench.CONFIGS) and all(r["status"] == "ok" for r in rows.values())
    assert (tmp_path / "o.csv").exists()
    x, labels = bench.make_data(300, 16, 60, 0, 2.3)
    want = retrieval_metrics(torch.from_numpy(x), labels, [1, 10, 100])
    assert rows["plain"]["recall@1"] == pytest.approx(want["recall@1"])
    assert rows["plain"]["map@r"] == pytest.approx(want["map@r"])


def test_flip_embed_keep_norm_keeps_each_rows_norm():
    """keep_norm: the flipped direction, at the norm of the image's own features (REIR's sqrt(E) vectors)."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3 * 5 * 5, dtype=torch.float64)

    def embed(model, images):
        return 3.0 * (images.flatten(1) @ weight.t())  # norms far from 1

    images = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    plain, kept = flip_embed(embed)(None, images), flip_embed(embed, keep_norm=True)(None, images)
    torch.testing.assert_close(kept.norm(dim=1), embed(None, images).norm(dim=1))
    torch.testing.assert_close(kept / kept.norm(dim=1, keepdim=True), plain)
