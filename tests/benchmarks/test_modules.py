"""The benchmarks are one package: each runs as ``python -m benchmarks.<name>`` with its own parser, none imports a
training script or edits ``sys.path``, and a worker process started with ``-m`` measures what the parent would."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import recall_benchmark

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("benchmarks", "tests", "common", "cgd", "reir", "sreml", "irt", "fastretri")
HELPERS = ("__init__", "meter", "gpu_decode")  # shared code of the benchmarks, not benchmarks themselves
NAMES = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in HELPERS)


def test_every_benchmark_imports_as_a_module_without_training_scripts(tmp_path):
    code = (
        "import importlib, json, sys\n"
        f"names = {NAMES!r}\n"
        "parsers = {n: type(importlib.import_module('benchmarks.' + n).get_args_parser()).__name__ for n in names}\n"
        "train = sorted(m for m in sys.modules if m.split('.')[-1] == 'train')\n"
        "print(json.dumps({'parsers': parsers, 'train': train}))\n"
    )
    # from another folder, the package found through PYTHONPATH only: no path set up by the benchmarks themselves
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"gpu_check", "recall_benchmark", "loader_benchmark", "irt_benchmark"} <= set(NAMES)
    assert result == {"parsers": dict.fromkeys(NAMES, "ArgumentParser"), "train": []}


def test_no_module_edits_sys_path():
    edit = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\+?=[^=])")
    files = [*REPO.glob("*.py"), *(f for package in PACKAGES for f in (REPO / package).rglob("*.py"))]
    assert len(files) > 50 and [f for f in files if edit.search(f.read_text())] == []


def test_recall_benchmark_worker_process_agrees_with_the_full_matrix(tmp_path):
    argv = "--num_queries 400 --dim 16 --num_classes 80 --ranks 1,10 --skip ours_fp32,faiss,gemm_fp32,gemm_bf16"
    args = recall_benchmark.get_args_parser().parse_args(argv.split() + ["--output", str(tmp_path / "r.csv")])
    rows = {r["method"]: r for r in recall_benchmark.main(args)}  # one `python -m` worker per method
    assert set(rows) == {"ours", "full"} and all(r["status"] == "ok" for r in rows.values()), rows
    x, labels = recall_benchmark.make_data(400, 16, 80)
    sim = torch.from_numpy(x).double() @ torch.from_numpy(x).double().T
    sim.fill_diagonal_(float("-inf"))
    top = labels[sim.topk(10, dim=1).indices.numpy()]  # brute force in float64
    want = [float((top[:, :k] == labels[:, None]).any(axis=1).mean()) for k in (1, 10)]
    for method in ("ours", "full"):
        assert [rows[method]["recall@1"], rows[method]["recall@10"]] == want
        assert rows[method]["peak_extra_mib"] is not None and rows[method]["identical"]
    assert (tmp_path / "r.csv").read_text().count("\n") == 3 and np.isfinite(rows["ours"]["seconds"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["benchmarks.irt_benchmark", "--model-kwargs", "depth"], "error: --model-kwargs expects KEY=VALUE items"),
        (["benchmarks.rerank_benchmark", "--configs", "plain,nope"], "error: unknown configs ['nope']"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: --device cuda would run the check")
def test_gpu_check_without_cuda_says_so(tmp_path):
    argv = ["-m", "benchmarks.gpu_check", "--device", "cuda", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --device cuda but CUDA is not available (use --device cpu --quick)"


def test_write_csv_keeps_every_column_of_every_row(tmp_path):
    import csv

    from benchmarks.meter import write_csv

    rows = [{"method": "exact", "seconds": 1.5}, {"method": "ivf", "seconds": 0.25, "recall": 0.99}]
    path = tmp_path / "new" / "folder" / "out.csv"
    write_csv(rows, path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["method", "seconds", "recall"]
        assert list(reader) == [
            {"method": "exact", "seconds": "1.5", "recall": ""},
            {"method": "ivf", "seconds": "0.25", "recall": "0.99"},
        ]
