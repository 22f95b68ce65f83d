"""The shared epoch loop (common.engine.Run): epoch-0 row, CSV, checkpoints, the kept model + database, resume."""

import pandas as pd
import pytest
import torch

from common.database import Split, load_database
from common.engine import Evaluation, Run, RunFiles, eval_recalls
from common.errors import UserError
from common.runio import safe_load, set_seed


def _toy_run(tmp_path, num_epochs, resume=None):
    """A linear embedding trained on random batches drawn from the global RNG (so resume must restore it); the
    loop is written out exactly as the methods' ``main`` functions write it."""
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    labels = torch.arange(40) % 4
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    if resume is None:
        set_seed(1)

    def train_one_epoch():
        idx = torch.randint(0, 40, (8,))
        loss = (model(x[idx]) - labels[idx, None].float()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"train_loss": loss.item()}

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
        run.checkpoint(epoch, model, optimizer, scheduler)
    run.finish()
    return run.files, model


def test_loop_writes_epoch0_csv_checkpoint_and_best(tmp_path):
    files, model = _toy_run(tmp_path, 3)
    frame = pd.read_csv(files.statistics, index_col="epoch")
    assert list(frame.index) == [0, 1, 2, 3]
    assert set(frame.columns) == {"train_loss", "test_recall@1", "test_recall@2"}
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
