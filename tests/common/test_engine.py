"""The shared epoch loop (common.engine.Run): epoch-0 row, CSV, TensorBoard events, checkpoints, the kept model +
database, resume."""

import sys

import pandas as pd
import pytest
import torch

from common.database import Split, load_database
from common.engine import Evaluation, Run, RunFiles, eval_recalls
from common.errors import UserError
from common.runio import safe_load, set_seed
from tests.training import assert_events_match_csv, tensorboard_scalars


def _toy_run(tmp_path, num_epochs, resume=None, crash_in=None):
    """A linear embedding trained on random batches drawn from the global RNG (so resume must restore it), two
    steps per epoch; the loop is written out exactly as the methods' ``main`` functions write it. ``crash_in``: stop
    after that epoch's row, before its checkpoint (a kill)."""
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    labels = torch.arange(40) % 4
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    if resume is None:
        set_seed(1)

    def train_one_epoch():
        for _ in range(2):
            idx = torch.randint(0, 40, (8,))
            loss = (model(x[idx]) - labels[idx, None].float()).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log_step(loss.detach(), optimizer.param_groups[0]["lr"], half=loss.item() / 2)
        return {"train_loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}

    def evaluate():
        with torch.no_grad():
            f = torch.nn.functional.normalize(model(x), dim=1)
        split = Split([f"img{i}.jpg" for i in range(40)], labels.tolist(), f)
        return Evaluation(eval_recalls(split, split, [1, 2], same_set=True), {"test": split})

    run = Run(RunFiles(tmp_path, "toy"), {"dim": 3}, ["dim"], "toy", num_epochs, recalls=[1, 2])
    start, _ = run.resume(resume, model, optimizer, scheduler)
    if start == 1:
        run.log(0, {}, evaluate(), model)
    for epoch in range(start, num_epochs + 1):
        stats = train_one_epoch()
        scheduler.step()
        run.log(epoch, stats, evaluate(), model)
        if epoch == crash_in:
            return run.files, model
        run.checkpoint(epoch, model, optimizer, scheduler)
    run.finish()
    return run.files, model


def test_loop_writes_epoch0_csv_checkpoint_and_best(tmp_path):
    files, model = _toy_run(tmp_path, 3)
    frame = pd.read_csv(files.statistics, index_col="epoch")
    assert list(frame.index) == [0, 1, 2, 3]
    assert set(frame.columns) == {"train_loss", "lr", "test_recall@1", "test_recall@2", "test_map@r"}
    assert pd.isna(frame.loc[0, "train_loss"]) and frame.loc[1:, "train_loss"].notna().all()
    assert safe_load(files.checkpoint)["epoch"] == 3
    best_epoch = safe_load(files.model)["epoch"]
    assert best_epoch >= 1 and frame.loc[best_epoch, "test_recall@1"] == frame.loc[1:, "test_recall@1"].max()
    db = load_database(files.database, {"dim": 3}, ["dim"])
    assert db.split("test").features.shape == (40, 3)
    assert files.statistics.with_suffix(".png").is_file()


def test_resume_equals_uninterrupted(tmp_path):
    straight_dir, split_dir = tmp_path / "a", tmp_path / "b"
    run_a, model_a = _toy_run(straight_dir, 4)
    _toy_run(split_dir, 2)
    run_b, model_b = _toy_run(split_dir, 4, resume="auto")
    assert torch.equal(model_a.weight, model_b.weight)
    pd.testing.assert_frame_equal(pd.read_csv(run_a.statistics), pd.read_csv(run_b.statistics))
    assert safe_load(run_a.model)["epoch"] == safe_load(run_b.model)["epoch"]


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        _toy_run(tmp_path, 2, resume="auto")


def _scripted(tmp_path, values, recalls=(1,), selection="best"):
    """Run.log fed with scripted metrics (epoch -> value of the first rank): which epoch's model is kept."""
    model = torch.nn.Linear(2, 2)
    run = Run(RunFiles(tmp_path, "s"), {}, [], "toy", len(values) - 1, recalls=list(recalls), selection=selection)
    for epoch, value in enumerate(values):
        metrics = {f"test_recall@{k}": value + k for k in recalls}
        run.log(epoch, {} if epoch == 0 else {"train_loss": 1.0}, Evaluation(metrics), model)
    run.finish()
    return safe_load(run.files.model)["epoch"]


def test_untrained_epoch_0_never_competes_with_trained_epochs(tmp_path):
    assert _scripted(tmp_path / "a", [90.0, 50.0, 70.0, 60.0]) == 2  # best trained epoch, though epoch 0 scored 90
    assert _scripted(tmp_path / "b", [90.0, 50.0, 70.0, 60.0], selection="last") == 3
    assert _scripted(tmp_path / "c", [90.0]) == 0  # an evaluation-only run keeps the untrained model


def test_best_on_the_first_requested_rank(tmp_path):
    """--recalls 2,4 (no R@1): the model is still written, chosen on R@2."""
    assert _scripted(tmp_path, [10.0, 30.0, 20.0], recalls=(2, 4)) == 1


def test_a_run_that_never_evaluates_fails_loudly(tmp_path):
    run = Run(RunFiles(tmp_path, "none"), {}, [], "toy", 1, recalls=[1])
    run.log(1, {"train_loss": 1.0}, Evaluation({}), torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="was not written"):
        run.finish()


def test_tensorboard_events_hold_the_csv_rows_and_every_step(tmp_path):
    files, _ = _toy_run(tmp_path, 3)
    assert_events_match_csv(files.path("tensorboard"), files.statistics, 6, ("loss", "lr", "half"))
    scalars = tensorboard_scalars(files.path("tensorboard"))
    steps = scalars["step/loss"]
    assert [v for _, v in scalars["step/half"]] == pytest.approx([v / 2 for _, v in steps], rel=1e-6)
    assert [v for _, v in scalars["step/lr"]] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    last = pd.read_csv(files.statistics, index_col="epoch").loc[3, "train_loss"]
    assert steps[-1][1] == pytest.approx(last, rel=1e-6)  # the epoch's last step


def test_resumed_run_writes_the_events_of_an_uninterrupted_one(tmp_path):
    """Killed after epoch 3's row and steps but before its checkpoint, then resumed: the events read back equal the
    uninterrupted run's (epoch 3's first events are dropped, not doubled); a new run of the same name starts over."""
    straight, _ = _toy_run(tmp_path / "a", 4)
    _toy_run(tmp_path / "b", 2)
    _toy_run(tmp_path / "b", 4, resume="auto", crash_in=3)
    resumed, _ = _toy_run(tmp_path / "b", 4, resume="auto")
    assert len(list(resumed.path("tensorboard").iterdir())) == 1  # rewritten at each start, not piled up
    assert tensorboard_scalars(resumed.path("tensorboard")) == tensorboard_scalars(straight.path("tensorboard"))
    again, _ = _toy_run(tmp_path / "b", 1)
    assert [s for s, _ in tensorboard_scalars(again.path("tensorboard"))["step/loss"]] == [1, 2]


def test_without_tensorboard_a_run_works_and_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    files, _ = _toy_run(tmp_path, 2)
    out = capsys.readouterr().out
    assert out.count("note: tensorboard is not installed") == 1
    assert not files.path("tensorboard").exists()
    assert list(pd.read_csv(files.statistics, index_col="epoch").index) == [0, 1, 2]
