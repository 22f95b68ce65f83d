"""End-to-end on tiny data: train -> test -> inference (database image and new file) -> ablation, resume, and
the one-line refusals."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import cgd.train as train
from cgd import ablation, inference
from cgd import test as cgd_test
from cgd.losses import BatchHardTripletLoss, LabelSmoothingCrossEntropyLoss
from cgd.model import Model
from common.cli import parse_args_with_config
from common.errors import UserError
from tests.tiny import make_tiny_processed, tiny_args
from tests.training import assert_float32_database, record_speed

REPO = Path(__file__).resolve().parents[2]


def _name(gd):
    return f"cub_uncropped_resnet18_{gd}_64_0.1_0.5_0.1_8"


def _train_args(data, gd="SG", epochs=2, *extra):
    options = f"--backbone_type resnet18 --image_size 32 --batch_size 8 --num_epochs {epochs} --feature_dim 64"
    return train.get_args_parser().parse_args(
        [*tiny_args(data, "cub", f"{options} --gd_config {gd} --recalls 1,2"), *extra]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny CUB-like data and two trained runs (SG, 2 epochs; MG, 1 epoch) in one results folder."""
    root = tmp_path_factory.mktemp("cgd")
    data = make_tiny_processed(root / "data", "cub", num_classes=8, per_class=6, size=40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRIEVAL_RESULTS", str(root / "results"))
        train.main(_train_args(data, "SG", 2))
        train.main(_train_args(data, "MG", 1))
    return data, root / "results"


@pytest.fixture
def results(trained, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(trained[1]))
    return trained[1] / "cgd"


def test_train_writes_run_files(trained, results):
    for suffix in ("statistics.csv", "statistics.png", "checkpoint.pth", "model.pth", "data_base.pth"):
        assert (results / f"{_name('SG')}_{suffix}").is_file()
    frame = pd.read_csv(results / f"{_name('SG')}_statistics.csv", index_col="epoch")
    assert list(frame.index) == [0, 1, 2]
    assert set(frame.columns) == {"train_loss", "train_accuracy", "lr", "test_recall@1", "test_recall@2", "test_map@r"}
    assert frame.loc[1:, "train_loss"].notna().all() and frame["test_recall@1"].between(0, 100).all()
    db = torch.load(results / f"{_name('SG')}_data_base.pth", weights_only=True)
    assert db["metric"] == "euclidean" and db["config"]["gd_config"] == "SG" and db["config"]["num_classes"] == 4
    assert db["splits"]["test"]["features"].shape == (24, 64)
    # the resolved arguments, read back with --config, are the run's own
    again = parse_args_with_config(train.get_args_parser(), ["--config", str(results / f"{_name('SG')}_args.yaml")])
    expected = vars(_train_args(trained[0], "SG", 2))
    assert {k: v for k, v in vars(again).items() if k != "config"} == {
        k: v for k, v in expected.items() if k != "config"
    }


def test_test_script_metrics_database_and_rendering(trained, results):
    data = trained[0]
    args = cgd_test.get_args_parser().parse_args(
        [
            "--data_path",
            str(data),
            "--data_base",
            f"{_name('SG')}_data_base.pth",
            "--query_img_name",
            "img_5_0.jpg",
            "--retrieval_num",
            "3",
            "--num_workers",
            "0",
            "--recalls",
            "1,2",
        ]
    )
    training_db = (results / f"{_name('SG')}_data_base.pth").read_bytes()
    metrics = cgd_test.main(args)
    assert (results / f"{_name('SG')}_data_base.pth").read_bytes() == training_db  # never overwritten
    assert set(metrics) == {"test_recall@1", "test_recall@2", "test_map@r", "test_r_precision"}
    stats = pd.read_csv(results / f"{_name('SG')}_statistics.csv", index_col="epoch")
    kept = stats.loc[1:, "test_recall@1"].idxmax()
    for column in ("test_recall@1", "test_map@r"):  # same model, same features
        assert metrics[column] == pytest.approx(stats.loc[kept, column], abs=1e-6)
    assert (results / f"{_name('SG')}_test_metrics.csv").is_file()
    assert not (results / f"{_name('SG')}_test_data_base.pth").exists()
    out = results / "img_5_0"
    assert (out / "query_img.jpg").is_file() and (out / "grid.png").is_file()
    assert len(list(out.glob("retrieval_img_*_*.jpg"))) == 3


def _infer(*args):
    return [results for _, results in inference.main(inference.get_args_parser().parse_args(list(args)))]


def test_inference_database_image_and_new_file(trained, results, tmp_path):
    data = trained[0]
    common = ["--data_base", f"{_name('SG')}_data_base.pth", "--retrieval_num", "4"]
    stored = _infer(*common, "--query_img_name", "img_6_1.jpg")[0]
    assert len(stored) == 4 and all("img_6_1.jpg" not in path for path, _, _ in stored)  # self excluded
    distances = [d for _, _, d in stored]
    assert distances == sorted(distances)
    ranking = pd.read_csv(results / "img_6_1" / "ranking.csv")
    assert list(ranking.columns) == ["rank", "path", "label", "score"] and list(ranking["rank"]) == [1, 2, 3, 4]
    assert ranking["score"].tolist() == pytest.approx(distances, abs=1e-6)
    # the same picture as a NEW file (not in the database): embedded by the saved model, so it finds itself first
    copy = tmp_path / "new_query.png"
    Image.open(next(data.glob("cub/images/006.*/img_6_1.jpg"))).save(copy)
    fresh = _infer(*common, "--query_img_name", str(copy))[0]
    assert fresh[0][0].endswith("img_6_1.jpg") and fresh[0][2] < 0.05
    assert (results / "new_query" / "grid.png").is_file()


def test_new_file_sharing_a_stored_name_gets_its_own_ranking(trained, results, tmp_path):
    """A new image named like a stored one (img_6_1.jpg) is embedded, not confused with the stored image."""
    data = trained[0]
    other = tmp_path / "img_6_1.jpg"
    Image.open(next(data.glob("cub/images/007.*/img_7_2.jpg"))).save(other)
    common = ["--data_base", f"{_name('SG')}_data_base.pth", "--retrieval_num", "3"]
    by_name = _infer(*common, "--query_img_name", "img_6_1.jpg")[0]
    by_file = _infer(*common, "--query_img_name", str(other))[0]
    assert by_file[0][0].endswith("img_7_2.jpg") and by_file[0][2] < 0.05  # finds the picture it really is
    assert by_file != by_name


def test_folder_of_queries(trained, results, tmp_path):
    folder = tmp_path / "queries"
    for name in ("a.jpg", "b.png"):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        Image.open(next(trained[0].glob("cub/images/005.*/img_5_0.jpg"))).save(folder / "sub" / name)
    out = _infer("--data_base", f"{_name('SG')}_data_base.pth", "--retrieval_num", "2", "--query_img_name", str(folder))
    assert len(out) == 2 and (results / "queries" / "sub__a.jpg" / "ranking.csv").is_file()
    assert (results / "queries" / "sub__b.png" / "grid.png").is_file() and (
        results / "queries" / "index.html"
    ).is_file()


def test_model_of_another_configuration_refused_in_one_line(trained, results, tmp_path):
    """A database whose model file beside it was trained with another gd_config is refused, in one line."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / f"{_name('SG')}_data_base.pth").write_bytes((results / f"{_name('SG')}_data_base.pth").read_bytes())
    (folder / f"{_name('SG')}_model.pth").write_bytes((results / f"{_name('MG')}_model.pth").read_bytes())
    new = tmp_path / "q.png"
    Image.open(next(trained[0].glob("cub/images/005.*/img_5_0.jpg"))).save(new)
    proc = subprocess.run(
        [
            sys.executable,
            "cgd/inference.py",
            "--data_base",
            str(folder / f"{_name('SG')}_data_base.pth"),
            "--query_img_name",
            str(new),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "RETRIEVAL_RESULTS": str(tmp_path / "r")},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gd_config='MG' (expected 'SG')" in lines[0]


def test_ablation_sg_vs_mg(trained, results):
    args = ablation.get_args_parser().parse_args(
        [
            "--better_data_base",
            f"{_name('SG')}_data_base.pth",
            "--worse_data_base",
            f"{_name('MG')}_data_base.pth",
            "--retrieval_num",
            "4",
            "--save_results",
        ]
    )
    metrics = ablation.main(args)
    assert metrics["wins"] + metrics["ties"] + metrics["losses"] == 24
    csv = results / f"{_name('SG')}----{_name('MG')}_ablation.csv"
    assert pd.read_csv(csv)["wins"].item() == metrics["wins"]


def test_resume_equals_uninterrupted(trained, tmp_path, monkeypatch):
    """Interrupt during epoch 2, resume: CSV and weights identical to the fixture's uninterrupted 2-epoch run."""
    data, straight = trained

    class Interrupted(Exception):
        pass

    real = train.train_one_epoch

    def crash_in_epoch_2(*a, **k):
        if inspect.signature(real).bind(*a, **k).arguments["epoch"] == 2:
            raise Interrupted
        return real(*a, **k)

    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path))
    monkeypatch.setattr(train, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(Interrupted):
        train.main(_train_args(data, "SG", 2))
    monkeypatch.setattr(train, "train_one_epoch", real)
    train.main(_train_args(data, "SG", 2, "--resume"))

    name = _name("SG")
    a = pd.read_csv(straight / "cgd" / f"{name}_statistics.csv")
    b = pd.read_csv(tmp_path / "cgd" / f"{name}_statistics.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    wa = torch.load(straight / "cgd" / f"{name}_checkpoint.pth", weights_only=True)["model"]
    wb = torch.load(tmp_path / "cgd" / f"{name}_checkpoint.pth", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_other_config(trained, results):
    with pytest.raises(UserError, match="num_epochs=2 .expected 3."):
        train.main(_train_args(trained[0], "SG", 3, "--resume"))


def _running_stats_unchanged(freeze):
    """One training step on random data; which BatchNorm running statistics did not move."""
    torch.manual_seed(0)
    model = Model("resnet18", "SG", 16, 2)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    loader = [(torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))]
    criteria = {"class": LabelSmoothingCrossEntropyLoss(), "triplet": BatchHardTripletLoss()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    train.train_one_epoch(model, criteria, optimizer, loader, torch.device("cpu"), 1, 1, frozen_bn=freeze)
    after = model.state_dict()
    return {k: torch.equal(v, after[k]) for k, v in before.items()}


def test_frozen_bn_running_stats_unchanged_after_step():
    unchanged = _running_stats_unchanged(freeze=True)
    backbone = {k: v for k, v in unchanged.items() if k.startswith("features.")}
    assert backbone and all(backbone.values())
    assert not unchanged["auxiliary_module.0.running_mean"]  # the auxiliary BatchNorm1d still trains
    unchanged = _running_stats_unchanged(freeze=False)
    assert not unchanged["features.1.running_mean"]


def test_batch_size_must_be_multiple_of_four(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path))
    args = _train_args(trained[0], "SG", 1)
    args.batch_size = 10
    with pytest.raises(UserError, match="multiple of 4"):
        train.main(args)


def test_amp_and_compile_train_in_bfloat16_and_evaluate_in_float32(trained, tmp_path, monkeypatch):
    """--amp --compile: the model is compiled (graphs captured), its training outputs are bfloat16, and the saved
    database holds the float32 features test.py recomputes from the model file."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path))
    seen = record_speed(monkeypatch, train)
    train.main(_train_args(trained[0], "SG", 1, "--amp", "--compile"))
    assert seen["graphs"] and set(seen["dtypes"]) == {torch.bfloat16}
    run = tmp_path / "cgd" / _name("SG")
    assert_float32_database(cgd_test, Path(f"{run}_model.pth"), Path(f"{run}_data_base.pth"), trained[0], tmp_path)
