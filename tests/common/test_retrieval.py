"""common.runs and common.query: databases by name, the model file next to them, embedding new files, unlabelled
rendering."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.database import Split, save_database
from common.errors import UserError
from common.query import embed_file, labelled
from common.render import save_retrieval
from common.runio import atomic_save, load_model_file
from common.runs import database_path, model_path, open_database, run_prefix
from common.search import search

NAME = "car_uncropped_run_data_base.pth"


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A CGD database saved as results/cgd/<NAME> under a tmp RETRIEVAL_RESULTS."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    split = Split(["a.jpg", "b.jpg", "c.jpg"], [0, 1, 0], torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0]]))
    save_database(
        tmp_path / "results" / "cgd" / NAME,
        config={"gd_config": "SG", "feature_dim": 2},
        method="cgd",
        splits={"test": split},
        metric="euclidean",
    )
    return tmp_path / "results"


def test_database_by_name_under_results(results):
    path, db = open_database(NAME, "cgd")
    assert path == results / "cgd" / NAME and db.method == "cgd"
    assert database_path(str(path), "cgd") == path  # a path is taken as given
    assert database_path("sub/x_data_base.pth", "cgd") == Path("sub/x_data_base.pth")


def test_other_method_and_explicit_flags_refused(results):
    path = str(results / "cgd" / NAME)
    with pytest.raises(UserError, match="written by 'cgd', not by REIR"):
        open_database(path, "reir")
    with pytest.raises(UserError, match="not by FastRetri"):
        open_database(path, "fastretri")
    with pytest.raises(UserError, match="database not found: .*reir"):
        open_database(NAME, "reir")  # a bare name is looked up under results/reir/
    with pytest.raises(UserError, match="gd_config='SG' \\(expected 'MG'\\)"):
        open_database(NAME, "cgd", {"gd_config": "MG"})
    open_database(NAME, "cgd", {"gd_config": "SG", "feature_dim": None})  # None = flag not given: not checked


def test_model_path_next_to_the_database(tmp_path):
    db = tmp_path / "cub_uncropped_resnet18_data_base.pth"
    assert model_path(db) == tmp_path / "cub_uncropped_resnet18_model.pth"
    assert run_prefix(db) == "cub_uncropped_resnet18" and run_prefix(tmp_path / "other.pth") == "other"
    with pytest.raises(UserError, match="not named <run>_data_base.pth"):
        model_path(tmp_path / "other.pth")


def test_load_model_file_checks_config_and_weights(tmp_path):
    path = tmp_path / "m_model.pth"
    atomic_save({"config": {"dim": 2}, "model": nn.Linear(2, 2).state_dict()}, path)
    model = load_model_file(path, {"dim": 2}, ["dim"], lambda state: nn.Linear(state["config"]["dim"], 2))
    assert isinstance(model, nn.Linear)
    with pytest.raises(UserError, match="dim=2 \\(expected 3\\)"):
        load_model_file(path, {"dim": 3}, ["dim"], lambda state: nn.Linear(3, 2))
    with pytest.raises(UserError, match="does not fit its configuration"):
        load_model_file(path, {"dim": 2}, ["dim"], lambda state: nn.Linear(3, 2))


def _image(path: Path, color) -> str:
    Image.new("RGB", (40, 30), color).save(path)
    return str(path)


def test_embed_file_and_search(tmp_path, results):
    image = _image(tmp_path / "new.png", (255, 0, 0))

    def transform(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).mean((0, 1)) / 255  # (3,): mean R, G, B

    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    feature = embed_file(model, image, transform, torch.device("cpu"))
    torch.testing.assert_close(feature, torch.tensor([1.0, 0.0]))
    pair = embed_file(model, image, transform, torch.device("cpu"), embed=lambda m, x: torch.cat([m(x), m(x)], 1))
    assert pair.shape == (4,)
    _, db = open_database(NAME, "cgd")
    split = db.split("test")
    assert labelled(split, *search(feature[None], split.features, 2, "euclidean"))[0] == [
        ("c.jpg", 0, 0.0),
        ("a.jpg", 0, 1.0),
    ]
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image"):
        embed_file(model, str(tmp_path / "broken.jpg"), transform, torch.device("cpu"))


def test_unlabelled_rendering_writes_the_files_without_frames(tmp_path):
    gray = (128, 128, 128)
    query = _image(tmp_path / "q.png", gray)
    results = [(_image(tmp_path / f"r{i}.png", gray), i, 0.5 / (i + 1)) for i in range(2)]
    out = save_retrieval(tmp_path / "out", query, None, results, size=(64, 64))
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png",
        "query_img.jpg",
        "retrieval_img_1_0.5000.jpg",
        "retrieval_img_2_0.2500.jpg",
    ]
    for name in ("retrieval_img_1_0.5000.jpg", "retrieval_img_2_0.2500.jpg"):
        corner = np.asarray(Image.open(out / name))[2, 2].astype(int)
        assert np.abs(corner - 128).max() < 10  # plain image: no green/red frame
    grid = np.asarray(Image.open(out / "grid.png")).astype(int)
    assert np.abs(grid[10, 10] - 128).max() < 10 and np.abs(grid[10, 10 + 168] - 128).max() < 10  # no frames
    framed = np.asarray(
        Image.open(save_retrieval(tmp_path / "lab", query, 0, results, size=(64, 64)) / "retrieval_img_1_0.5000.jpg")
    )[2, 2]
    assert framed[1] > 200 and framed[0] < 60  # with a label the same result is framed green
