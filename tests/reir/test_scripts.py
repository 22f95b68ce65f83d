"""End to end on tiny data: train -> test -> inference -> ablation (the shared contract), resume = uninterrupted,
the seeded global-batch sampler, one-line errors."""

import subprocess
import sys

import pandas as pd
import pytest
import torch
from PIL import Image

from common.database import load_database
from reir import ablation, inference, recipe, train
from reir import test as reir_test
from tests.tiny import make_tiny_processed, tiny_args
from tests.training import assert_events_match_csv, assert_float32_database, record_speed

RUN = "cub_uncropped_fixed_random_layer1_resnet18_4_2"
TINY = "--image_size 32 --batch_size 8 --ensemble_size 4 --meta_class_size 2 --gpu_ids ''"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_processed(tmp_path_factory.mktemp("data"), "cub", num_classes=6, per_class=5, size=36)


def _train(data, results, monkeypatch, *extra):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(results))
    train.main(train.get_args_parser().parse_args([*tiny_args(data, "cub", TINY), "--with_random", *extra]))
    return results / "reir"


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return _train(data, tmp_path_factory.mktemp("results"), mp, "--num_epochs", "1")


def test_train_outputs(trained):
    for suffix in ("model.pth", "data_base.pth", "checkpoint.pth", "statistics.csv", "statistics.png"):
        assert (trained / f"{RUN}_{suffix}").is_file(), suffix
    assert (trained / "cub_uncropped_fixed_4_2_ids.pth").is_file()
    stats = pd.read_csv(trained / f"{RUN}_statistics.csv", index_col="epoch")
    assert list(stats.index) == [0, 1]
    assert {"train_loss", "train_accuracy", "test_recall@1", "test_recall@8"} <= set(stats.columns)
    db = load_database(trained / f"{RUN}_data_base.pth")
    assert (db.metric, db.scale, db.query, db.gallery) == ("cosine", 4.0, "test", "test")
    assert db.config["method"] == "reir"
    assert db.split("train").features.shape == (15, 8) and db.split("test").features.shape == (15, 8)
    per_learner = db.split("test").features.view(15, 4, 2).norm(dim=-1)
    torch.testing.assert_close(per_learner, torch.ones(15, 4))


def test_test_script_recomputes_the_same_features(trained, data, monkeypatch, tmp_path):
    """--with_random is deterministic at evaluation: test.py reproduces the stored features exactly, writes
    <run>_test_metrics.csv and leaves the training database untouched."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(trained.parent))
    db_path = trained / f"{RUN}_data_base.pth"
    training_db = db_path.read_bytes()
    copy = tmp_path / "recomputed_data_base.pth"
    metrics = reir_test.main(
        reir_test.get_args_parser().parse_args(
            [
                "--data_base",
                RUN + "_data_base.pth",
                "--data_path",
                str(data),
                "--num_workers",
                "0",
                "--gpu_ids",
                "",
                "--save_data_base",
                str(copy),
            ]
        )
    )
    assert {"test_recall@1", "test_map@r", "test_r_precision"} <= set(metrics)
    assert db_path.read_bytes() == training_db
    stored, recomputed = load_database(db_path), load_database(copy)
    assert recomputed.scale == 4.0 and recomputed.metric == "cosine"
    torch.testing.assert_close(recomputed.split("test").features, stored.split("test").features, rtol=0, atol=1e-6)
    saved = pd.read_csv(trained / f"{RUN}_test_metrics.csv")
    assert saved["test_recall@1"].item() == pytest.approx(metrics["test_recall@1"])
    stats = pd.read_csv(trained / f"{RUN}_statistics.csv", index_col="epoch")
    assert metrics["test_recall@1"] == pytest.approx(stats.loc[1, "test_recall@1"])


def _infer(*args):
    return inference.main(inference.get_args_parser().parse_args(list(args)))


def test_inference_database_query_and_new_image(trained, monkeypatch, tmp_path):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(trained.parent))
    db = load_database(trained / f"{RUN}_data_base.pth")
    query = db.split("test").images[0]
    args = ["--data_base", RUN + "_data_base.pth", "--retrieval_num", "3", "--gpu_ids", ""]
    [(out, results)] = _infer("--query_img_name", query, *args)
    assert query not in [p for p, _, _ in results] and len(results) == 3
    scores = [s for _, _, s in results]
    feats = db.split("test").features
    brute = (feats @ feats[0] / 4)[1:].topk(3).values  # mean per-learner cosine, self excluded
    torch.testing.assert_close(torch.tensor(scores), brute, rtol=0, atol=1e-5)
    assert out == trained / query.rsplit("/", 1)[1].rsplit(".", 1)[0]
    assert (out / "query_img.jpg").is_file() and len(list(out.glob("retrieval_img_*.jpg"))) == 3
    ranking = pd.read_csv(out / "ranking.csv")
    assert list(ranking.columns) == ["rank", "path", "label", "score"]
    assert ranking["score"].tolist() == pytest.approx(scores, abs=1e-6)
    # a file that is not in the database: embedded with the saved model; a copy of a test image scores 1.0
    new = tmp_path / "new_query.png"
    Image.open(query).save(new)
    [(_, results)] = _infer("--query_img_name", str(new), *args)
    assert results[0][0] == query and results[0][2] == pytest.approx(1.0, abs=1e-2)
    # a NEW file named like a stored image gets its own ranking, not the stored image's
    other = db.split("test").images[-1]
    same_name = tmp_path / query.rsplit("/", 1)[1]
    Image.open(other).save(same_name)
    [(_, results)] = _infer("--query_img_name", str(same_name), *args)
    assert results[0][0] == other


def test_ablation(trained, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(trained.parent))
    db = str(trained / f"{RUN}_data_base.pth")
    result = ablation.main(
        ablation.get_args_parser().parse_args(
            ["--better_data_base", db, "--worse_data_base", db, "--retrieval_num", "2", "--save_results"]
        )
    )
    assert result["ties"] == 15 and result["GE_Rate@2"] == 100.0
    assert (trained / f"{RUN}----{RUN}_ablation.csv").is_file()


def test_resume_equals_uninterrupted(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = recipe.train_one_epoch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(recipe, "train_one_epoch", interrupted)
    # share_type layer4 (only the heads are private) keeps the three runs' checkpoints small
    run = "cub_uncropped_fixed_random_layer4_resnet18_4_2"
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "a", monkeypatch, "--num_epochs", "2", "--share_type", "layer4")
    monkeypatch.setattr(recipe, "train_one_epoch", original)
    resumed = _train(data, tmp_path / "a", monkeypatch, "--num_epochs", "2", "--share_type", "layer4", "--resume")
    trained = _train(data, tmp_path / "b", monkeypatch, "--num_epochs", "2", "--share_type", "layer4")
    a = torch.load(trained / f"{run}_checkpoint.pth", weights_only=True)
    b = torch.load(resumed / f"{run}_checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and torch.equal(a["ids"], b["ids"])
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    sa = pd.read_csv(trained / f"{run}_statistics.csv", index_col="epoch")
    sb = pd.read_csv(resumed / f"{run}_statistics.csv", index_col="epoch")
    pd.testing.assert_frame_equal(sa, sb)


def test_user_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "reir/inference.py",
            "--data_base",
            str(tmp_path / "missing_data_base.pth"),
            "--query_img_name",
            "x.jpg",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: database not found") and "Traceback" not in proc.stderr


def test_amp_and_compile_train_in_bfloat16_and_evaluate_in_float32(data, tmp_path, monkeypatch):
    """--amp --compile: the ensemble is compiled (graphs captured) and every training forward runs under bfloat16
    autocast (the logits come out float32: the heads' float32 bias promotes them), the saved database holds the
    float32 features test.py recomputes from the model file, and the TensorBoard events hold the CSV's rows and one
    loss per step."""
    seen = record_speed(monkeypatch, recipe)
    out = _train(data, tmp_path / "results", monkeypatch, "--num_epochs", "1", "--amp", "--compile")
    assert seen["graphs"] and seen["autocast"] and set(seen["autocast"]) == {torch.bfloat16}
    assert_float32_database(reir_test, out / f"{RUN}_model.pth", out / f"{RUN}_data_base.pth", data, tmp_path)
    steps = len(seen["autocast"])  # one forward per optimizer step
    assert_events_match_csv(out / f"{RUN}_tensorboard", out / f"{RUN}_statistics.csv", steps)
