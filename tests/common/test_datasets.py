import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from common.data.datasets import eval_splits, label_space, load_splits
from common.data.images import open_image
from common.data.index import load_index
from common.errors import UserError
from tests.tiny import make_tiny_processed

REPO = Path(__file__).resolve().parents[2]


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


# ----------------------------------------------------------------------- one registry, one read


def test_every_dataset_list_derives_from_the_registry():
    import irt.data
    from common import cli, collection, presets, service
    from common.data import archives, images
    from common.data.registry import ALIASES, BENCHMARKS, CROPPABLE, DATASET_NAMES, REAL_DATASETS, benchmark_name
    from fastretri.config import RELEASED_CONFIGS, data_name, released_config

    assert DATASET_NAMES == ("car", "cub", "sop", "isc", "demo") and REAL_DATASETS == ("car", "cub", "sop", "isc")
    assert cli.DATASETS == DATASET_NAMES and cli.CROPPABLE == CROPPABLE == ("car", "cub", "demo")
    assert set(archives.READERS) == set(BENCHMARKS)
    assert set(presets.DATASET_STATS) == set(RELEASED_CONFIGS) == set(REAL_DATASETS)
    assert all(released_config(name).is_file() for name in DATASET_NAMES)
    assert irt.data.DATASET_ALIASES is ALIASES and set(irt.data.ORIGINAL_NAMES) == set(DATASET_NAMES)
    aliases = [a for b in BENCHMARKS.values() for a in (b.name, *b.aliases)]
    assert len(aliases) == len(set(aliases)) and all(a == a.lower() for a in aliases)
    for spelling, name in [("Cars196", "car"), ("CUB200", "cub"), ("InShop", "isc"), ("SOP", "sop"), ("mine", None)]:
        assert benchmark_name(spelling) == name
        assert data_name({"DATASETS": {"NAMES": [spelling]}}) == (name or spelling)
    assert [eval_splits(n) for n in DATASET_NAMES] == [("test", "test")] * 3 + [("query", "gallery"), ("test", "test")]
    assert (
        collection.IMAGE_EXTENSIONS is images.IMAGE_EXTENSIONS and service.IMAGE_EXTENSIONS is images.IMAGE_EXTENSIONS
    )


def test_a_start_reads_the_index_once_and_sees_a_rewritten_one(tmp_path, monkeypatch):
    from common.data import index as index_module

    make_tiny_processed(tmp_path, "mine", num_classes=4, per_class=2)
    path = tmp_path / "mine" / "uncropped_index.json"
    doc = json.loads(path.read_text())
    doc["eval_splits"] = ["test", "test"]
    path.write_text(json.dumps(doc))
    parsed = []
    monkeypatch.setattr(index_module.json, "loads", lambda text: parsed.append(text) or json.JSONDecoder().decode(text))
    assert eval_splits("mine", str(tmp_path)) == ("test", "test")  # what a script does at its start
    datasets = load_splits(str(tmp_path), "mine", "uncropped", {"train": None, "test": None})
    assert len(parsed) == 1 and len(datasets["train"]) == len(datasets["test"]) == 4
    doc["splits"]["train"] = doc["splits"]["train"][:1]
    path.write_text(json.dumps(doc))  # a new file (e.g. data_utils.py --force) is read again
    assert len(load_index(str(tmp_path), "mine")["train"]) == 1 and len(parsed) == 2


def test_importing_the_data_modules_changes_no_global_state():
    """No warnings filter and no umask change (reading the umask means setting it) happen at import."""
    code = (
        "import os, warnings\n"
        "import numpy, PIL.Image, torch, torchvision, tqdm  # what the libraries set up themselves\n"
        "calls, umask, filters = [], os.umask, list(warnings.filters)\n"
        "os.umask = lambda mask: calls.append(mask) or umask(mask)\n"
        "import benchmarks.gpu_decode, common.data.datasets, common.data.prepare, common.presets, data_utils\n"
        "assert (calls, list(warnings.filters)) == ([], filters), calls\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
