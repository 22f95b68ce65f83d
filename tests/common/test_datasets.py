import json

import pytest
from PIL import Image

from common.datasets import eval_splits, label_space, load_index, load_splits, open_image
from common.errors import UserError
from tests.tiny import make_tiny_processed


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_open_image_always_gives_rgb(tmp_path, mode):
    path = tmp_path / f"x_{mode.replace(';', '')}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    Image.new(mode, (7, 5)).save(path)
    img = open_image(str(path))
    assert img.mode == "RGB" and img.size == (7, 5)


def test_missing_index_names_the_command(tmp_path):
    with pytest.raises(UserError, match="python data_utils.py --data_path .* --data_name cub"):
        load_index(str(tmp_path), "cub")


def test_inshop_query_and_gallery_share_one_label_space(tmp_path):
    make_tiny_processed(tmp_path, "isc", num_classes=6, per_class=4)
    index = load_index(str(tmp_path), "isc")
    assert label_space(index, "query") == label_space(index, "gallery")
    ds = load_splits(str(tmp_path), "isc", "uncropped", {"query": None, "gallery": None})
    q, g = ds["query"], ds["gallery"]
    for path, label in zip(q.images, q.labels):
        item = path.split("/")[-2]
        assert {lab for p, lab in zip(g.images, g.labels) if p.split("/")[-2] == item} == {label}
    assert eval_splits("isc") == ("query", "gallery") and eval_splits("cub") == ("test", "test")


def test_numeric_labels_sort_numerically(tmp_path):
    folder = tmp_path / "sop"
    folder.mkdir()
    index = {"splits": {"train": [["a.jpg", "10"], ["b.jpg", "2"], ["c.jpg", "1"]]}}
    (folder / "uncropped_index.json").write_text(json.dumps(index))
    assert label_space(load_index(str(tmp_path), "sop"), "train") == {"1": 0, "2": 1, "10": 2}


def test_corrupt_index_is_a_user_error(tmp_path):
    (tmp_path / "cub").mkdir()
    (tmp_path / "cub" / "uncropped_index.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_index(str(tmp_path), "cub")
