"""Running a training script as 1 plain process and as N gloo processes under torchrun, and comparing the runs.

The equivalence tests train in float64 with augmentation off on the same global batches, so any difference
larger than ~1e-9 relative is a bug in what the ranks compute, not float rounding.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Sequence

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, args: Sequence[str], results: Path, nproc: int = 1, timeout: int = 600) -> str:
    """``python script`` (nproc 1) or ``torchrun --standalone --nproc_per_node nproc script``; returns the output."""
    env = {**os.environ, "RETRIEVAL_RESULTS": str(results), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, str(REPO / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}"
    return output


def max_relative_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """Largest max|a - b| / max|a| over the floating-point tensors of two state dicts (same keys required).

    Relative to each tensor's scale, not element-wise: Adam turns a gradient component that is zero up to
    rounding into a step of either sign, so element-wise ratios of near-zero weights measure noise, not bugs."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if a[k].is_floating_point() and a[k].numel():
            x, y = a[k].double(), b[k].double()
            worst = max(worst, (x - y).abs().max().item() / max(x.abs().max().item(), 1e-12))
    return worst


def max_change(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> float:
    """How far training moved the weights (the comparison is vacuous when nothing moved)."""
    return max(
        (after[k].double() - before[k].double()).abs().max().item()
        for k in after
        if after[k].is_floating_point() and after[k].numel()
    )


def compare_runs(
    one: Path, two: Path, run: str, initial: Dict[str, torch.Tensor] = None, tolerance: float = 1e-9
) -> None:
    """Same weights (relative ``tolerance``), same CSV rows, the same set of files, each written once."""
    files_one = sorted(p.name for p in one.iterdir())
    files_two = sorted(p.name for p in two.iterdir())
    assert files_one == files_two, (files_one, files_two)
    for suffix in ("model.pth", "data_base.pth", "checkpoint.pth", "statistics.csv"):
        assert f"{run}_{suffix}" in files_one, f"{run}_{suffix} missing: {files_one}"
    w1 = torch.load(one / f"{run}_checkpoint.pth", weights_only=True)["model"]
    w2 = torch.load(two / f"{run}_checkpoint.pth", weights_only=True)["model"]
    assert all(v.dtype == torch.float64 for v in w1.values() if v.is_floating_point())
    if initial is not None:
        assert max_change(initial, w1) > 1e-4, "training did not move the weights"
    assert max_relative_difference(w1, w2) < tolerance, max_relative_difference(w1, w2)
    s1 = pd.read_csv(one / f"{run}_statistics.csv", index_col="epoch")
    s2 = pd.read_csv(two / f"{run}_statistics.csv", index_col="epoch")
    assert list(s1.index) == list(s2.index) and list(s1.columns) == list(s2.columns)
    pd.testing.assert_frame_equal(s1, s2, rtol=1e-7)
    d1 = torch.load(one / f"{run}_data_base.pth", weights_only=True)
    d2 = torch.load(two / f"{run}_data_base.pth", weights_only=True)
    for name in d1["splits"]:
        assert d1["splits"][name]["images"] == d2["splits"][name]["images"]
        torch.testing.assert_close(d1["splits"][name]["features"], d2["splits"][name]["features"], rtol=1e-6, atol=1e-7)


def assert_two_processes_equal_one(
    method: str, args: Sequence[str], tmp_path: Path, run: str, model: Callable[[], torch.nn.Module]
) -> Path:
    """Every equivalence test's steps: train ``<method>/train.py`` as 1 process and as 2 gloo processes and compare
    the runs (``model()``, built under seed 0, is where the weights must have moved from); returns the 2-process run."""
    for n in (1, 2):
        run_script(f"{method}/train.py", args, tmp_path / f"p{n}", nproc=n)
    torch.manual_seed(0)
    initial = model().double().state_dict()
    compare_runs(tmp_path / "p1" / method, tmp_path / "p2" / method, run, initial)
    return tmp_path / "p2" / method
