import numpy as np
import pytest
import torch
from PIL import Image

from common.compare import compare_databases
from common.database import Database, Split, find_query, load_database, save_database
from common.errors import UserError
from common.render import save_retrieval


def _images(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (30, 20), (10 * i, 100, 200)).save(p)
        paths.append(str(p))
    return paths


def test_save_retrieval_writes_the_originals_files(tmp_path):
    paths = _images(tmp_path, 3)
    out = save_retrieval(
        tmp_path / "out" / "img0", paths[0], 1, [(paths[1], 1, 0.5), (paths[2], 2, 0.25)], size=(64, 64)
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "query_img.jpg", "retrieval_img_1_0.5000.jpg", "retrieval_img_2_0.2500.jpg"]
    good = np.asarray(Image.open(out / "retrieval_img_1_0.5000.jpg"))
    bad = np.asarray(Image.open(out / "retrieval_img_2_0.2500.jpg"))
    assert good[3, 32, 1] > 200 and good[3, 32, 0] < 60  # green frame, 8 px wide
    assert bad[3, 32, 0] > 200 and bad[3, 32, 1] < 60  # red frame
    assert Image.open(out / "query_img.jpg").size == (64, 64)


def _db(features, labels, images, metric="cosine"):
    return Database(
        {},
        "x",
        metric,
        1.0,
        "test",
        "test",
        {"test": Split(images, labels, torch.tensor(features, dtype=torch.float32))},
    )


def test_compare_databases_metrics_by_hand(tmp_path):
    images = _images(tmp_path, 4)
    labels = [0, 0, 1, 1]
    # 'better' pairs every image with its class mate; 'worse' with the other class (always wrong at K=1).
    better = _db([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], labels, images)
    worse = _db([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]], labels, images)
    m = compare_databases(better, worse, k=1, save_dir=tmp_path / "wins")
    assert m["better_AR@1"] == 100.0 and m["worse_AR@1"] == 0.0  # worse has no query with a hit
    assert m["wins"] == 4 and m["losses"] == 0 and m["Better_Ratio@1"] == float("inf")
    assert m["GE_Rate@1"] == 100.0
    example = tmp_path / "wins" / "img0.png"  # the path relative to the images' folder
    assert (example / "query_img.jpg").is_file()
    assert len(list((example / "better").glob("retrieval_img_1_*.jpg"))) == 1
    assert len(list((example / "worse").glob("retrieval_img_1_*.jpg"))) == 1


def test_compare_refuses_different_datasets(tmp_path):
    images = _images(tmp_path, 2)
    a = _db([[1, 0], [0, 1]], [0, 1], images)
    b = _db([[1, 0], [0, 1]], [0, 0], images)
    with pytest.raises(UserError, match="different"):
        compare_databases(a, b, k=1)


def test_database_round_trip_and_refusal(tmp_path):
    split = Split(["a.jpg", "b.jpg"], [0, 1], torch.eye(2))
    save_database(
        tmp_path / "db.pth", config={"gd_config": "SG"}, method="cgd", splits={"test": split}, metric="euclidean"
    )
    db = load_database(tmp_path / "db.pth", {"gd_config": "SG"}, ["gd_config"])
    assert db.metric == "euclidean" and torch.equal(db.split("test").features, torch.eye(2))
    with pytest.raises(UserError, match="gd_config='SG' \\(expected 'MG'\\)"):
        load_database(tmp_path / "db.pth", {"gd_config": "MG"}, ["gd_config"])


def test_find_query_by_path_or_unique_name(tmp_path):
    images = ["/d/x/a.jpg", "/d/y/b.jpg", "/d/z/b.jpg"]
    assert find_query(images, "/d/x/a.jpg") == 0 and find_query(images, "a.jpg") == 0
    with pytest.raises(UserError, match="ambiguous"):
        find_query(images, "b.jpg")
    with pytest.raises(UserError, match="not found"):
        find_query(images, "c.jpg")
