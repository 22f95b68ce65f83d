from pathlib import Path
from typing import List

import pytest
import torch

from common.distributed import all_gather_by_index, get_rank, get_world_size, is_main_process
from fastretri.model import FastRetri
from fastretri.train import get_args_parser, main
from tests.ddp import assert_two_processes_equal_one


def _cpu_args(config: Path, data: Path, *extra: str) -> List[str]:
    """The tiny config on the tiny data without GPUs, then ``extra``: both training runs here start so."""
    return ["--config-file", str(config), "--data_path", str(data), "--num-gpus", "0", *extra]


def test_rank_helpers_without_process_group():
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)


def test_all_gather_by_index_single_process_reorders():
    feats = torch.arange(6.0).reshape(3, 2)
    out = all_gather_by_index(feats, torch.tensor([2, 0, 1]), 3)
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]]))


def test_two_gloo_processes_equal_one(tiny_config, tiny_data, tmp_path):
    """torchrun, 2 gloo processes vs 1 process, float64, no augmentation, the same global batches: equal to ~1e-9.

    In float32 the same comparison differed by up to 4.8e-4 with torch 2.14.1 (oneDNN picks other convolution
    algorithms for 4 and 8 images, and SGD with momentum over 3 steps amplifies the rounding); in float64 it is
    ~1e-12, so that was rounding, not a difference in what the ranks compute."""
    args = _cpu_args(tiny_config, tiny_data, "--float64", "--no-augment", "SOLVER.MAX_EPOCH", "2")
    args += ["TEST.EVAL_PERIOD", "1", "SOLVER.BASE_LR", "0.05"]
    assert_two_processes_equal_one(
        "fastretri", args, tmp_path, "cub_uncropped_resnet18", lambda: FastRetri(4, "resnet18")
    )


def test_spawned_processes_run(tiny_config, tiny_data, tmp_path, monkeypatch):
    """fast-reid's own flag (--num-procs starts gloo processes through torchrun's launcher) trains and writes the
    run's files."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path))
    main(get_args_parser().parse_args(_cpu_args(tiny_config, tiny_data, "--num-procs", "2", "SOLVER.MAX_EPOCH", "1")))
    assert (tmp_path / "fastretri" / "cub_uncropped_resnet18_model.pth").is_file()


def test_processes_take_the_listed_gpus(monkeypatch):
    """--num-gpus N --gpu_ids a,b: N processes, local rank i on GPU gpu_ids[i], whether this script's launcher or
    torchrun started them; fewer listed GPUs than processes on the machine is one error line."""
    from common.errors import UserError
    from fastretri import train

    monkeypatch.setattr(train, "parse_gpu_ids", lambda text: [int(t) for t in text.split(",")])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = get_args_parser().parse_args(["--num-gpus", "2", "--gpu_ids", "2,3"])
    assert train.plan_processes(args) == (2, True, [2, 3])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.plan_processes(args) == (1, True, [2, 3])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(UserError, match="3 processes on this machine but 2 GPU"):
        train.plan_processes(args)
