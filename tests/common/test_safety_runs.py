"""Runs and files: exact resume in N processes, atomic writes (full disk, permissions, stale temporary files),
argument validation at parse time, and the checks a database passes at load."""

import errno
import importlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from common import runio
from common.database import Split, load_database, save_database
from common.engine import Run
from common.errors import UserError, run_cli
from common.query import check_dim
from common.runio import Statistics, atomic_save, rng_state, safe_load, save_checkpoint, set_seed
from common.runs import RunFiles
from tests.tiny import CGD_RUN, make_tiny_processed, make_untrained_cgd_run

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- resume under torchrun

TOY = '''
"""A toy run in the shape of the methods' loops: every epoch each rank draws rank + 1 numbers from torch, numpy
and python (as augmenting different images consumes different amounts of randomness), the mean over ranks moves
a float64 weight. --kill_at E: rank 1 SIGKILLs itself in epoch E, after drawing (a kill in the middle of a run)."""
import argparse, os, random, signal
import numpy as np, torch
from common.distributed import all_reduce_mean, init_distributed
from common.engine import Evaluation, Run
from common.runs import RunFiles
from common.errors import run_cli
from common.runio import set_seed


def main(args):
    info = init_distributed(False)
    set_seed(args.seed + (info.rank if args.seed_per_rank else 0))
    model = torch.nn.Linear(3, 1, bias=False).double()
    run = Run(RunFiles(args.out, "toy"), {"dim": 1}, ["dim"], "toy", args.epochs, recalls=[1])
    start, _ = run.resume("auto" if args.resume else None, model)
    for epoch in range(start, args.epochs + 1):
        n = info.rank + 1
        step = torch.stack(
            [
                torch.rand(n, dtype=torch.float64).sum(),
                torch.tensor(np.random.rand(n).sum()),
                torch.tensor(sum(random.random() for _ in range(n)), dtype=torch.float64),
            ]
        )
        if epoch == args.kill_at and info.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        step = all_reduce_mean(step)
        with torch.no_grad():
            model.weight += step
        run.log(epoch, {"train_loss": float(step.sum())}, Evaluation({"test_recall@1": float(epoch)}), model)
        run.checkpoint(epoch, model)
    run.finish()


p = argparse.ArgumentParser()
p.add_argument("--out")
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--kill_at", type=int, default=0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--seed_per_rank", action="store_true")
p.add_argument("--resume", action="store_true")
run_cli(main, p.parse_args())
'''


def _torchrun(script: Path, args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path):
    """Rank 1 is SIGKILLed in epoch 2 (after its checkpoint of epoch 1), the job is resumed with --resume: the
    weights and the CSV equal those of the uninterrupted 2-process run exactly. Before each rank's random state was
    saved, rank 1 resumed with rank 0's and drew other numbers."""
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    flags = []  # every rank seeded alike (CGD, REIR, SREML, IRT); --seed_per_rank seeds as FastRetri does
    done = _torchrun(script, ["--out", str(tmp_path / "a"), *flags])
    assert done.returncode == 0, done.stdout + done.stderr
    killed = _torchrun(script, ["--out", str(tmp_path / "b"), "--kill_at", "2", *flags])
    assert killed.returncode != 0
    assert safe_load(tmp_path / "b" / "toy_checkpoint.pth")["epoch"] == 1
    resumed = _torchrun(script, ["--out", str(tmp_path / "b"), "--resume", *flags])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "note:" not in resumed.stdout

    a, b = (safe_load(tmp_path / d / "toy_checkpoint.pth") for d in ("a", "b"))
    assert a["epoch"] == b["epoch"] == 3
    assert torch.equal(a["model"]["weight"], b["model"]["weight"])
    assert len(a["rng_ranks"]) == 2 and not torch.equal(a["rng_ranks"][0]["torch"], a["rng_ranks"][1]["torch"])
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "a" / "toy_statistics.csv"), pd.read_csv(tmp_path / "b" / "toy_statistics.csv")
    )


def _one_epoch_run(folder: Path, resume=None):
    model = torch.nn.Linear(2, 1)
    run = Run(RunFiles(folder, "r"), {"d": 1}, ["d"], "toy", 2, recalls=[1])
    start, _ = run.resume(resume, model)
    return run, model, start


def test_resume_in_other_process_count_restores_what_it_can_and_says_so(tmp_path, capsys):
    """A checkpoint of 2 processes resumed by 1: rank 0's state is restored and a note says the run is not exact."""
    run, model, _ = _one_epoch_run(tmp_path)
    set_seed(5)
    rank0 = rng_state()
    torch.rand(3)
    save_checkpoint(run.files.checkpoint, model=model, config={"d": 1}, epoch=1, rng=[rank0, rng_state()])
    torch.manual_seed(123)
    _, _, start = _one_epoch_run(tmp_path, "auto")
    assert start == 2 and torch.equal(torch.get_rng_state(), rank0["torch"])
    assert "holds the random state of 2 process(es), this run has 1" in capsys.readouterr().out


def test_checkpoint_of_one_process_resumes_without_note(tmp_path, capsys):
    run, model, _ = _one_epoch_run(tmp_path)
    run.checkpoint(1, model)
    _one_epoch_run(tmp_path, "auto")
    assert "note:" not in capsys.readouterr().out
    assert len(safe_load(run.files.checkpoint)["rng_ranks"]) == 1


KILL_AFTER = '''
"""Run a training script, SIGKILLing rank $KILL_RANK (default 1) right after the checkpoint of epoch $KILL_AFTER
(a simulated kill)."""
import os, runpy, signal, sys
from common.engine import Run

real, kill = Run.checkpoint, int(os.environ["KILL_AFTER"])


def checkpoint(self, epoch, *args, **kwargs):
    real(self, epoch, *args, **kwargs)
    if epoch == kill and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "1"):
        os.kill(os.getpid(), signal.SIGKILL)


Run.checkpoint = checkpoint
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.parametrize("nproc,workers", [(2, 0), (1, 2)])
def test_fastretri_killed_and_resumed_equals_uninterrupted(tmp_path, nproc, workers):
    """FastRetri seeds rank r with SEED + r and augments (random crop, flip): 2 gloo processes in float64 (or one
    process with 2 loader workers), killed after epoch 1 and resumed, end with the weights and CSV of the
    uninterrupted run."""
    from tests.fastretri.conftest import CONFIGS, TINY_YML

    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=6, size=32)
    config = tmp_path / "tiny.yml"
    config.write_text(TINY_YML.format(base=CONFIGS / "cub.yml"))
    wrapper = tmp_path / "kill_after.py"
    wrapper.write_text(KILL_AFTER)
    args = [str(REPO / "fastretri" / "train.py"), "--config-file", str(config), "--data_path", str(data)]
    args += ["--num-gpus", "0", "--float64"]
    opts = ["SOLVER.MAX_EPOCH", "2", "SOLVER.BASE_LR", "0.05", "DATALOADER.NUM_WORKERS", str(workers)]  # overrides last

    def launch(results: Path, *extra: str, kill: int = 0) -> subprocess.CompletedProcess:
        os.environ.update(RETRIEVAL_RESULTS=str(results), KILL_AFTER=str(kill), KILL_RANK=str(nproc - 1))
        try:
            return _torchrun(wrapper, [*args, *extra, *opts], nproc=nproc)
        finally:
            del os.environ["RETRIEVAL_RESULTS"], os.environ["KILL_AFTER"], os.environ["KILL_RANK"]

    done = launch(tmp_path / "a")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert launch(tmp_path / "b", kill=1).returncode != 0
    resumed = launch(tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    run = tmp_path / "{}" / "fastretri" / "cub_uncropped_resnet18_checkpoint.pth"
    a, b = (safe_load(str(run).format(d)) for d in ("a", "b"))
    assert a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    csv = "{}/fastretri/cub_uncropped_resnet18_statistics.csv"
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / csv.format("a")), pd.read_csv(tmp_path / csv.format("b")))


# ---------------------------------------------------------------- atomic writes


def test_full_disk_is_one_error_line_and_leaves_the_file_intact(tmp_path, monkeypatch, capsys):
    """torch.save runs out of space half-way (ENOSPC): exit 2 with one ``error:`` line, the previous checkpoint
    unchanged and no temporary file left."""
    target = tmp_path / "run_checkpoint.pth"
    atomic_save({"config": {}, "epoch": 1}, target)
    before = target.read_bytes()
    real = torch.save

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda _: atomic_save({"config": {}, "epoch": 2}, target), None)
    monkeypatch.setattr(torch, "save", real)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: cannot write") and "No space left on device" in err[0]
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """Models, databases, checkpoints and the CSV get 0666 minus the umask, as a file written with open() (mkstemp
    alone made them 0600)."""
    old = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        atomic_save({"config": {}}, tmp_path / "m_model.pth")
        db = Split(["a.jpg", "b.jpg"], [0, 1], torch.eye(2))
        save_database(tmp_path / "m_data_base.pth", config={}, method="cgd", splits={"test": db})
        Statistics(tmp_path / "m_statistics.csv").log(0, test_recall=1.0)
    finally:
        os.umask(old)
    expected = _mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~umask
    for name in ("m_model.pth", "m_data_base.pth", "m_statistics.csv", "m_statistics.png"):
        assert _mode(tmp_path / name) == expected, name


def test_ann_index_written_atomically_with_normal_mode(tmp_path):
    pytest.importorskip("faiss")
    from common.ann import build_index, load_index, save_index

    features = torch.nn.functional.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    index = build_index(features, "cosine", "hnsw", sample=0, log=None)
    save_index(index, tmp_path / "g.hnsw.faiss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.hnsw.faiss"]
    assert load_index(tmp_path / "g.hnsw.faiss").size == 200
    assert _mode(tmp_path / "g.hnsw.faiss") == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_save_leaves_a_temporary_file_that_the_next_save_removes(tmp_path):
    """A process killed between writing and renaming leaves ``.<name>.<pid>.<random>.tmp``; the next save of the
    same file removes it (its PID is dead), and the file itself was never touched."""
    target = tmp_path / "run_model.pth"
    atomic_save({"config": {}, "v": 1}, target)
    code = (
        "import os, sys; from common import runio; "
        "os.replace = lambda *a: os.kill(os.getpid(), 9); "
        "runio.atomic_save({'config': {}, 'v': 2}, sys.argv[1])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True)
    assert killed.returncode == -9
    left = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].startswith(".run_model.pth.") and left[0].endswith(".tmp")
    assert safe_load(target)["v"] == 1
    atomic_save({"config": {}, "v": 3}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name] and safe_load(target)["v"] == 3


def test_stale_temporary_files_rule(tmp_path):
    """Removed: the target's temporary files whose PID is dead, and any of its temporary files (also the form
    without a PID) untouched for a day. Kept: a live process's, a recent one without a PID, other targets', and
    files that only look similar."""
    dead, live = _dead_pid(), os.getpid()
    names = {
        f".m.pth.{dead}.abcd_123.tmp": False,
        f".m.pth.{live}.abcd_123.tmp": True,
        ".m.pth.k2j4h5g6.tmp": True,  # no PID, recent
        ".m.pth.old_temp.tmp": False,  # no PID, a day old (utime below)
        f".m.pth.{live}.oldlive1.tmp": False,  # alive but a day old
        f".n.pth.{dead}.abcd_123.tmp": True,  # another file's
        f"m.pth.{dead}.abcd_123.tmp": True,  # not hidden: not the toolkit's pattern
        f".m.pth.{dead}.abc.tmp": True,  # not 8 random characters
        f".m.pth.{dead}.abcd_123.tmp.bak": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    day_ago = time.time() - runio.STALE_TEMP_SECONDS - 60
    for name in (".m.pth.old_temp.tmp", f".m.pth.{live}.oldlive1.tmp"):
        os.utime(tmp_path / name, (day_ago, day_ago))
    removed = runio.remove_stale_temps(tmp_path / "m.pth")
    assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)


# ---------------------------------------------------------------- databases at load


def _database(tmp_path: Path, **change) -> Path:
    """A database as save_database writes it, then edited as ``change`` says (the hostile file)."""
    path = tmp_path / "db_data_base.pth"
    feats = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    split = Split([f"{i}.jpg" for i in range(4)], [0, 0, 1, 1], feats)
    save_database(path, config={"feature_dim": 8}, method="cgd", splits={"test": split}, metric="euclidean")
    obj = torch.load(path, weights_only=True)
    test = obj["splits"]["test"]
    if "rows" in change:
        test["features"] = test["features"][: change["rows"]]
    if "images" in change:
        test["images"] = test["images"][: change["images"]]
    if "nan" in change:
        test["features"][change["nan"], 0] = float("nan")
    if "dim" in change:
        test["features"] = test["features"][:, : change["dim"]]
        if change.get("config_dim", True):
            obj["config"] = {}
    if "query" in change:
        obj["query"] = change["query"]
    if "other_split_dim" in change:
        obj["splits"]["train"] = {"images": ["t.jpg"], "labels": [0], "features": torch.zeros(1, 3)}
    torch.save(obj, path)
    return path


def test_a_database_as_written_loads(tmp_path):
    db = load_database(_database(tmp_path), dim=8)
    assert db.split("test").features.shape == (4, 8)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rows": 3}, "3 feature rows for 4 images and 4 labels"),
        ({"images": 3}, "4 feature rows for 3 images and 4 labels"),
        ({"nan": 2}, "1 feature row.s. hold NaN"),
        ({"dim": 6, "config_dim": False}, "features have 6 dimensions, its configuration's feature_dim 8"),
        ({"other_split_dim": True}, "different dimensions .3, 8."),
        ({"query": "val"}, "has no 'val' split"),
    ],
    ids=["fewer-rows", "fewer-images", "nan", "config-dim", "split-dims", "no-query-split"],
)
def test_a_database_that_cannot_be_the_toolkits_is_refused_at_load(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        load_database(_database(tmp_path, **change))


def test_a_database_of_another_dimension_than_its_model_is_refused(tmp_path):
    """The caller that knows the model's embedding size passes it; a query embedded by a model of another size
    is refused in one line instead of failing inside the search."""
    path = _database(tmp_path, dim=6)
    load_database(path)  # no configured size: consistent in itself
    with pytest.raises(UserError, match="features have 6 dimensions, the model 8"):
        load_database(path, dim=8)
    gallery = load_database(path).split("test")
    with pytest.raises(UserError, match="the model embeds 8 dimensions, the database's features have 6"):
        check_dim(torch.ones(1, 8), gallery)


def test_a_tampered_database_ends_a_query_in_one_error_line(tmp_path):
    """End to end: cgd/inference.py on a run whose database has NaN features exits 2 with one ``error:`` line."""
    folder = make_untrained_cgd_run(tmp_path / "results" / "cgd")
    path = folder / f"{CGD_RUN}_data_base.pth"
    obj = torch.load(path, weights_only=True)
    obj["splits"]["test"]["features"][0, 0] = float("nan")
    torch.save(obj, path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RETRIEVAL_RESULTS": str(tmp_path / "results")}
    cmd = [sys.executable, "cgd/inference.py", "--query_img_name", "x.jpg", "--data_base", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "hold NaN" in lines[0], proc.stderr


# ---------------------------------------------------------------- arguments at parse time

BAD_ARGS = [
    ("cgd.train", ["--feature_dim", "0"], "--feature_dim"),
    ("cgd.train", ["--image_size", "0"], "--image_size"),
    ("cgd.train", ["--image_size", "-8"], "--image_size"),
    ("cgd.train", ["--lr", "-1"], "--lr"),
    ("cgd.train", ["--lr", "nan"], "--lr"),
    ("cgd.train", ["--num_workers", "-1"], "--num_workers"),
    ("cgd.train", ["--batch_size", "0"], "--batch_size"),
    ("cgd.train", ["--num_epochs", "-1"], "--num_epochs"),
    ("reir.train", ["--lr", "-1"], "--lr"),
    ("reir.train", ["--ensemble_size", "0"], "--ensemble_size"),
    ("reir.train", ["--image_size", "0"], "--image_size"),
    ("sreml.train", ["--batch_size", "0"], "--batch_size"),
    ("sreml.train", ["--num_workers", "-1"], "--num_workers"),
    ("irt.train", ["--input-size", "0"], "--input-size"),
    ("irt.train", ["--image_size", "-8"], "--input-size"),
    ("irt.train", ["--lr", "-1"], "--lr"),
    ("irt.train", ["--num_workers", "-1"], "--num-workers"),
    ("irt.train", ["--batch_size", "0"], "--batch-size"),
    ("fastretri.train", ["--batch_size", "0"], "--batch_size"),
    ("fastretri.train", ["--image_size", "-8"], "--image_size"),
    ("fastretri.train", ["--num_workers", "-1"], "--num_workers"),
    ("fastretri.train", ["--num-procs", "0"], "--num-procs"),
]


@pytest.mark.parametrize("module, argv, flag", BAD_ARGS, ids=[f"{m}{' '.join(a)}" for m, a, _ in BAD_ARGS])
def test_bad_numbers_are_refused_at_parse_time(module, argv, flag, capsys):
    parser = importlib.import_module(module).get_args_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1 and f"argument {flag}" in errors[0], errors


@pytest.mark.parametrize(
    "key, value",
    [
        ("SOLVER.BASE_LR", "-1"),
        ("SOLVER.IMS_PER_BATCH", "0"),
        ("DATALOADER.NUM_WORKERS", "-1"),
        ("INPUT.CROP.SIZE", "[0]"),
        ("INPUT.SIZE_TRAIN", "[-8, 256]"),  # [0] is fast-reid's "no resize"
    ],
)
def test_fastretri_overrides_are_checked_like_the_flags(key, value):
    from fastretri.config import load_config

    with pytest.raises(UserError, match=f"config key {key}.*expected"):
        load_config(None, [key, value])


def test_good_numbers_still_parse():
    from cgd.train import get_args_parser as cgd_parser
    from irt.train import get_args_parser as irt_parser

    args = cgd_parser().parse_args(["--feature_dim", "8", "--lr", "0", "--num_workers", "0", "--num_epochs", "0"])
    assert (args.feature_dim, args.lr, args.num_workers, args.num_epochs) == (8, 0.0, 0, 0)
    assert irt_parser().parse_args(["--max-iter", "0", "--input-size", "32"]).input_size == 32
