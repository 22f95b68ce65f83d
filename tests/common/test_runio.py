import random

import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import UserError
from common.runio import (
    Statistics,
    atomic_save,
    check_config,
    load_checkpoint,
    plain_config,
    safe_load,
    save_checkpoint,
)
from common.runs import run_name


def test_run_name_mirrors_the_original():
    assert (
        run_name("car", "uncropped", "resnet50", "SG", 1536, 0.1, 0.5, 0.1, 128)
        == "car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128"
    )


def test_atomic_save_leaves_only_the_file(tmp_path):
    atomic_save({"config": {"a": 1}, "x": torch.arange(3)}, tmp_path / "f.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["f.pth"]
    assert torch.equal(torch.load(tmp_path / "f.pth", weights_only=True)["x"], torch.arange(3))


def test_atomic_save_failure_keeps_old_file(tmp_path):
    atomic_save({"config": {}, "v": 1}, tmp_path / "f.pth")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"config": {}, "v": Unpicklable()}, tmp_path / "f.pth")
    assert torch.load(tmp_path / "f.pth", weights_only=True)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["f.pth"]


def test_safe_load_refuses_foreign_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        safe_load(tmp_path / "junk.pth")
    torch.save({"model": {}}, tmp_path / "noconfig.pth")
    with pytest.raises(UserError, match="no stored configuration"):
        safe_load(tmp_path / "noconfig.pth")
    with pytest.raises(UserError, match="not found"):
        safe_load(tmp_path / "missing.pth")


def test_check_config_names_every_difference_in_one_line():
    with pytest.raises(UserError) as e:
        check_config({"gd_config": "SG", "dim": 8}, {"gd_config": "MG", "dim": 8}, "database x", ["gd_config", "dim"])
    assert "gd_config='SG' (expected 'MG')" in str(e.value) and "\n" not in str(e.value)
    check_config({"a": 1, "b": 2}, {"a": 1, "b": 3}, "x", ["a"])  # keys outside the list are ignored


def test_plain_config_keeps_only_safe_types():
    import argparse

    cfg = plain_config(argparse.Namespace(a=1, b=[1, 2], c=object(), d=None))
    assert cfg["a"] == 1 and cfg["b"] == [1, 2] and isinstance(cfg["c"], str) and cfg["d"] is None


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pth", model=model, config={"k": 1}, epoch=3, optimizer=opt)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    other = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(other.parameters(), lr=0.1)
    random.random(), np.random.rand(), torch.rand(5)
    state = load_checkpoint(tmp_path / "c.pth", {"k": 1}, ["k"], model=other, optimizer=opt2)
    assert state["epoch"] == 3
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(other.weight, model.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(UserError, match="different model"):
        load_checkpoint(tmp_path / "c.pth", {"k": 2}, ["k"], model=other)


def test_statistics_csv_plot_and_resume(tmp_path):
    stats = Statistics(tmp_path / "run_statistics.csv")
    stats.log(0, **{"test_recall@1": 10.0})
    stats.log(1, train_loss=2.0, train_accuracy=50.0, **{"test_recall@1": 30.0})
    stats.log(2, train_loss=1.0, train_accuracy=60.0, **{"test_recall@1": 20.0})
    frame = pd.read_csv(tmp_path / "run_statistics.csv", index_col="epoch")
    assert list(frame.index) == [0, 1, 2]
    assert frame.loc[1, "test_recall@1"] == 30.0 and pd.isna(frame.loc[0, "train_loss"])
    assert (tmp_path / "run_statistics.png").stat().st_size > 1000
    resumed = Statistics.resume(tmp_path / "run_statistics.csv", up_to_epoch=1)
    assert sorted(resumed.rows) == [0, 1] and resumed.rows[1]["test_recall@1"] == 30.0
