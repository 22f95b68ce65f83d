"""inference.py on a collection that is no dataset split: --gallery (folder or list) -> new database -> queries,
with unreadable images skipped and logged, per-query pages and a summary page."""

import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

from cgd import inference
from cgd.model import model_from_config
from cgd.spec import SPEC
from common.database import load_database
from common.errors import UserError
from tests.tiny import CGD_CONFIG, CGD_RUN, make_tiny_processed, make_untrained_cgd_run

RUN, CONFIG = CGD_RUN, CGD_CONFIG


@pytest.fixture
def run(tmp_path, monkeypatch):
    """An (untrained) CGD run: model file + a database beside it, as cgd/train.py writes them."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=6, per_class=4, size=40)
    folder = make_untrained_cgd_run(tmp_path / "results" / "cgd")
    gallery = tmp_path / "my_photos"
    shutil.copytree(data / "cub" / "images", gallery)
    (gallery / "broken.jpg").write_bytes(b"not a jpeg")
    return tmp_path, folder, gallery


def _infer(*args):
    return inference.main(inference.get_args_parser().parse_args(list(args)))


def _gallery(source, target, *extra):
    """``inference.py --gallery SOURCE --save_data_base TARGET`` with the run's model."""
    args = ("--gallery", str(source), "--save_data_base", str(target), "--num_workers", "0", *extra)
    return _infer("--data_base", f"{RUN}_data_base.pth", *args)


def test_gallery_folder_to_database_and_folder_of_queries(run):
    tmp_path, folder, gallery = run
    target = tmp_path / "mine_data_base.pth"
    assert _gallery(gallery, target) == []
    db = load_database(target)
    images = sorted(str(p) for p in gallery.rglob("img_*.jpg"))
    assert sorted(db.split("gallery").images) == images and set(db.split("gallery").labels) == {-1}
    assert db.config["gd_config"] == "SG" and db.config["model_file"].endswith(f"{RUN}_model.pth")
    assert (tmp_path / "mine_data_base.pth.errors.log").read_text().strip().endswith("broken.jpg")
    # the features are the model's embeddings of those files, in the database's order
    model = model_from_config(CONFIG).eval()
    model.load_state_dict(torch.load(folder / f"{RUN}_model.pth", weights_only=True)["model"])
    x = SPEC.eval_transform(CONFIG)(Image.open(db.split("gallery").images[3]).convert("RGB"))[None]
    torch.testing.assert_close(db.split("gallery").features[3], SPEC.embed(model, x)[0], rtol=1e-4, atol=1e-5)

    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("q1.jpg", "q2.jpg"):
        shutil.copy(images[0], queries / name)
    answers = _infer("--data_base", str(target), "--query_img_name", str(queries), "--retrieval_num", "3")
    assert len(answers) == 2 and answers[0][1][0][0] == images[0]  # a copy finds its original first
    page = (folder / "queries" / "q1.jpg" / "index.html").read_text()
    assert 'src="query_img.jpg"' in page and page.count("<figure>") == 4 and "/" not in page.split("src=")[1][:40]
    summary = (folder / "queries" / "index.html").read_text()
    assert 'href="q1.jpg/index.html"' in summary and 'href="q2.jpg/index.html"' in summary


def test_gallery_csv_with_labels(run):
    tmp_path, folder, gallery = run
    images = sorted(str(p) for p in gallery.rglob("img_*.jpg"))[:6]
    listing = tmp_path / "list.csv"
    pd.DataFrame({"path": images, "label": ["cat", "cat", "dog", "dog", "cow", "cow"]}).to_csv(listing, index=False)
    target = tmp_path / "labelled_data_base.pth"
    _gallery(listing, target)
    labels = load_database(target).split("gallery").labels
    assert labels == [0, 0, 2, 2, 1, 1]  # cat, cow, dog -> 0, 1, 2
    out = _infer("--data_base", str(target), "--query_img_name", images[0], "--retrieval_num", "2")
    assert images[0] not in [p for p, _, _ in out[0][1]]  # a stored image is excluded from its own results


def test_gallery_needs_a_target_and_a_living_model(run):
    tmp_path, folder, gallery = run
    with pytest.raises(UserError, match="--save_data_base"):
        _infer("--data_base", f"{RUN}_data_base.pth", "--gallery", str(gallery))
    target = tmp_path / "g_data_base.pth"
    _gallery(gallery, target)
    (folder / f"{RUN}_model.pth").unlink()
    new = tmp_path / "new.jpg"
    shutil.copy(next(gallery.rglob("img_*.jpg")), new)
    with pytest.raises(UserError, match="no longer exists"):
        _infer("--data_base", str(target), "--query_img_name", str(new))


def test_gallery_with_an_ann_index(run):
    """--index hnsw builds a faiss index beside the database (its recall printed); later queries use it."""
    tmp_path, folder, gallery = run
    target = tmp_path / "ann_data_base.pth"
    _gallery(gallery, target, "--index", "hnsw")
    db = load_database(target)
    assert (
        db.config["ann_index"].endswith("ann_data_base.pth.hnsw.faiss")
        and (tmp_path / "ann_data_base.pth.hnsw.faiss").is_file()
    )
    query = db.split("gallery").images[5]
    approx = _infer("--data_base", str(target), "--query_img_name", query, "--retrieval_num", "3")[0][1]
    exact_db = tmp_path / "exact_data_base.pth"
    _gallery(gallery, exact_db)
    exact = _infer("--data_base", str(exact_db), "--query_img_name", query, "--retrieval_num", "3")[0][1]
    assert [p for p, _, _ in approx] == [p for p, _, _ in exact]  # a 24-image HNSW graph finds the exact top 3
    assert query not in [p for p, _, _ in approx]
