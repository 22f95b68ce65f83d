"""Query outputs under hostile names: nothing the toolkit did not write is deleted, every query gets its own page,
``--save_data_base`` never overwrites a run, and two inferences into one folder both succeed."""

import html
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from cgd import ablation, inference
from cgd import test as cgd_test
from common import render
from common.database import Split, load_database, save_database
from common.errors import run_cli
from common.outputs import is_output, new_folder, safe_name
from common.render import result_file
from common.runio import atomic_save
from tests.tiny import CGD_CONFIG, CGD_RUN, make_tiny_processed, make_untrained_cgd_run

DB = f"{CGD_RUN}_data_base.pth"


def _colour(i: int):
    return ((40 * i) % 256, 255 - (23 * i) % 256, (97 * i) % 256)


def _image(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.name.lower().endswith(".jpg") else "PNG"  # Pillow sees no extension in "..jpg"
    Image.new("RGB", (24, 24), _colour(i)).save(path, format=fmt)
    return str(path)


def _snapshot(root: Path) -> dict:
    """Every file and symlink under ``root`` (links not followed): bytes, or the link's target."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                out[path] = ("link", os.readlink(path))
            elif path.is_file():
                out[path] = path.read_bytes()
    return out


def _unchanged(before: dict) -> None:
    after = {p: (("link", os.readlink(p)) if p.is_symlink() else p.read_bytes()) for p in before if os.path.lexists(p)}
    assert after == before


@pytest.fixture
def run(tmp_path, monkeypatch):
    """An untrained CGD run whose database holds 4 real images (2 labels), under ``tmp_path/results``."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    folder = make_untrained_cgd_run(tmp_path / "results" / "cgd")
    images = [_image(tmp_path / "gallery" / f"g{i}.png", 20 + i) for i in range(4)]
    save_database(
        folder / DB,
        config=CGD_CONFIG,
        method="cgd",
        metric="euclidean",
        splits={"test": Split(images, [0, 0, 1, 1], torch.randn(4, 32, generator=torch.Generator().manual_seed(0)))},
    )
    return tmp_path, folder


def _infer(*args):
    return inference.main(inference.get_args_parser().parse_args(["--data_base", DB, "--retrieval_num", "2", *args]))


# ---------------------------------------------------------------- 1. a query's name never decides what is deleted


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "...", ".hidden", "a/b", "a\\b", "../../etc", "CON", "nul.txt", "com1.jpg", "a:b*c?", "x. ", "\0y"],
)
def test_safe_name_is_one_harmless_component(tmp_path, name):
    safe = safe_name(name)
    assert safe and not safe.startswith(".") and not re.search(r'[/\\<>:"|?*\x00-\x1f]', safe)
    assert not safe.endswith((".", " ")) and safe.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL", "COM1"}
    (tmp_path / safe).mkdir()
    assert [p.name for p in tmp_path.iterdir()] == [safe]


def test_safe_name_keeps_readable_names_and_bounds_long_ones():
    for name in ("IMG_0001", "été #2 100%", "cam1__IMG_0001.jpg", "写真"):
        assert safe_name(name) == name
    long_a, long_b = "é" * 200 + "a", "é" * 200 + "b"
    assert len(safe_name(long_a).encode()) <= 120 and safe_name(long_a) != safe_name(long_b)


@pytest.mark.parametrize("query", ["..jpg", "...jpg"])
def test_query_named_dots_deletes_nothing(run, query):
    """``..jpg`` (stem ``.``) used to remove results/cgd/, ``...jpg`` (stem ``..``) all of results/."""
    tmp_path, folder = run
    (tmp_path / "results" / "reir").mkdir()
    (tmp_path / "results" / "reir" / "keep.txt").write_text("another method's run")
    before = _snapshot(tmp_path / "results")
    [(out, results)] = _infer("--query_img_name", _image(tmp_path / "q" / query, 1))
    _unchanged(before)
    assert out.parent == folder and not out.name.startswith(".") and is_output(out, "query")
    assert len(results) == 2 and (out / "index.html").is_file()


def test_query_named_like_a_folder_it_did_not_write(run):
    """An export folder, the user's folder and a symlink to a marked output elsewhere are never removed (or
    written through); the query goes to ``<name>~2``, which a re-run replaces."""
    tmp_path, folder = run
    (folder / "export" / CGD_RUN).mkdir(parents=True)
    (folder / "export" / CGD_RUN / "model.onnx").write_bytes(b"exported")
    (folder / "mine").mkdir()
    (folder / "mine" / "notes.txt").write_text("mine")
    elsewhere = new_folder(tmp_path / "elsewhere" / "linked", "query")  # a query output, but not under results/
    (elsewhere / "query_img.jpg").write_bytes(b"someone else's")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    before = {**_snapshot(tmp_path / "results"), **_snapshot(tmp_path / "elsewhere")}
    for i, name in enumerate(("export.jpg", "mine.png", "linked.jpg")):
        [(out, _)] = _infer("--query_img_name", _image(tmp_path / "q" / name, i))
        assert out == folder / f"{Path(name).stem}~2" and is_output(out, "query")
        stale = out / "stale.txt"
        stale.write_text("x")
        [(again, _)] = _infer("--query_img_name", str(tmp_path / "q" / name))
        assert again == out and not stale.exists()  # its own earlier output is replaced, not a third folder
    _unchanged(before)
    assert (folder / "linked").is_symlink() and not list((folder / "..").glob(".*.tmp"))


def test_test_py_query_named_dots_deletes_nothing(run):
    tmp_path, folder = run
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=2, size=32)
    before = _snapshot(tmp_path / "results")
    query = _image(tmp_path / "q" / "...jpg", 3)
    args = ["--data_base", DB, "--data_path", str(data), "--num_workers", "0", "--recalls", "1,2"]
    cgd_test.main(cgd_test.get_args_parser().parse_args(args + ["--query_img_name", query, "--retrieval_num", "2"]))
    _unchanged(before)
    [out] = [p for p in folder.iterdir() if p.is_dir()]
    assert out.name == "__" and is_output(out, "query") and (out / "grid.png").is_file()


def _ablation_dbs(tmp_path: Path, folder: Path):
    """Two databases on 4 CUB-like images (a file name shared by two classes, one named ``...jpg``); 'better'
    pairs each image with its class mate, 'worse' with the other class, so better wins every query."""
    rel = ["001.a/img.jpg", "001.a/...jpg", "002.b/img.jpg", "002.b/x.jpg"]
    images = [_image(tmp_path / "cub" / r, i) for i, r in enumerate(rel)]
    for name, features in (
        ("better", [[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]]),
        ("worse", [[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]]),
    ):
        split = Split(images, [0, 0, 1, 1], torch.tensor(features, dtype=torch.float32))
        config = {**CGD_CONFIG, "feature_dim": 2}  # the database's width, as checked at load
        save_database(folder / f"{name}_data_base.pth", config=config, method="cgd", splits={"test": split})
    return rel


def test_ablation_save_results_one_folder_per_query(run):
    """CUB has the same file name in two classes: each query gets its own folder, named by its relative path;
    ``...jpg`` writes nothing outside the ablation's folder."""
    tmp_path, folder = run
    rel = _ablation_dbs(tmp_path, folder)
    before = _snapshot(tmp_path / "results")
    args = ["--better_data_base", "better_data_base.pth", "--worse_data_base", "worse_data_base.pth"]
    metrics = ablation.main(ablation.get_args_parser().parse_args(args + ["--retrieval_num", "1", "--save_results"]))
    assert metrics["wins"] == 4
    _unchanged(before)
    save_dir = folder / "better----worse"
    assert is_output(save_dir, "ablation") and not (folder / "better").exists() and not (folder / "worse").exists()
    expected = {"001.a__img.jpg": 0, "001.a__...jpg": 1, "002.b__img.jpg": 2, "002.b__x.jpg": 3}
    assert {p.name for p in save_dir.iterdir() if p.is_dir()} == set(expected) and len(rel) == 4
    for name, i in expected.items():
        assert is_output(save_dir / name, "query")
        mean = np.asarray(Image.open(save_dir / name / "query_img.jpg")).reshape(-1, 3).mean(0)
        assert np.abs(mean - _colour(i)).max() < 12  # its own query's picture


# ---------------------------------------------------------------- 2. every query gets its own page

COLLIDING = [
    "cam1/IMG_0001.jpg",
    "cam1/IMG_0002.jpg",
    "cam2/IMG_0001.jpg",
    "cam2/IMG_0002.jpg",
    "IMG_0001.png",
    "IMG_0001.jpg",
    "cam 3/#1.jpg",
    "cam 3/a?b.jpg",
    "cam 3/100%.png",
    "été/IMG_0001.jpg",
    "été/ü #?%.png",
    "..jpg",
    "...jpg",
    ".hidden.jpg",
    "CON.jpg",
    "cam1__IMG_0001.jpg",  # what cam1/IMG_0001.jpg's folder is called
]


def test_folder_of_16_colliding_queries_gets_16_pages(run):
    tmp_path, folder = run
    queries = tmp_path / "queries"
    for i, rel in enumerate(COLLIDING):
        _image(queries / rel, i)
    answers = _infer("--query_img_name", str(queries))
    root = folder / "queries"
    assert len(answers) == 16 and len({out for out, _ in answers}) == 16
    assert len(list(root.glob("*/index.html"))) == 16 and is_output(root, "queries")
    raw = (root / "index.html").read_bytes()
    summary = raw.decode("utf-8")
    assert "<meta charset='utf-8'>" in summary and "été/ü #?%.png" in html.unescape(summary)
    links = re.findall(r'<a href="([^"]+)">([^<]+)</a>', summary)
    assert sorted(html.unescape(name) for _, name in links) == sorted(COLLIDING)
    for href, name in links:
        assert "#" not in href and "?" not in href and " " not in href  # URL-encoded
        page = root / unquote(html.unescape(href))
        assert page.parent.parent == root and page.is_file()
        text = page.read_bytes().decode("utf-8")
        assert f"Query {name}<" in text  # the page of this query, not of a namesake
        mean = np.asarray(Image.open(page.parent / "query_img.jpg")).reshape(-1, 3).mean(0)
        assert np.abs(mean - _colour(COLLIDING.index(html.unescape(name)))).max() < 12
        assert str(tmp_path) not in text
    assert str(tmp_path) not in summary


# ---------------------------------------------------------------- 3. --save_data_base never overwrites a run


@pytest.fixture
def targets(run):
    """Files a --save_data_base must never overwrite, by what they are."""
    tmp_path, folder = run
    state = torch.load(folder / f"{CGD_RUN}_model.pth", weights_only=True)
    atomic_save({**state, "epoch": 3}, folder / "other_checkpoint.pth")
    (folder / "other_data_base.pth").write_bytes((folder / DB).read_bytes())
    (tmp_path / "copy_data_base.pth").write_bytes((folder / DB).read_bytes())
    (tmp_path / "notes.txt").write_text("not a database")
    torch.save({"weight": torch.ones(2)}, tmp_path / "weights.pth")
    (tmp_path / "link.pth").symlink_to(folder / f"{CGD_RUN}_model.pth")
    return {
        "database in use": folder / DB,
        "model in use": folder / f"{CGD_RUN}_model.pth",
        "another run's checkpoint": folder / "other_checkpoint.pth",
        "another run's training database": folder / "other_data_base.pth",
        "a run's database copied away": tmp_path / "copy_data_base.pth",
        "a text file": tmp_path / "notes.txt",
        "foreign weights": tmp_path / "weights.pth",
        "a symlink to the model": tmp_path / "link.pth",
    }


def _refused(capsys, main, args) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(main, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_gallery_save_data_base_never_overwrites_a_run(run, targets, capsys):
    tmp_path, folder = run
    gallery = tmp_path / "gallery"
    before = _snapshot(tmp_path)
    parser = inference.get_args_parser()
    for what, target in targets.items():
        args = parser.parse_args(
            ["--data_base", DB, "--gallery", str(gallery), "--save_data_base", str(target), "--num_workers", "0"]
        )
        assert "--save_data_base" in _refused(capsys, inference.main, args), what
    _unchanged(before)
    # rebuilding an earlier --gallery database is the documented way to refresh it
    mine = tmp_path / "mine_data_base.pth"
    for _ in range(2):
        _infer("--gallery", str(gallery), "--save_data_base", str(mine), "--num_workers", "0")
    assert len(load_database(mine).split("gallery").images) == 4


def test_test_py_save_data_base_never_overwrites_a_run(run, targets, capsys):
    tmp_path, folder = run
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=2, size=32)
    before = _snapshot(tmp_path)
    base = ["--data_base", DB, "--data_path", str(data), "--num_workers", "0", "--recalls", "1,2"]
    parser = cgd_test.get_args_parser()
    for what, target in targets.items():
        assert "--save_data_base" in _refused(
            capsys, cgd_test.main, parser.parse_args(base + ["--save_data_base", str(target)])
        ), what
    model = ["--model_file", str(folder / f"{CGD_RUN}_model.pth"), "--data_path", str(data), "--num_workers", "0"]
    _refused(capsys, cgd_test.main, parser.parse_args(model + ["--save_data_base", str(folder / DB)]))
    _unchanged(before)
    mine = tmp_path / "recomputed_data_base.pth"
    for _ in range(2):  # its own earlier output may be replaced
        cgd_test.main(parser.parse_args(base + ["--save_data_base", str(mine)]))
    assert len(load_database(mine).split("test").images) == 8


# ---------------------------------------------------------------- 8. two inferences into one query folder


def test_two_inferences_into_the_same_query_folder_both_succeed(run, monkeypatch):
    """B replaces the query's folder exactly while A is writing it: A pauses at its first image until B has removed
    the earlier folder, B pauses right after removing until A is done. Writing in place, A then found its folder
    gone (or B's removal found A's new files: 'Directory not empty'); both must succeed."""
    tmp_path, folder = run
    query = str(tmp_path / "gallery" / "g1.png")  # a database image: no model to load, only files to write
    _infer("--query_img_name", query)  # the earlier output both replace
    a_writing, b_removed, a_done = threading.Event(), threading.Event(), threading.Event()
    framed, rmtree = render.framed, shutil.rmtree

    def paused_framed(*args, **kwargs):
        if threading.current_thread().name == "A" and not a_writing.is_set():
            a_writing.set()
            b_removed.wait(10)
        return framed(*args, **kwargs)

    def paused_rmtree(*args, **kwargs):
        rmtree(*args, **kwargs)
        if threading.current_thread().name == "B" and not b_removed.is_set():
            b_removed.set()
            a_done.wait(10)

    monkeypatch.setattr(render, "framed", paused_framed)
    monkeypatch.setattr(shutil, "rmtree", paused_rmtree)
    errors = []

    def infer(started: threading.Event, finished: threading.Event) -> None:
        started.wait(10)
        try:
            _infer("--query_img_name", query)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))
        finally:
            finished.set()

    go = threading.Event()
    go.set()
    threads = [
        threading.Thread(target=infer, args=(go, a_done), name="A"),
        threading.Thread(target=infer, args=(a_writing, b_removed), name="B"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    out = folder / "g1"
    assert is_output(out, "query") and not [p for p in folder.iterdir() if p.name.startswith(".g1.")]
    ranking = (out / "ranking.csv").read_text().splitlines()[1:]
    names = {result_file(int(r.split(",")[0]), float(r.split(",")[-1])) for r in ranking}
    assert {p.name for p in out.glob("retrieval_img_*.jpg")} == names and (out / "index.html").is_file()
