"""A database that grows and shrinks: inference.py --add / --remove (only new images embedded, present paths
skipped, labels by name), the faiss index updated in place, atomic under SIGKILL, and 2 torchrun processes = 1."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cgd.model import model_from_config
from cgd.spec import SPEC
from common.ann import build_index, load_index, save_index
from common.catalogue import commit, locked
from common.database import Split, load_database, save_database
from tests.ddp import REPO, run_script
from tests.serving import RUN, demo_photos, gallery_database, infer
from tests.tiny import CGD_CONFIG, make_tiny_processed, make_untrained_cgd_run


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    return demo_photos(tmp_path / "photos", classes=4, per_class=5)


def _embedding(folder: Path, path: str) -> torch.Tensor:
    """The untrained run's embedding of one file, computed here independently of the catalogue code."""
    model = model_from_config(CGD_CONFIG).eval()
    model.load_state_dict(torch.load(folder / f"{RUN}_model.pth", weights_only=True)["model"])
    with torch.no_grad():
        return SPEC.embed(model, SPEC.eval_transform(CGD_CONFIG)(Image.open(path).convert("RGB"))[None])[0]


def _listing(path: Path, rows) -> str:
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(path, index=False)
    return str(path)


def test_add_embeds_only_new_images_and_skips_present_paths(tmp_path, photos, capsys):
    first = tmp_path / "first.txt"
    first.write_text("\n".join(photos[:8]) + "\n")
    db_path = gallery_database(tmp_path, str(first))
    before = load_database(db_path).split("gallery")
    Path(photos[1]).write_bytes(b"now unreadable")  # a stored image re-read would be reported unreadable

    infer("--data_base", str(db_path), "--add", str(tmp_path / "photos"), "--num_workers", "0")
    out = capsys.readouterr().out
    after = load_database(db_path).split("gallery")
    assert "added 12, skipped 8 already present and 0 unreadable" in out
    assert after.images == before.images + photos[8:] and after.labels == [-1] * 20
    torch.testing.assert_close(after.features[:8], before.features, rtol=0, atol=0)  # stored rows untouched
    folder = tmp_path / "results" / "cgd"
    for i in (8, 13, 19):
        torch.testing.assert_close(after.features[i], _embedding(folder, photos[i]), rtol=1e-4, atol=1e-5)

    stamp = os.stat(db_path)
    spelled_differently = os.path.relpath(tmp_path / "photos", os.getcwd())
    infer("--data_base", str(db_path), "--add", spelled_differently, "--num_workers", "0")
    assert "added 0, skipped 20 already present" in capsys.readouterr().out
    assert os.stat(db_path).st_mtime_ns == stamp.st_mtime_ns and os.stat(db_path).st_ino == stamp.st_ino


def test_labels_from_a_csv_keep_one_id_per_name(tmp_path, photos):
    db_path = gallery_database(
        tmp_path, _listing(tmp_path / "a.csv", [(photos[0], "cat"), (photos[1], "dog"), (photos[2], "dog")])
    )
    db = load_database(db_path)
    assert db.split("gallery").labels == [0, 1, 1] and db.config["label_names"] == {"cat": 0, "dog": 1}
    listing = _listing(tmp_path / "b.csv", [(photos[3], "dog"), (photos[4], "ant"), (photos[0], "cow")])
    infer("--data_base", str(db_path), "--add", listing, "--num_workers", "0")
    db = load_database(db_path)
    # dog keeps its id, ant is new (2), photos[0] is present (its label is not changed), cow is never used
    assert db.split("gallery").labels == [0, 1, 1, 1, 2]
    assert db.config["label_names"] == {"cat": 0, "dog": 1, "ant": 2}


def test_remove_rows(tmp_path, photos, capsys):
    db_path = gallery_database(tmp_path, str(tmp_path / "photos"))
    before = load_database(db_path).split("gallery")
    gone = tmp_path / "gone.txt"
    gone.write_text(f"{photos[3]}\n{photos[11]}\n{tmp_path / 'never_added.jpg'}\n")
    infer("--data_base", str(db_path), "--remove", str(gone))
    assert "removed 2 (1 not in the database): 18 images (embedding" in capsys.readouterr().out
    after = load_database(db_path).split("gallery")
    keep = [i for i in range(20) if i not in (3, 11)]
    assert after.images == [before.images[i] for i in keep]
    torch.testing.assert_close(after.features, before.features[keep], rtol=0, atol=0)
    infer("--data_base", str(db_path), "--remove", photos[5])  # a single image file
    assert photos[5] not in load_database(db_path).split("gallery").images


# ---------------------------------------------------------------- the faiss index


def _synthetic(tmp_path: Path, n: int, dim: int = 16, kind: str = "ivf", seed: int = 0) -> Path:
    """A database of ``n`` random unit rows with a ``kind`` index named in its configuration."""
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)
    db_path = tmp_path / "syn_data_base.pth"
    config = {"method": "cgd"}
    if kind:
        index = build_index(x, "euclidean", kind, log=None)
        config["ann_index"] = str(tmp_path / f"syn_data_base.pth.{kind}.faiss")
        save_index(index, config["ann_index"])
    gallery = Split([f"img/{i:06d}.jpg" for i in range(n)], [i % 7 for i in range(n)], x)
    save_database(db_path, config=config, method="cgd", splits={"gallery": gallery}, metric="euclidean",
                  query="gallery", gallery="gallery")  # fmt: skip
    return db_path


def _stored_vectors(path: str) -> np.ndarray:
    """Every vector of an index by its id (IVF through a direct map made here, on a copy)."""
    ann = load_index(path).faiss_index
    if isinstance(ann, faiss.IndexIVFFlat):
        ann.make_direct_map()
    return ann.reconstruct_n(0, ann.ntotal)


def _centroids(path: str) -> np.ndarray:
    ann = load_index(path).faiss_index  # keep the index alive: it owns its quantizer
    return ann.quantizer.reconstruct_n(0, ann.quantizer.ntotal)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_index_follows_additions_and_removals(tmp_path, kind):
    db_path = _synthetic(tmp_path, 3000, kind=kind)
    db = load_database(db_path)
    old_index = db.config["ann_index"]
    centroids = _centroids(old_index) if kind == "ivf" else None
    rng = np.random.default_rng(1)
    keep = np.ones(3000, dtype=bool)
    keep[rng.choice(3000, 150, replace=False)] = False
    new = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    with locked(db_path):
        commit(db_path, db, keep, Split([f"new/{i}.jpg" for i in range(200)], [-1] * 200, new))
    db = load_database(db_path)
    gallery = db.split("gallery")
    assert len(gallery.images) == 3050 and db.config["ann_index"].endswith(f"syn_data_base.pth.{kind}.1.faiss")
    assert not Path(old_index).exists()
    vectors = _stored_vectors(db.config["ann_index"])
    np.testing.assert_array_equal(vectors, gallery.features.numpy())  # id i holds row i, for every row
    if kind == "ivf":  # updated in place: the trained coarse quantizer is the one built with the database
        np.testing.assert_array_equal(_centroids(db.config["ann_index"]), centroids)
        ann = load_index(db.config["ann_index"]).faiss_index
        ann.nprobe = ann.nlist
        _, ids = ann.search(gallery.features[::50].numpy(), 1)
        np.testing.assert_array_equal(ids[:, 0], np.arange(0, 3050, 50))
    # additions only: the index grows in place for both kinds
    with locked(db_path):
        commit(db_path, db, np.ones(3050, dtype=bool), Split(["more.jpg"], [3], torch.ones(1, 16) / 4))
    gallery = load_database(db_path).split("gallery")
    np.testing.assert_array_equal(_stored_vectors(load_database(db_path).config["ann_index"]), gallery.features)


def test_add_keeps_the_index_of_a_gallery_database(tmp_path, photos, capsys):
    db_path = gallery_database(tmp_path, str(Path(photos[0]).parent), "g_data_base.pth", "--index", "ivf")
    infer("--data_base", str(db_path), "--add", str(tmp_path / "photos"), "--num_workers", "0")
    db = load_database(db_path)
    assert db.config["ann_index"].endswith("g_data_base.pth.ivf.1.faiss")
    assert not (tmp_path / "g_data_base.pth.ivf.faiss").exists()
    np.testing.assert_array_equal(_stored_vectors(db.config["ann_index"]), db.split("gallery").features)
    infer("--data_base", str(db_path), "--add", photos[0], "--index", "hnsw", "--num_workers", "0")  # another kind
    db = load_database(db_path)
    assert load_index(db.config["ann_index"]).kind == "hnsw" and "skipped 1 already present" in capsys.readouterr().out


# ---------------------------------------------------------------- atomic under SIGKILL

_LOOP = """
import os, sys, numpy as np, torch
from pathlib import Path
from common.catalogue import commit, locked
from common.database import Split, load_database

def updates(db_path):
    while True:
        with locked(db_path):
            db = load_database(db_path, mmap=True)
            g = db.config.get("generation", 0) + 1
            n = len(db.split("gallery").images)
            if g % 2:  # odd generations add 300 rows, even ones remove them again
                rows = torch.from_numpy(np.random.default_rng(g).standard_normal((300, 16)).astype("float32"))
                new = Split([f"g{g}/{i}.jpg" for i in range(300)], [g] * 300, rows)
                commit(db_path, db, np.ones(n, dtype=bool), new)
            else:
                commit(db_path, db, np.arange(n) < n - 300, Split([], [], torch.empty(0, 16)))

for line in sys.stdin:  # imports once; each line forks a process that updates until it is killed
    pid = os.fork()
    if pid == 0:
        updates(Path(sys.argv[1]))
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def _check_generation(db_path: Path, base: Split) -> int:
    """The database is exactly the state of the generation it claims, and its index matches it."""
    db = load_database(db_path)
    g = db.config.get("generation", 0)
    gallery = db.split("gallery")
    if g % 2:
        rows = torch.from_numpy(np.random.default_rng(g).standard_normal((300, 16)).astype("float32"))
        assert gallery.images == base.images + [f"g{g}/{i}.jpg" for i in range(300)]
        torch.testing.assert_close(gallery.features, torch.cat([base.features, rows]), rtol=0, atol=0)
    else:
        assert gallery.images == base.images
        torch.testing.assert_close(gallery.features, base.features, rtol=0, atol=0)
    np.testing.assert_array_equal(_stored_vectors(db.config["ann_index"]), gallery.features.numpy())
    return g


def test_update_survives_sigkill_at_any_moment(tmp_path):
    db_path = _synthetic(tmp_path, 20000, kind="ivf")
    base = load_database(db_path).split("gallery")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rng = np.random.default_rng(0)
    generations = []
    with subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(db_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    ) as parent:
        for _ in range(6):
            parent.stdin.write(b"go\n")
            parent.stdin.flush()
            pid = int(parent.stdout.readline())
            time.sleep(rng.uniform(0.05, 1.5))
            os.kill(pid, signal.SIGKILL)
            assert parent.stdout.readline().strip() == b"reaped"
            generations.append(_check_generation(db_path, base))
        parent.stdin.close()
    assert generations[-1] >= 2, generations  # updates did complete between the kills
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".faiss")]
    with locked(db_path):  # the next update removes what killed ones left behind
        commit(db_path, load_database(db_path), np.ones(len(load_database(db_path).split("gallery").images), bool),
               Split(["x.jpg"], [0], torch.zeros(1, 16)))  # fmt: skip
    after = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".faiss"))
    assert after == [Path(load_database(db_path).config["ann_index"]).name], (leftovers, after)


# ---------------------------------------------------------------- torchrun: 2 processes = 1


def test_two_processes_embed_like_one(tmp_path, monkeypatch, capsys):
    """--gallery then --add under torchrun (2 gloo processes, float64) write what one process writes."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    make_untrained_cgd_run(tmp_path / "results" / "cgd")
    photos = demo_photos(tmp_path / "photos", classes=3, per_class=5)
    Path(photos[4]).write_bytes(b"broken")
    half = tmp_path / "half.txt"
    half.write_text("\n".join(photos[:7]) + "\n")
    common = ["--num_workers", "0", "--batch_size", "3", "--float64"]

    def steps(target: Path):
        gallery = ["--data_base", f"{RUN}_data_base.pth", "--gallery", str(half), "--save_data_base", str(target)]
        return gallery + common, ["--data_base", str(target), "--add", str(tmp_path / "photos"), *common]

    one, two = tmp_path / "p1_data_base.pth", tmp_path / "p2_data_base.pth"
    for argv in steps(one):
        infer(*argv)
    out = capsys.readouterr().out
    for argv in steps(two):
        out += run_script("cgd/inference.py", argv, tmp_path / "results", nproc=2)
    for target in (one, two):
        assert (Path(f"{target}.errors.log")).read_text() == f"{photos[4]}\n"
    assert out.count("added 8, skipped 6 already present and 1 unreadable") == 2, out
    assert "embedding the gallery: 7 images shared by 2 processes" in out and "9 images shared by 2 processes" in out
    dbs = [load_database(target).split("gallery") for target in (one, two)]
    assert dbs[0].images == dbs[1].images == photos[:4] + photos[5:]
    torch.testing.assert_close(dbs[0].features, dbs[1].features, rtol=1e-6, atol=1e-7)
    folder = tmp_path / "results" / "cgd"
    torch.testing.assert_close(dbs[1].features[9], _embedding(folder, dbs[1].images[9]), rtol=1e-4, atol=1e-5)


def test_test_script_two_processes_like_one(tmp_path, monkeypatch):
    """test.py under torchrun: each process embeds a shard of the evaluation split; rank 0 writes what one process
    writes (metrics CSV and --save_data_base)."""
    from cgd import test as cgd_test

    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=6, per_class=5, size=40)
    folder = make_untrained_cgd_run(tmp_path / "results" / "cgd")
    common = ["--data_base", f"{RUN}_data_base.pth", "--data_path", str(data), "--num_workers", "0", "--float64"]
    common += ["--batch_size", "4", "--recalls", "1,2,4"]
    cgd_test.main(cgd_test.get_args_parser().parse_args(common + ["--save_data_base", str(tmp_path / "one.pth")]))
    shutil.move(folder / f"{RUN}_test_metrics.csv", tmp_path / "one.csv")
    out = run_script("cgd/test.py", common + ["--save_data_base", str(tmp_path / "two.pth")], tmp_path / "results", 2)
    assert out.count("metrics saved to") == 1  # rank 0 only
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "one.csv"), pd.read_csv(folder / f"{RUN}_test_metrics.csv"))
    a, b = (load_database(tmp_path / f"{n}.pth").split("test") for n in ("one", "two"))
    assert a.images == b.images and len(a.images) == 15
    torch.testing.assert_close(a.features, b.features, rtol=1e-6, atol=1e-7)


def test_add_needs_an_existing_database(tmp_path, photos):
    from common.errors import UserError

    with pytest.raises(UserError, match="not found"):
        infer("--data_base", str(tmp_path / "none_data_base.pth"), "--add", str(tmp_path / "photos"))
    db_path = gallery_database(tmp_path, str(Path(photos[0]).parent))
    with pytest.raises(UserError, match="give one of them"):
        infer("--data_base", str(db_path), "--add", photos[1], "--gallery", photos[2], "--save_data_base", "x.pth")
    shutil.rmtree(tmp_path / "photos")
    with pytest.raises(UserError, match="no such folder"):
        infer("--data_base", str(db_path), "--add", str(tmp_path / "photos"))
