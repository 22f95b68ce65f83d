"""The shared epoch loop: epoch-0 row, CSV, checkpoints, best model + database, and exact resume."""
import pandas as pd
import pytest
import torch

from common.database import Split, load_database
from common.engine import Evaluation, RunFiles, fit
from common.errors import UserError
from common.runio import safe_load, set_seed


def _toy_run(tmp_path, num_epochs, resume=None):
    """A linear embedding trained on random batches drawn from the global RNG (so resume must restore it)."""
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    labels = torch.arange(40) % 4
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    if resume is None:
        set_seed(1)

    def train_one_epoch(epoch):
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
        from common.engine import eval_recalls
        return Evaluation(eval_recalls(split, split, [1, 2], same_set=True), {"test": split})

    run = RunFiles(tmp_path, "toy")
    fit(run, model=model, config={"dim": 3}, config_keys=["dim"], num_epochs=num_epochs,
        train_one_epoch=train_one_epoch, evaluate=evaluate, optimizer=optimizer, scheduler=scheduler,
        resume=resume, method="toy")
    return run, model


def test_fit_writes_epoch0_csv_checkpoint_and_best(tmp_path):
    run, model = _toy_run(tmp_path, 3)
    frame = pd.read_csv(run.statistics, index_col="epoch")
    assert list(frame.index) == [0, 1, 2, 3]
    assert list(frame.columns) == ["test_recall@1", "test_recall@2", "train_loss"] or \
        set(frame.columns) == {"train_loss", "test_recall@1", "test_recall@2"}
    assert pd.isna(frame.loc[0, "train_loss"]) and frame.loc[1:, "train_loss"].notna().all()
    assert safe_load(run.checkpoint)["epoch"] == 3
    best_epoch = safe_load(run.model)["epoch"]
    assert frame.loc[best_epoch, "test_recall@1"] == frame["test_recall@1"].max()
    db = load_database(run.database, {"dim": 3}, ["dim"])
    assert db.split("test").features.shape == (40, 3)
    assert run.statistics.with_suffix(".png").is_file()


def test_resume_equals_uninterrupted(tmp_path):
    straight_dir, split_dir = tmp_path / "a", tmp_path / "b"
    run_a, model_a = _toy_run(straight_dir, 4)
    _toy_run(split_dir, 2)
    run_b, model_b = _toy_run(split_dir, 4, resume="auto")
    assert torch.equal(model_a.weight, model_b.weight)
    pd.testing.assert_frame_equal(pd.read_csv(run_a.statistics), pd.read_csv(run_b.statistics))


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        _toy_run(tmp_path, 2, resume="auto")
