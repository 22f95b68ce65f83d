"""data_utils.py / common.data.prepare on tiny fakes of the four raw datasets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image, JpegImagePlugin

import data_utils
from common.data.prepare import ensure_dataset, prepare
from common.data.verify import clip_box
from common.errors import UserError
from tests.fakes import CROPS, CUB_CORRUPT, EXPECTED, SOP_MISSING, make_fake_dataset

REPO = Path(__file__).resolve().parents[2]


def run_main(data_path, *names, force=False, workers=1):
    argv = ["--data_path", str(data_path), "--num_workers", str(workers)]
    argv += ["--data_name", *names] if names else []
    argv += ["--force"] if force else []
    return data_utils.main(data_utils.get_args_parser().parse_args(argv))


def run_cli(*argv):
    return subprocess.run(
        [sys.executable, str(REPO / "data_utils.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def load(root, name, crop_type="uncropped"):
    return json.loads((root / name / f"{crop_type}_index.json").read_text())


@pytest.mark.parametrize("name", ["car", "cub", "sop", "isc"])
def test_uncropped_index_matches_fake(tmp_path, name):
    make_fake_dataset(tmp_path, name)
    assert run_main(tmp_path, name) == 0
    index = load(tmp_path, name)
    assert index == {"format": 1, "dataset": name, "crop_type": "uncropped", "splits": EXPECTED[name]}
    for items in index["splits"].values():  # references the original files, nothing re-encoded or copied
        for rel, _ in items:
            assert (tmp_path / name / rel).is_file()
    assert not (tmp_path / name / "uncropped").exists()


def test_car_split_ignores_test_flag_and_reads_compact_ints(tmp_path):
    make_fake_dataset(tmp_path, "car")
    ann = scipy.io.loadmat(str(tmp_path / "car" / "cars_annos.mat"))["annotations"]
    assert ann.shape == (1, 6) and ann[0, 2]["bbox_x2"].dtype == np.uint16 and ann[0, 0]["class"].dtype == np.uint8
    run_main(tmp_path, "car")
    splits = load(tmp_path, "car")["splits"]
    assert {label for _, label in splits["train"]} == {"1", "2", "98"}
    assert {label for _, label in splits["test"]} == {"99", "100", "196"}


@pytest.mark.parametrize("name", ["car", "cub"])
def test_crops_equal_clipped_boxes(tmp_path, name):
    make_fake_dataset(tmp_path, name)
    run_main(tmp_path, name)
    splits = load(tmp_path, name, "cropped")["splits"]
    items = [rel for split in splits.values() for rel, _ in split]
    assert sorted(items) == sorted(f"cropped/{p}" for p in CROPS[name])
    for rel in items:
        left, upper, right, lower = CROPS[name][rel[len("cropped/") :]]
        with Image.open(tmp_path / name / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4, no chroma subsampling
            assert im.size == (right - left, lower - upper)
            corner = np.array(im.getpixel((0, 0)), dtype=int)
        with Image.open(tmp_path / name / rel[len("cropped/") :]) as src:  # gradients: the corner shows the offset
            assert np.abs(corner - np.array(src.convert("RGB").getpixel((left, upper)), dtype=int)).max() <= 6
    assert [p for p, _ in load(tmp_path, name, "cropped")["splits"]["train"]][0].startswith("cropped/")


def test_partial_box_is_clipped_and_subfolders_keep_names_apart(tmp_path):
    make_fake_dataset(tmp_path, "cub")
    run_main(tmp_path, "cub")
    crop = tmp_path / "cub/cropped/images/002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg"
    assert Image.open(crop).size == (20, 20)  # x 40+50 and y 30+50 clipped to the 60x50 image
    a = tmp_path / "cub/cropped/images/002.Laysan_Albatross/Shared_Name_0001.jpg"
    b = tmp_path / "cub/cropped/images/003.Sooty_Albatross/Shared_Name_0001.jpg"
    assert Image.open(a).size == (8, 8) and Image.open(b).size == (10, 12)
    assert clip_box((5, 5, 60, 25), (40, 30)) == (5, 5, 40, 25)
    assert clip_box((-3, -2, 10, 10), (8, 8)) == (0, 0, 8, 8)
    with pytest.raises(ValueError):
        clip_box((50, 0, 60, 10), (40, 30))


def test_corrupt_and_missing_images_are_skipped_and_logged(tmp_path, capsys):
    make_fake_dataset(tmp_path, "cub")
    make_fake_dataset(tmp_path, "sop")
    assert run_main(tmp_path, "cub", "sop") == 0
    out = capsys.readouterr().out
    for crop_type in ("uncropped", "cropped"):
        log = tmp_path / "cub" / f"{crop_type}_errors.log"
        assert f"cub {crop_type}: 4 train / 3 test images, 1 skipped (see {log})" in out
        lines = log.read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(CUB_CORRUPT)
    assert "sop uncropped: 3 train / 2 test images, 1 skipped" in out
    assert (tmp_path / "sop/uncropped_errors.log").read_text().startswith(SOP_MISSING)
    assert not (tmp_path / "cub/cropped" / CUB_CORRUPT).exists()


def test_rerun_is_idempotent_and_force_rebuilds(tmp_path, capsys):
    make_fake_dataset(tmp_path, "cub")
    run_main(tmp_path, "cub")
    index = tmp_path / "cub/cropped_index.json"
    crop = tmp_path / "cub/cropped/images/002.Laysan_Albatross/Shared_Name_0001.jpg"
    stamps = index.stat().st_mtime_ns, crop.stat().st_mtime_ns
    capsys.readouterr()
    run_main(tmp_path, "cub")
    assert "up to date, skipping" in capsys.readouterr().out
    assert (index.stat().st_mtime_ns, crop.stat().st_mtime_ns) == stamps

    ann = tmp_path / "cub/images.txt"  # newer annotations -> the index is rebuilt, valid crops are kept
    os.utime(ann, ns=(stamps[0] + 10**9, stamps[0] + 10**9))
    run_main(tmp_path, "cub")
    assert index.stat().st_mtime_ns > stamps[0] and crop.stat().st_mtime_ns == stamps[1]

    broken = tmp_path / "cub/cropped/images/003.Sooty_Albatross/Shared_Name_0001.jpg"
    broken.write_bytes(b"not a jpeg")  # an invalid crop is rewritten on the next build, valid ones are not
    (tmp_path / "cub/cropped_index.json").unlink()
    run_main(tmp_path, "cub")
    assert Image.open(broken).size == (10, 12) and crop.stat().st_mtime_ns == stamps[1]

    run_main(tmp_path, "cub", force=True)
    assert index.stat().st_mtime_ns > stamps[0] and crop.stat().st_mtime_ns > stamps[1]


def test_no_data_name_processes_every_present_dataset(tmp_path, capsys):
    make_fake_dataset(tmp_path, "car")
    make_fake_dataset(tmp_path, "isc")
    run_main(tmp_path)
    out = capsys.readouterr().out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*_index.json")) == [
        "car/cropped_index.json",
        "car/uncropped_index.json",
        "isc/uncropped_index.json",
    ]
    assert "isc uncropped: 3 train / 2 query / 3 gallery images, 0 skipped" in out


def test_cli_with_worker_pool(tmp_path):
    make_fake_dataset(tmp_path, "cub")
    result = run_cli("--data_path", tmp_path, "--data_name", "cub", "--num_workers", "2")
    assert result.returncode == 0, result.stderr
    assert "cub cropped: 4 train / 3 test images, 1 skipped" in result.stdout
    assert load(tmp_path, "cub")["splits"] == EXPECTED["cub"]


def _fake_without(tmp_path, name, rel):
    make_fake_dataset(tmp_path, name)
    (tmp_path / name / rel).unlink()
    return tmp_path / name / rel


@pytest.mark.parametrize("case", ["no_folder", "no_dataset_at_all", "cub_boxes", "car_mat", "isc_partition"])
def test_user_errors_are_one_line_and_nonzero(tmp_path, case):
    if case == "no_folder":
        make_fake_dataset(tmp_path, "cub")
        argv, expected = ["--data_name", "car"], tmp_path / "car"
    elif case == "no_dataset_at_all":
        argv, expected = [], tmp_path
    else:
        name, rel = {
            "cub_boxes": ("cub", "bounding_boxes.txt"),
            "car_mat": ("car", "cars_annos.mat"),
            "isc_partition": ("isc", "Eval/list_eval_partition.txt"),
        }[case]
        argv, expected = ["--data_name", name], _fake_without(tmp_path, name, rel)
    result = run_cli("--data_path", tmp_path, "--num_workers", "1", *argv)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(expected) in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_main_raises_user_error_for_missing_annotation(tmp_path):
    _fake_without(tmp_path, "sop", "Ebay_test.txt")
    with pytest.raises(UserError, match="Ebay_test.txt"):
        run_main(tmp_path, "sop")


def test_ensure_dataset_names_the_command_to_run(tmp_path):
    make_fake_dataset(tmp_path, "sop")
    with pytest.raises(UserError) as err:
        ensure_dataset(tmp_path, "sop", "uncropped")
    assert f"python data_utils.py --data_path {tmp_path} --data_name sop" in str(err.value)
    with pytest.raises(UserError, match="not available"):
        ensure_dataset(tmp_path, "sop", "cropped")
    summaries = prepare(tmp_path, ["sop"], num_workers=1)
    assert [s.counts for s in summaries] == [{"train": 3, "test": 2}]
    assert ensure_dataset(tmp_path, "sop", "uncropped") == tmp_path / "sop/uncropped_index.json"


def test_no_readable_image_at_all_is_a_user_error(tmp_path):
    make_fake_dataset(tmp_path, "isc")
    for image in (tmp_path / "isc/Img").rglob("*.jpg"):
        image.unlink()
    with pytest.raises(UserError, match="none of the 8 images could be read"):
        run_main(tmp_path, "isc")
    assert not (tmp_path / "isc/uncropped_index.json").exists()
    assert len((tmp_path / "isc/uncropped_errors.log").read_text().splitlines()) == 8


def test_grayscale_and_cmyk_sources_are_kept_as_is(tmp_path):
    make_fake_dataset(tmp_path, "cub", process=True)
    src = tmp_path / "cub/images/003.Sooty_Albatross/Sooty_Albatross_0031_1066.jpg"
    assert Image.open(src).mode == "CMYK"
    assert Image.open(tmp_path / "cub/cropped/images/003.Sooty_Albatross/Sooty_Albatross_0031_1066.jpg").mode == "RGB"


def test_each_process_makes_sure_of_the_dataset_once(tmp_path, monkeypatch):
    from common.data import prepare as prepare_module

    make_fake_dataset(tmp_path, "cub", process=True)
    calls = []
    real = prepare_module.ensure_dataset
    monkeypatch.setattr(prepare_module, "ensure_dataset", lambda *a: calls.append(a) or real(*a))
    path = prepare_module.ensure_dataset_main_first(tmp_path, "cub", "cropped")
    assert path == tmp_path / "cub" / "cropped_index.json" and calls == [(tmp_path, "cub", "cropped")]
