"""Users' own data: data_utils.py --from_folder / --from_csv -> the benchmarks' JSON index, and its use by the methods.

Every image is a tiny coordinate gradient (red = x, green = y, blue = an id), so a crop's top-left pixel tells where
it was cut and every file is distinct.
"""

import csv
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import data_utils
from common import errors
from common.cli import common_parser, validate_args
from common.data.datasets import eval_splits, load_splits
from common.data.index import load_index
from common.data.prepare import ensure_dataset
from common.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def gradient(path: Path, size=(24, 20), blue=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size)
    img.putdata([(x * 10 % 256, y * 10 % 256, blue % 256) for y in range(size[1]) for x in range(size[0])])
    img.save(path)  # PNG: lossless, so pixels can be compared exactly
    return path


def make_tree(root: Path, classes, per_class=3, prefix="") -> dict:
    """root/<prefix><class>/<i>.png; returns {class: [absolute paths]}."""
    out = {}
    for c in classes:
        blue = sum(map(ord, prefix + c))
        out[c] = [gradient(root / prefix / c / f"{i}.png", blue=blue + i) for i in range(per_class)]
    return out


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def run_main(*argv):
    args = data_utils.get_args_parser().parse_args(["--num_workers", "1", *map(str, argv)])
    return data_utils.main(args)


def run_cli(*argv):
    """The real command in a subprocess (used where the exit code and stderr themselves are the point)."""
    return subprocess.run(
        [sys.executable, str(REPO / "data_utils.py"), "--num_workers", "1", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


@pytest.fixture
def cli(capsys):
    """data_utils.py's __main__ path (argparse + common.errors.run_cli) in-process: exit code, stdout, stderr."""

    def call(*argv):
        code = 0
        try:
            errors.run_cli(
                data_utils.main, data_utils.get_args_parser().parse_args(["--num_workers", "1", *map(str, argv)])
            )
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return call


def index(data: Path, name: str, crop_type="uncropped") -> dict:
    return json.loads((data / name / f"{crop_type}_index.json").read_text())


def as_sets(doc: dict, data: Path, name: str) -> dict:
    """split -> {(resolved path, label)}: what the index means, whatever form the paths are stored in."""
    root = data / name
    return {split: {(str((root / p).resolve()), label) for p, label in items} for split, items in doc["splits"].items()}


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- folder trees


def test_folder_tree_is_split_by_class_with_a_seeded_ratio(tmp_path):
    classes = [f"class_{i:02d}" for i in range(10)]
    files = make_tree(tmp_path / "photos", classes)
    (tmp_path / "photos/zz_no_images").mkdir()  # ignored: takes no place in the split
    (tmp_path / "photos/zz_no_images/readme.txt").write_text("not an image")
    (tmp_path / "photos/class_00/.hidden.png").write_bytes(b"skipped")
    data = tmp_path / "data"

    def split_folder(name: str, seed: int) -> int:
        argv = ("--data_name", name, "--from_folder", tmp_path / "photos", "--test_ratio", "0.3", "--seed", str(seed))
        return run_main("--data_path", data, *argv)

    assert split_folder("mine", 7) == 0
    got = as_sets(index(data, "mine"), data, "mine")
    order = sorted(classes)
    random.Random(7).shuffle(order)  # the documented rule: shuffle the sorted class names, the first 30 % are test
    test = set(order[:3])
    expected = {
        split: {(str(p.resolve()), c) for c in classes for p in files[c] if (c in test) == (split == "test")}
        for split in ("train", "test")
    }
    assert got == expected
    assert eval_splits("mine", str(data)) == ("test", "test")
    # another seed draws other classes; the same seed the same ones
    split_folder("other", 8)
    assert as_sets(index(data, "other"), data, "other") != got
    split_folder("again", 7)
    assert as_sets(index(data, "again"), data, "again") == got


def test_images_inside_data_path_are_stored_relative_outside_absolute(tmp_path):
    data = tmp_path / "data"
    make_tree(data / "mine", ["a", "b", "c", "d"])  # the class folders live in data/mine itself
    make_tree(data / "elsewhere", ["a", "b", "c", "d"])
    make_tree(tmp_path / "outside", ["a", "b", "c", "d"])
    run_main("--data_path", data, "--data_name", "mine", "--from_folder", data / "mine")
    run_main("--data_path", data, "--data_name", "near", "--from_folder", data / "elsewhere")
    run_main("--data_path", data, "--data_name", "far", "--from_folder", tmp_path / "outside")
    paths = {
        name: [p for items in index(data, name)["splits"].values() for p, _ in items]
        for name in ("mine", "near", "far")
    }
    assert all(not Path(p).is_absolute() and not p.startswith("..") for p in paths["mine"])
    assert all(p.startswith("../elsewhere/") for p in paths["near"])
    assert all(Path(p).is_absolute() for p in paths["far"])
    # readers see plain existing paths (../ folded), so result files show data/elsewhere/...
    for items in load_index(str(data), "near").values():
        for path, label in items:
            assert Path(path).is_file() and ".." not in Path(path).parts and Path(path).parent.name == label


def test_given_train_test_folders_are_kept_and_query_gallery_folders_give_that_protocol(tmp_path):
    root = tmp_path / "split"
    train = make_tree(root, ["a", "b"], prefix="train")
    test = make_tree(root, ["c", "d"], prefix="test")
    data = tmp_path / "data"
    run_main("--data_path", data, "--data_name", "given", "--from_folder", root)
    assert as_sets(index(data, "given"), data, "given") == {
        "train": {(str(p.resolve()), c) for c, ps in train.items() for p in ps},
        "test": {(str(p.resolve()), c) for c, ps in test.items() for p in ps},
    }

    qg = tmp_path / "qg"
    make_tree(qg, ["a", "b"], prefix="train")
    make_tree(qg, ["c", "d"], 1, prefix="query")
    make_tree(qg, ["c", "d", "e"], 2, prefix="gallery")
    run_main("--data_path", data, "--data_name", "shop", "--from_folder", qg)
    doc = index(data, "shop")
    assert {s: len(v) for s, v in doc["splits"].items()} == {"train": 6, "query": 2, "gallery": 6}
    assert eval_splits("shop", str(data)) == ("query", "gallery")
    ds = load_splits(str(data), "shop", "uncropped", {"query": None, "gallery": None})
    names = {
        "query": [Path(p).parent.name for p in ds["query"].images],
        "gallery": [Path(p).parent.name for p in ds["gallery"].images],
    }
    for split in ("query", "gallery"):  # query and gallery share one label space: same class, same integer
        for name, label in zip(names[split], ds[split].labels):
            assert label == {"c": 0, "d": 1, "e": 2}[name]


def test_folder_refusals(tmp_path, cli):
    data = tmp_path / "data"
    root = tmp_path / "split"
    make_tree(root, ["a"], prefix="train")
    make_tree(root, ["b"], prefix="test")
    assert_one_line_error(
        run_cli("--data_path", data, "--data_name", "x", "--from_folder", root, "--test_ratio", "0.5"),
        "--test_ratio applies only",
    )
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "x", "--from_folder", tmp_path / "nothing"), "not found"
    )
    make_tree(tmp_path / "one", ["only"])
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "x", "--from_folder", tmp_path / "one"), "at least two class folders"
    )
    make_tree(tmp_path / "two", ["a", "b"])
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "x", "--from_folder", tmp_path / "two", "--test_ratio", "1"),
        "--test_ratio must be between 0 and 1",
    )
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "car", "--from_folder", tmp_path / "two"), "benchmark name"
    )
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "a/b", "--from_folder", tmp_path / "two"), "--data_name 'a/b'"
    )
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "x", "y", "--from_folder", tmp_path / "two"), "exactly one --data_name"
    )
    assert_one_line_error(cli("--data_path", data, "--data_name", "mine"), "--from_folder DIR")
    make_tree(root, ["a"], prefix="test")  # class 'a' in both given splits
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "x", "--from_folder", root),
        "1 class(es) in both train and test (e.g. 'a')",
    )
    assert not data.exists() or not list(data.rglob("*.json"))  # nothing half-written


# ------------------------------------------------------------------------------------------------------ CSV

HEADER = ["label", "path", "split", "category"]  # OML's column order, plus a column we ignore


def basic_rows(root: Path, n_train=2, n_test=2, per_class=2, split_name="test"):
    rows = []
    for c in range(n_train + n_test):
        split = "train" if c < n_train else split_name
        for i in range(per_class):
            rel = f"images/{c}/{i}.png"
            gradient(root / rel, blue=10 * c + i)
            rows.append([str(c), rel, split, "x"])
    return rows


def test_csv_paths_are_relative_to_its_folder_and_validation_means_test(tmp_path):
    root = tmp_path / "shop"
    rows = basic_rows(root, split_name="validation")  # OML's name of the evaluation split
    write_csv(root / "df.csv", HEADER, rows)
    data = tmp_path / "data"
    assert run_main("--data_path", data, "--data_name", "mine", "--from_csv", root / "df.csv") == 0
    expected = {"train": set(), "test": set()}
    for label, rel, split, _ in rows:
        expected["train" if split == "train" else "test"].add((str((root / rel).resolve()), label))
    assert as_sets(index(data, "mine"), data, "mine") == expected
    # the same CSV elsewhere, pointed at the images with --dataset_root (OML's dataset_root)
    write_csv(tmp_path / "lists/df.csv", HEADER, rows)
    run_main(
        "--data_path", data, "--data_name", "moved", "--from_csv", tmp_path / "lists/df.csv", "--dataset_root", root
    )
    assert as_sets(index(data, "moved"), data, "moved") == expected
    assert not (data / "mine/cropped_index.json").exists()  # no box columns -> uncropped only


def test_csv_query_gallery_flags(tmp_path, cli):
    root = tmp_path / "shop"
    header = ["path", "label", "split", "is_query", "is_gallery"]
    rows = []
    for c, split, q, g in [
        (0, "train", "", ""),
        (0, "train", "", ""),
        (1, "train", "False", "False"),
        (1, "train", "", ""),
        (2, "test", "True", "False"),
        (2, "test", "False", "True"),
        (2, "test", "False", "True"),
        (3, "test", "True", "False"),
        (3, "test", "false", "true"),
    ]:
        rel = f"img/{len(rows)}.png"
        gradient(root / rel, blue=len(rows))
        rows.append([rel, c, split, q, g])
    data = tmp_path / "data"
    run_main("--data_path", data, "--data_name", "qg", "--from_csv", write_csv(root / "df.csv", header, rows))
    doc = index(data, "qg")
    assert [r[0] for r in doc["splits"]["query"]] == [f"{Path(root, 'img', f'{i}.png')}" for i in (4, 7)]
    assert [r[0] for r in doc["splits"]["gallery"]] == [f"{Path(root, 'img', f'{i}.png')}" for i in (5, 6, 8)]
    assert eval_splits("qg", str(data)) == ("query", "gallery")

    both = [r[:3] + ["True", "True"] if r[2] == "test" else r for r in rows]  # every test row both -> test vs test
    run_main("--data_path", data, "--data_name", "both", "--from_csv", write_csv(root / "both.csv", header, both))
    assert set(index(data, "both")["splits"]) == {"train", "test"} and len(index(data, "both")["splits"]["test"]) == 5
    assert eval_splits("both", str(data)) == ("test", "test")

    mixed = [r[:3] + ["True", "True"] if i == 4 else r for i, r in enumerate(rows)]
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "m", "--from_csv", write_csv(root / "mixed.csv", header, mixed)),
        "one protocol",
    )
    neither = [r[:3] + ["False", "False"] if i == 4 else r for i, r in enumerate(rows)]
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "m", "--from_csv", write_csv(root / "neither.csv", header, neither)),
        "neither.csv:6",
    )
    train_q = [r[:3] + ["True", ""] if i == 0 else r for i, r in enumerate(rows)]
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "m", "--from_csv", write_csv(root / "trainq.csv", header, train_q)),
        "test rows only",
    )
    lonely = rows + [["img/9.png", 4, "test", "True", "False"]]
    gradient(root / "img/9.png", blue=99)
    result = cli(
        "--data_path", data, "--data_name", "lonely", "--from_csv", write_csv(root / "lonely.csv", header, lonely)
    )
    assert result.returncode == 0, result.stderr
    assert "warning: lonely: 1 query images have no gallery image of their class" in result.stderr


def test_csv_boxes_give_a_cropped_variant(tmp_path, cli):
    root = tmp_path / "boxes"
    header = ["path", "label", "split", "x_1", "y_1", "x_2", "y_2"]
    boxes = [(2, 3, 12, 9), None, (0, 0, 24, 20), (5, 4, 6, 5), (1, 1, 30, 30), (3, 2, 11, 18)]
    rows = []
    for i, box in enumerate(boxes):
        rel = f"im/{i}.png"
        gradient(root / rel, blue=i)
        cells = [str(v) for v in box] if box else ["", "", "", ""]
        rows.append([rel, i // 2, "train" if i < 2 else "test", *cells])
    data = tmp_path / "data"
    run_main("--data_path", data, "--data_name", "boxed", "--from_csv", write_csv(root / "df.csv", header, rows))
    cropped = index(data, "boxed", "cropped")["splits"]
    items = [p for split in ("train", "test") for p, _ in cropped[split]]
    assert len(items) == 6
    for rel, box in zip(items, boxes):
        with Image.open(data / "boxed" / rel) as im:
            if box is None:  # no box: the whole original image, not a re-encoded copy (OML's rule)
                assert (data / "boxed" / rel).resolve() == (root / "im/1.png").resolve()
                continue
            x1, y1, x2, y2 = box[0], box[1], min(box[2], 24), min(box[3], 20)  # clipped to the 24x20 image
            assert im.size == (x2 - x1, y2 - y1)
            r, g, _ = im.convert("RGB").getpixel((0, 0))
            assert abs(r - x1 * 10) <= 3 and abs(g - y1 * 10) <= 3  # JPEG q95: the top-left pixel is where it was cut
    assert ensure_dataset(data, "boxed", "cropped") == data / "boxed/cropped_index.json"
    # a later CSV without boxes drops the stale cropped index
    write_csv(root / "plain.csv", header[:3], [r[:3] for r in rows])
    run_main("--data_path", data, "--data_name", "boxed", "--from_csv", root / "plain.csv")
    assert not (data / "boxed/cropped_index.json").exists()
    with pytest.raises(UserError, match="built only from a CSV with x_1,y_1,x_2,y_2 boxes"):
        ensure_dataset(data, "boxed", "cropped")
    bad = [r[:3] + ["5", "5", "3", "9"] if i == 2 else r for i, r in enumerate(rows)]
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "b", "--from_csv", write_csv(root / "bad.csv", header, bad)),
        "bad.csv:4",
        "x_1 < x_2",
    )
    partial = [header[:5]] + [r[:5] for r in rows]
    assert_one_line_error(
        cli(
            "--data_path",
            data,
            "--data_name",
            "b",
            "--from_csv",
            write_csv(root / "partial.csv", partial[0], partial[1:]),
        ),
        "x_1, y_1",
        "x_2, y_2",
    )


@pytest.mark.parametrize(
    "case",
    [
        "missing_column",
        "empty_test",
        "empty_train",
        "class_in_both",
        "duplicate",
        "duplicate_spelled_differently",
        "bad_split",
        "no_rows",
        "no_file",
    ],
)
def test_csv_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case, cli):
    root = tmp_path / "shop"
    rows = basic_rows(root)
    header, expected = HEADER, None
    if case == "missing_column":
        header, rows, expected = ["path", "class", "split", "category"], rows, "missing column label"
    elif case == "empty_test":
        rows, expected = [r for r in rows if r[2] == "train"], "the test split is empty"
    elif case == "empty_train":
        rows, expected = [r for r in rows if r[2] != "train"], "the train split is empty"
    elif case == "class_in_both":
        rows, expected = (
            rows + [["0", rows[-1][1].replace("/3/", "/0/").replace("1.png", "9.png"), "test", ""]],
            "1 class(es) in both train and test (e.g. '0')",
        )
        gradient(root / rows[-1][1])
    elif case == "duplicate":
        rows, expected = rows + [rows[1]], "df.csv:10 repeats"
    elif case == "duplicate_spelled_differently":
        rows, expected = rows + [["1", "images/./1/../1/0.png", "train", ""]], "df.csv:10 repeats"
    elif case == "bad_split":
        rows[3][2], expected = "val", "df.csv:5: split must be train or test"
    elif case == "no_rows":
        rows, expected = [], "no rows below the header"
    csv_path = write_csv(root / "df.csv", header, rows) if case != "no_file" else root / "df.csv"
    expected = expected or "CSV file"
    result = cli("--data_path", tmp_path / "data", "--data_name", "mine", "--from_csv", csv_path)
    assert_one_line_error(result, expected)
    assert not (tmp_path / "data/mine/uncropped_index.json").exists()


def test_missing_and_corrupt_images_are_logged_and_the_rest_processed(tmp_path, cli):
    root = tmp_path / "shop"
    rows = basic_rows(root, per_class=3)
    (root / rows[0][1]).unlink()  # a train image that does not exist
    (root / rows[7][1]).write_bytes(b"not a png")  # a corrupt test image
    data = tmp_path / "data"
    result = cli("--data_path", data, "--data_name", "mine", "--from_csv", write_csv(root / "df.csv", HEADER, rows))
    assert result.returncode == 0, result.stderr
    assert "mine uncropped: 5 train / 5 test images, 2 skipped" in result.stdout
    log = (data / "mine/uncropped_errors.log").read_text().splitlines()
    assert len(log) == 2 and "df.csv:2" in log[0] and "file not found" in log[0] and "df.csv:9" in log[1]
    kept = {p for items in index(data, "mine")["splits"].values() for p, _ in items}
    assert len(kept) == 10 and not any(rows[i][1] in p for p in kept for i in (0, 7))
    # every image of a split missing: the split is empty -> refused, the earlier index stays untouched
    before = (data / "mine/uncropped_index.json").read_text()
    for _, rel, split, _ in rows:
        if split == "test":
            (root / rel).unlink(missing_ok=True)
    assert_one_line_error(
        cli("--data_path", data, "--data_name", "mine", "--from_csv", root / "df.csv"),
        "the test split is empty once the unreadable images are skipped",
    )
    assert (data / "mine/uncropped_index.json").read_text() == before


def test_single_image_test_classes_are_warned_and_counted(tmp_path, cli):
    root = tmp_path / "shop"
    rows = basic_rows(root, n_train=2, n_test=3, per_class=2)
    rows = [r for r in rows if not (r[0] in ("3", "4") and r[1].endswith("1.png"))]  # classes 3 and 4: one image
    result = cli(
        "--data_path", tmp_path / "data", "--data_name", "mine", "--from_csv", write_csv(root / "df.csv", HEADER, rows)
    )
    assert result.returncode == 0, result.stderr
    assert (
        "warning: mine: 2 test classes have a single image (e.g. '3'): no positive to find, each counts as a "
        "miss in Recall@K"
    ) in result.stderr
    assert len(index(tmp_path / "data", "mine")["splits"]["test"]) == 4  # kept: Recall@K counts them as misses


# ------------------------------------------------------------------------------------------ use by methods


def test_training_flags_accept_a_processed_custom_name_and_refuse_others_in_one_line(tmp_path):
    data = tmp_path / "data"
    make_tree(tmp_path / "photos", ["a", "b", "c", "d"])
    run_main("--data_path", data, "--data_name", "mine", "--from_folder", tmp_path / "photos")
    args = common_parser().parse_args(["--data_path", str(data), "--data_name", "mine"])
    validate_args(args)
    assert ensure_dataset(data, args.data_name, args.crop_type) == data / "mine/uncropped_index.json"
    with pytest.raises(UserError) as err:
        ensure_dataset(data, "typo", "uncropped")
    message = str(err.value)
    assert str(data / "typo/uncropped_index.json") in message
    assert f"python data_utils.py --data_path {data} --data_name typo --from_folder DIR" in message
    with pytest.raises(UserError, match="--from_folder DIR"):
        load_index(str(data), "typo")
    with pytest.raises(UserError, match="available: uncropped"):
        ensure_dataset(data, "mine", "cropped")
    with pytest.raises(SystemExit):  # a path is not a dataset name
        common_parser().parse_args(["--data_name", "../etc"])
    assert eval_splits("isc") == ("query", "gallery") and eval_splits("cub") == ("test", "test")  # unchanged callers


def test_cgd_trains_on_a_custom_query_gallery_dataset(tmp_path, monkeypatch):
    """End to end: a train/query/gallery folder, processed, then cgd/train.py --data_name <it> (0 epochs: evaluate)."""
    import torch

    import cgd.train as cgd_train
    from tests.tiny import make_tiny_processed, tiny_args

    make_tiny_processed(tmp_path / "tiny", "isc", num_classes=8, per_class=4, size=32)  # images with class structure
    tiny = load_index(str(tmp_path / "tiny"), "isc")
    root = tmp_path / "shop"
    for split, items in tiny.items():
        for path, label in items:
            dst = root / split / label / Path(path).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(Path(path).read_bytes())
    monkeypatch.chdir(tmp_path)  # --data_path data, the default the method scripts pass on
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    run_main("--data_path", "data", "--data_name", "shop", "--from_folder", root)
    options = "--backbone_type resnet18 --image_size 32 --batch_size 8 --num_epochs 0 --feature_dim 32 --recalls 1,2"
    args = cgd_train.get_args_parser().parse_args(tiny_args("data", "shop", options))
    cgd_train.main(args)
    db_path = next((tmp_path / "results/cgd").glob("shop_uncropped_*_data_base.pth"))
    db = torch.load(db_path, weights_only=True)
    assert (db["query"], db["gallery"]) == ("query", "gallery")
    assert len(db["splits"]["query"]["images"]) == len(tiny["query"])
    assert len(db["splits"]["gallery"]["images"]) == len(tiny["gallery"])
