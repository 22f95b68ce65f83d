"""The synthetic demo dataset: raw CUB layout, disjoint classes, determinism, ensure_demo (its build time is a
speed goal, measured by benchmarks, not asserted here)."""

import json

import numpy as np
import pytest
from PIL import Image

import data_utils
from common.data.demo import IMAGE_SIZE, PATTERNS, SHAPES, demo_classes, generate_demo, render
from common.data.prepare import ensure_dataset, ensure_demo
from tests.fakes import make_fake_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The full demo built through the CLI entry point once."""
    data_path = tmp_path_factory.mktemp("demo_data")
    args = data_utils.get_args_parser().parse_args(["--data_path", str(data_path), "--data_name", "demo"])
    data_utils.main(args)
    return data_path


def test_demo_raw_layout_is_cub(demo):
    root = demo / "demo"
    for name in (
        "README",
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "classes.txt",
        "bounding_boxes.txt",
        "uncropped_index.json",
        "cropped_index.json",
    ):
        assert (root / name).is_file(), name
    images = [line.split() for line in (root / "images.txt").read_text().splitlines()]
    labels = dict(line.split() for line in (root / "image_class_labels.txt").read_text().splitlines())
    classes = dict(line.split() for line in (root / "classes.txt").read_text().splitlines())
    assert 1500 <= len(images) <= 2500 and len(classes) == 64
    for image_id, rel in images[:: len(images) // 50]:
        folder = rel.split("/")[0]
        assert folder == classes[labels[image_id]] and folder.startswith(f"{int(labels[image_id]):03d}.")
        assert Image.open(root / "images" / rel).size == (IMAGE_SIZE, IMAGE_SIZE)
    boxes = [line.split() for line in (root / "bounding_boxes.txt").read_text().splitlines()]
    assert len(boxes) == len(images) and all(v.endswith(".0") for row in boxes for v in row[1:])


def test_demo_train_and_test_classes_are_disjoint(demo):
    for crop_type in ("uncropped", "cropped"):
        index = json.loads((demo / "demo" / f"{crop_type}_index.json").read_text())
        assert index["dataset"] == "demo" and index["crop_type"] == crop_type
        train = {label for _, label in index["splits"]["train"]}
        test = {label for _, label in index["splits"]["test"]}
        assert train == {str(i) for i in range(1, 33)} and test == {str(i) for i in range(33, 65)}


def test_demo_test_combinations_reuse_training_factors():
    classes = demo_classes()
    assert len(set(classes)) == 64
    train, test = classes[:32], classes[32:]
    for factor in (0, 1):  # every shape and every pattern is seen in training, every test pair is new
        assert {c[factor] for c in train} == {c[factor] for c in test}
    assert not set(train) & set(test)


def test_every_class_renders_a_visible_shape_with_a_tight_box():
    for shape in SHAPES:
        for pattern in PATTERNS:
            pixels, (x, y, w, h) = render(shape, pattern, np.random.default_rng(0))
            assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.dtype == np.uint8
            assert w >= 10 and h >= 10 and x + w <= IMAGE_SIZE and y + h <= IMAGE_SIZE


def test_generation_is_deterministic(tmp_path):
    a = generate_demo(tmp_path / "a", images_per_class=1)
    b = generate_demo(tmp_path / "b", images_per_class=1)
    assert (a / "bounding_boxes.txt").read_text() == (b / "bounding_boxes.txt").read_text()
    for rel in ("001.circle_solid/circle_solid_0001.jpg", "064.ell_rings/ell_rings_0001.jpg"):
        assert (a / "images" / rel).read_bytes() == (b / "images" / rel).read_bytes()


def test_ensure_demo_only_builds_when_missing(demo, capsys):
    index = demo / "demo" / "cropped_index.json"
    stamp = index.stat().st_mtime_ns
    ensure_demo(demo)
    assert ensure_dataset(demo, "demo", "cropped") == index and index.stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == ""


def test_ensure_dataset_builds_a_missing_demo(tmp_path):
    make_fake_dataset(tmp_path, "demo")  # 2 images per class: raw files only, no index yet
    assert not (tmp_path / "demo" / "uncropped_index.json").exists()
    path = ensure_dataset(tmp_path, "demo", "uncropped")
    splits = json.loads(path.read_text())["splits"]
    assert len(splits["train"]) == len(splits["test"]) == 64
