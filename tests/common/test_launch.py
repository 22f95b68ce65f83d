"""``common.distributed.launch_elastic``: N processes through PyTorch's elastic launcher (torchrun's), each with
torchrun's environment; a process's user error is one ``error:`` line here, a crash or Ctrl-C ends them all."""

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from common.distributed import DistInfo, launch_elastic, wrap_ddp
from common.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _record_group_at_exit(path: Path) -> None:
    path.write_text(json.dumps(torch.distributed.is_initialized()))


def record_environment(out: str) -> None:
    """Writes what torchrun would give this process, the group it can join, and (at exit) whether it is still in
    the group: registered before joining, the record runs after everything registered by joining."""
    from common.distributed import init_process

    atexit.register(_record_group_at_exit, Path(out, f"joined_at_exit{os.environ['RANK']}.json"))
    info = init_process("gloo", False)
    total = torch.tensor([float(info.rank + 1)])
    torch.distributed.all_reduce(total)
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    record = {**{k: os.environ[k] for k in keys}, "sum": float(total)}
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(record))


def fail_on_rank_one(kind: str) -> None:
    if int(os.environ["RANK"]) == 1:
        if kind == "user":
            raise UserError("no such dataset: mine")
        sys.exit(3)
    time.sleep(300)  # rank 0 is ended by the launcher, not by finishing


def sleep_forever(out: str) -> None:
    Path(out, f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    time.sleep(300)


def test_processes_get_torchrun_environment_and_one_group(tmp_path):
    launch_elastic(record_environment, (str(tmp_path),), 2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, record in enumerate(records):
        assert record == {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "sum": 3.0}


def test_every_process_leaves_the_group_when_it_exits(tmp_path):
    """No process exits inside the group (one that does can abort in gloo's teardown after its work is done)."""
    launch_elastic(record_environment, (str(tmp_path),), 2)
    assert [json.loads((tmp_path / f"joined_at_exit{r}.json").read_text()) for r in range(2)] == [False, False]


def test_a_process_user_error_is_a_user_error_here():
    with pytest.raises(UserError, match="^no such dataset: mine$"):
        launch_elastic(fail_on_rank_one, ("user",), 2)


def test_a_crashed_process_ends_all_with_its_exit_code(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch_elastic(fail_on_rank_one, ("crash",), 2)
    assert exit_info.value.code == 3
    assert "error: process 1 of 2 failed (exit code 3)" in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_ctrl_c_ends_every_process(tmp_path):
    script = (
        "import sys; from common.errors import run_cli; from common.distributed import launch_elastic; "
        "from tests.common.test_launch import sleep_forever; "
        "run_cli(lambda out: launch_elastic(sleep_forever, (out,), 2), sys.argv[1])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env, stderr=subprocess.PIPE)
    pids_files = [tmp_path / f"pid{r}" for r in range(2)]
    deadline = time.time() + 120
    while not all(p.exists() and p.read_text() for p in pids_files) and time.time() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in pids_files]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "error: interrupted" in err.decode()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def test_wrap_ddp_keeps_the_batchnorm_a_model_chose(tmp_path):
    """``global_batchnorm=False`` (FastRetri's MODEL.BACKBONE.NORM decides): BatchNorm layers stay nn.BatchNorm."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        info = DistInfo(world_size=2)  # a process of a distributed run: DistributedDataParallel wraps
        kept = wrap_ddp(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), info, global_batchnorm=False)
        converted = wrap_ddp(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), info)
        assert isinstance(kept, nn.parallel.DistributedDataParallel)
        assert type(kept.module[1]) is nn.BatchNorm1d
        assert type(converted.module[1]).__name__ == "GlobalBatchNorm"
    finally:
        torch.distributed.destroy_process_group()
