"""fast-reid's training samplers (data/samplers), re-stated here from their code, against fastretri.data.

fast-reid trains on an endless index stream: ``TrainingSampler`` concatenates seeded permutations, the identity
samplers build batches identity by identity; every rank runs the same stream and takes
``islice(stream, rank, None, world)``, ``BatchSampler(drop_last=True)`` cuts mini-batches, and an epoch is
``len(dataset) // IMS_PER_BATCH`` iterations of it (DefaultTrainer.iters_per_epoch).
"""

import copy
import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest

from common.errors import UserError
from fastretri.config import check_config, load_config
from fastretri.data import build_train_sampler


def _cfg(sampler="TrainingSampler", batch=8, k=4, seed=3):
    return load_config(
        None,
        [
            "DATALOADER.SAMPLER_TRAIN",
            sampler,
            "SOLVER.IMS_PER_BATCH",
            str(batch),
            "DATALOADER.NUM_INSTANCE",
            str(k),
            "SEED",
            str(seed),
        ],
    )


def _ours(cfg, labels, epochs, rank=0, world=1, start=1):
    sampler = build_train_sampler(cfg, labels, rank, world)
    out = []
    for epoch in range(start, start + epochs):
        sampler.set_epoch(epoch)
        out += [list(b) for b in sampler]
    return out


# ---- fast-reid, re-stated (global np.random as fast-reid uses it) ----


def _fastreid_training(size, seed):
    np.random.seed(seed)
    while True:
        yield from np.random.permutation(size)


def _reorder_index(batch, world):
    mini = len(batch) // world
    return [batch[i + j * mini] for i in range(mini) for j in range(world)]


def _fastreid_naive(labels, mini_batch, k, world, seed):
    pid_index = defaultdict(list)
    for index, pid in enumerate(labels):
        pid_index[pid].append(index)
    pids = sorted(pid_index)
    per_batch, batch_size = mini_batch // k, mini_batch * world
    np.random.seed(seed)
    while True:
        avl_pids, idxs_of, batch = copy.deepcopy(pids), {}, []
        while len(avl_pids) >= per_batch:
            for pid in np.random.choice(avl_pids, per_batch, replace=False).tolist():
                if pid not in idxs_of:
                    idxs = copy.deepcopy(pid_index[pid])
                    if len(idxs) < k:
                        idxs = np.random.choice(idxs, size=k, replace=True).tolist()
                    np.random.shuffle(idxs)
                    idxs_of[pid] = idxs
                avl = idxs_of[pid]
                for _ in range(k):
                    batch.append(avl.pop(0))
                if len(avl) < k:
                    avl_pids.remove(pid)
            if len(batch) == batch_size:
                yield from _reorder_index(batch, world)
                batch = []


def _fastreid_balanced(labels, mini_batch, k, world, seed):
    data_source = [(f"img{i}.jpg", pid, "0") for i, pid in enumerate(labels)]  # FastRetri: every camid is '0'
    index_pid, pid_cam, pid_index = {}, defaultdict(list), defaultdict(list)
    for index, (_, pid, cam) in enumerate(data_source):
        index_pid[index] = pid
        pid_cam[pid].append(cam)
        pid_index[pid].append(index)
    pids = sorted(pid_index)
    per_batch, batch_size = mini_batch // k, mini_batch * world

    def no_index(a, b):
        return [i for i, j in enumerate(a) if j != b]

    np.random.seed(seed)
    while True:
        identities = np.random.permutation(len(pids))
        drop = len(pids) % (per_batch * world)
        if drop:
            identities = identities[:-drop]
        batch = []
        for kid in identities:
            i = np.random.choice(pid_index[pids[kid]])
            _, i_pid, i_cam = data_source[i]
            batch.append(i)
            cams, index = pid_cam[index_pid[i]], pid_index[index_pid[i]]
            select_cams = no_index(cams, i_cam)
            if select_cams:
                picks = np.random.choice(select_cams, size=k - 1, replace=len(select_cams) < k)
            else:
                others = no_index(index, i)
                if not others:
                    picks = [0] * (k - 1)
                else:
                    picks = np.random.choice(others, size=k - 1, replace=len(others) < k)
            batch += [index[kk] for kk in picks]
            if len(batch) == batch_size:
                yield from _reorder_index(batch, world)
                batch = []


def _fastreid_batches(stream, rank, world, mini_batch, count):
    """fast-reid's loader: the rank's islice of the stream, cut by BatchSampler(drop_last=True)."""
    mine = itertools.islice(stream, rank, None, world)
    return [[int(i) for i in itertools.islice(mine, mini_batch)] for _ in range(count)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_training_sampler_is_fastreid_stream(world):
    n, batch, epochs = 50, 8, 5
    labels = [i % 7 for i in range(n)]
    for rank in range(world):
        ours = _ours(_cfg(batch=batch), labels, epochs, rank, world)
        expected = _fastreid_batches(_fastreid_training(n, 3), rank, world, batch // world, epochs * (n // batch))
        assert ours == expected


def test_training_sampler_drops_nothing_and_resumes():
    n, batch = 50, 8  # 6 iterations (48 images) per epoch: the two left over open the next epoch
    labels = [0] * n
    flat = [i for b in _ours(_cfg(batch=batch), labels, 3) for i in b]
    for p in range(len(flat) // n):  # every complete pass of the stream holds each image exactly once
        assert sorted(flat[p * n : (p + 1) * n]) == list(range(n))
    assert len(set(flat[:96])) == n  # epochs 1 and 2 together see all 50
    assert _ours(_cfg(batch=batch), labels, 1, start=3) == _ours(_cfg(batch=batch), labels, 3)[-6:]  # --resume


@pytest.mark.parametrize(
    "name, restated", [("NaiveIdentitySampler", _fastreid_naive), ("BalancedIdentitySampler", _fastreid_balanced)]
)
def test_identity_samplers_are_fastreid(name, restated):
    rng = np.random.default_rng(0)
    labels = [int(x) for x in rng.integers(0, 9, 60)] + [9]  # uneven classes, one with a single image
    batch, k, epochs = 8, 4, 6
    ours = _ours(_cfg(name, batch, k), labels, epochs)
    expected = _fastreid_batches(restated(labels, batch, k, 1, 3), 0, 1, batch, epochs * (len(labels) // batch))
    assert ours == expected
    for b in ours:  # K images of each of batch / K identities
        assert sorted(Counter(labels[i] for i in b).values()) == [k] * (batch // k)
    # two processes: rank r takes block r of the same global batch (fast-reid's reorder_index keeps identities
    # on one rank); the global batch is drawn as one process draws it
    ranks = [_ours(_cfg(name, batch, k), labels, epochs, r, 2) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == ours


def test_identity_sampler_batch_must_hold_whole_identities():
    with pytest.raises(UserError, match="multiple of DATALOADER.NUM_INSTANCE 3"):
        check_config(_cfg("NaiveIdentitySampler", 8, 3))
    check_config(_cfg("TrainingSampler", 8, 3))  # NUM_INSTANCE does not concern the plain sampler
