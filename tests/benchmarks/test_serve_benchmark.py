"""``python -m benchmarks.serve_benchmark``'s smoke setting: a server process on 127.0.0.1 under concurrent JPEG queries
(soak checks on), then an --add of new images; both CSVs written with their rows."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra (uvicorn) is not installed")
pytest.importorskip("python_multipart", reason="the [serve] extra (python-multipart) is not installed")

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_answers_every_query_and_adds_images(tmp_path):
    out = tmp_path / "serve.csv"
    argv = ["--gallery_sizes", "600", "--indexes", "ivf", "--minutes", "0.05", "--max_growth_mb", "1e6"]
    argv += ["--clients", "3", "--quick", "--add", "6", "--output", str(out), "--work_dir", str(tmp_path / "work")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve_benchmark", *argv], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = list(csv.DictReader(open(out)))
    assert row["gallery"] == "600" and row["index"] == "ivf" and int(row["queries"]) > 3
    assert row["errors"] == "0" and float(row["queries_per_s"]) > 0 and float(row["p99_ms"]) >= float(row["p50_ms"])
    assert float(row["rss_mb"]) > 0 and float(row["anon_mb"]) > 0
    (added,) = list(csv.DictReader(open(tmp_path / "serve_add.csv")))
    assert added == {**added, "gallery": "600", "added": "6"}
    assert not list((tmp_path / "work").glob("synthetic600_data_base.pth*"))  # the large files are removed
