"""End to end on tiny data with a tiny ViT: train -> test -> inference -> ablation, IRT_O, resume, In-shop."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from common.cli import parse_args_with_config
from common.database import load_database
from common.runio import safe_load
from irt import ablation, inference, train
from irt import test as irt_test
from tests.tiny import make_tiny_processed
from tests.training import assert_events_match_csv, assert_float32_database, record_speed

TINY = [
    "--model",
    "vit_tiny_patch16_224",
    "--input-size",
    "32",
    "--model-kwargs",
    "patch_size=8",
    "depth=2",
    "--pretrained",
    "none",
    "--num-workers",
    "0",
    "--batch-size",
    "8",
    "--logging-freq",
    "0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("irt_data")
    make_tiny_processed(root, "cub")
    make_tiny_processed(root, "isc")
    return root


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results" / "irt"


def _args(parser, data, *extra):
    return parser.parse_args(TINY + ["--dataset", "cub200", "--data-path", str(data), *extra])


def _brute_recall(features, labels, k):
    """Hit rate at k with self excluded, by a loop over queries."""
    hits = 0
    for i in range(len(labels)):
        sims = [(float(features[i] @ features[j]), j) for j in range(len(labels)) if j != i]
        top = [j for _, j in sorted(sims, key=lambda t: -t[0])[:k]]
        hits += any(labels[j] == labels[i] for j in top)
    return 100.0 * hits / len(labels)


def test_train_test_inference_ablation(data, results, capsys):
    flags = ["--max-iter", "4", "--eval-freq", "2", "--m", "2", "--rank", "1", "2", "4"]
    args = _args(train.get_args_parser(), data, *flags)
    stats = train.main(args)
    run = train.run_files(_args(train.get_args_parser(), data, *flags))
    again = parse_args_with_config(train.get_args_parser(), ["-c", str(run.path("args.yaml"))])
    assert {k: v for k, v in vars(again).items() if k != "config"} == {
        k: v for k, v in vars(args).items() if k != "config"
    }
    last = capsys.readouterr().out.strip().splitlines()[-1]
    r1 = pd.read_csv(run.statistics, index_col="epoch")["test_recall@1"]
    assert last.startswith(f"R@1 {r1[0]:.2f}% untrained -> {r1[2]:.2f}% kept (iteration 4); ")
    frame = pd.read_csv(run.statistics, index_col="epoch")
    assert list(frame.index) == [0, 1, 2]
    assert {"train_contrastive", "train_koleo", "train_loss", "test_recall@1", "test_recall@4"} <= set(frame.columns)
    assert frame.loc[1, "train_loss"] == pytest.approx(
        frame.loc[1, "train_contrastive"] + 0.7 * frame.loc[1, "train_koleo"]
    )
    assert run.checkpoint.is_file() and run.model.is_file() and run.statistics.with_suffix(".png").is_file()
    assert max(stats.rows) == 2

    training_db = run.database.read_bytes()
    metrics = irt_test.main(
        irt_test.get_args_parser().parse_args(
            [
                "--data-base",
                str(run.database),
                "--data-path",
                str(data),
                "--num-workers",
                "0",
                "--recalls",
                "1,2,4",
                "--save_data_base",
                str(run.path("eval_data_base.pth")),
            ]
        )
    )
    assert set(metrics) == {"test_recall@1", "test_recall@2", "test_recall@4", "test_map@r", "test_r_precision"}
    assert run.database.read_bytes() == training_db  # never overwritten
    db = load_database(run.path("eval_data_base.pth"))
    split = db.split("test")
    assert metrics["test_recall@2"] == pytest.approx(_brute_recall(split.features, split.labels, 2))
    assert metrics["test_recall@1"] == pytest.approx(frame.loc[2, "test_recall@1"], abs=1e-6)  # the last model
    assert pd.read_csv(run.path("test_metrics.csv")).shape == (1, 5)

    query = split.images[0]
    ranked = inference.main(
        inference.get_args_parser().parse_args(
            ["--data-base", str(run.database), "--query-img-name", query, "--retrieval-num", "3"]
        )
    )[0][1]
    assert len(ranked) == 3 and query not in [p for p, _, _ in ranked]
    out = results / "img_5_0"
    assert (out / "grid.png").is_file() and len(list(out.glob("retrieval_img_*.jpg"))) == 3
    new_image = str(data / "isc" / "images" / "001.class1" / "img_1_0.jpg")  # a file outside the database
    ranked = inference.main(
        inference.get_args_parser().parse_args(["--data-base", str(run.database), "--query-img-name", new_image])
    )[0][1]
    assert len(ranked) == 8 and "label unknown" in capsys.readouterr().out
    # the database test.py wrote records the model it was embedded with: new images are embedded by it
    assert db.config["model_file"] == str(run.model.resolve())
    again = inference.main(
        inference.get_args_parser().parse_args(
            ["--data-base", str(run.path("eval_data_base.pth")), "--query-img-name", new_image]
        )
    )[0][1]
    assert [p for p, _, _ in again] == [p for p, _, _ in ranked]
    assert [s for _, _, s in again] == pytest.approx([s for _, _, s in ranked], abs=1e-5)

    compared = ablation.main(
        ablation.get_args_parser().parse_args(
            [
                "--better-db",
                str(run.database),
                "--worse-db",
                str(run.path("eval_data_base.pth")),
                "--retrieval-num",
                "4",
            ]
        )
    )
    assert compared["wins"] + compared["ties"] + compared["losses"] == len(split.images)


def test_irt_o_max_iter_zero_evaluates_only(data, results):
    args = _args(train.get_args_parser(), data, "--max-iter", "0", "--rank", "1", "2")
    train.main(args)
    run = train.run_files(args)
    frame = pd.read_csv(run.statistics, index_col="epoch")
    assert list(frame.index) == [0] and not run.checkpoint.exists()
    split = load_database(run.database).split("test")
    assert frame.loc[0, "test_recall@2"] == pytest.approx(_brute_recall(split.features, split.labels, 2))
    assert safe_load(run.model)["epoch"] == 0


def test_resume_equals_uninterrupted(data, results):
    common = [
        "--m",
        "2",
        "--eval-freq",
        "2",
        "--encoder-momentum",
        "0.9",
        "--memory-ratio",
        "0.5",
        "--drop-path",
        "0.1",
    ]
    full = _args(train.get_args_parser(), data, "--max-iter", "4", *common)
    train.main(full)
    first = _args(train.get_args_parser(), data, "--max-iter", "2", *common)  # "interrupted" after 2 steps
    train.main(first)
    resumed = _args(
        train.get_args_parser(), data, "--max-iter", "4", *common, "--resume", str(train.run_files(first).checkpoint)
    )
    # the uninterrupted run's checkpoint is overwritten by the resumed one: keep a copy first
    expected = torch.load(train.run_files(full).checkpoint, weights_only=True)
    train.main(resumed)
    got = torch.load(train.run_files(resumed).checkpoint, weights_only=True)
    assert got["epoch"] == expected["epoch"] == 2
    for part in ("model", "xbm", "key_encoder"):
        for key, value in expected[part].items():
            assert torch.equal(got[part][key], value), (part, key)


def test_resume_refuses_other_recipe(data, results):
    args = _args(train.get_args_parser(), data, "--max-iter", "2", "--eval-freq", "2")
    train.main(args)
    other = _args(
        train.get_args_parser(),
        data,
        "--max-iter",
        "2",
        "--eval-freq",
        "2",
        "--margin",
        "0.3",
        "--resume",
        str(train.run_files(args).checkpoint),
    )
    with pytest.raises(Exception, match="margin"):
        train.main(other)


def test_inshop_query_gallery_with_momentum_encoder(data, results):
    args = train.get_args_parser().parse_args(
        TINY
        + [
            "--dataset",
            "inshop",
            "--data-path",
            str(data),
            "--max-iter",
            "2",
            "--m",
            "2",
            "--memory-ratio",
            "0.2",
            "--encoder-momentum",
            "0.999",
            "--rank",
            "1",
            "2",
        ]
    )
    train.main(args)
    db = load_database(train.run_files(args).database)
    assert (db.query, db.gallery) == ("query", "gallery")
    assert len(db.split("query").images) + len(db.split("gallery").images) == 24


def test_user_error_is_one_line(data, tmp_path):
    proc = subprocess.run(
        [sys.executable, "irt/train.py", *TINY, "--dataset", "sop", "--data-path", str(data)],
        capture_output=True,
        text=True,
        env={"RETRIEVAL_RESULTS": str(tmp_path), "PATH": ""},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:") and "sop" in proc.stderr


def test_amp_compile_and_tensorboard_in_log_dir(data, results, tmp_path, monkeypatch):
    """--amp --compile with the momentum key encoder (compiled too): bfloat16 training outputs, float32 evaluation
    (test.py recomputes the saved features); TensorBoard events in the original's --log-dir/<dataset>/, one folder
    per run, holding the CSV's rows and every iteration's losses."""
    seen = record_speed(monkeypatch, train)
    flags = ["--max-iter", "4", "--eval-freq", "2", "--m", "2", "--rank", "1", "2", "--memory-ratio", "0.5"]
    flags += ["--encoder-momentum", "0.9", "--amp", "--compile", "--log-dir", str(tmp_path / "logs")]
    args = _args(train.get_args_parser(), data, *flags)
    train.main(args)
    assert len(seen["graphs"]) >= 2  # query and key encoders
    assert seen["autocast"] and set(seen["autocast"]) == {torch.bfloat16}  # the model returns float32 unit vectors
    run = train.run_files(args)
    assert_float32_database(irt_test, run.model, run.database, data, tmp_path)
    events = tmp_path / "logs" / "cub200" / run.name
    assert_events_match_csv(events, run.statistics, 4, ("loss", "lr", "contrastive", "koleo"))
    assert not run.path("tensorboard").exists()
