"""benchmarks.gpu_check on CPU (``--quick``): every section writes its rows to the .md and .json, the equality
checks it makes hold (ensemble forms, Recall@K against the full matrix), and a failing section or row is recorded
without losing the others. Also the loader benchmark's side-by-side table on two tiny JPEGs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check, loader_benchmark

# torchvision 0.29 deprecates torchvision.io decoding (TorchCodec replaces it); it still works and is what runs
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
REPO = Path(__file__).resolve().parents[2]
METHODS = {"cgd", "reir", "irt", "fastretri"}
PIPELINES = {"original", "fast", "tensor", "gpu"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", RETRIEVAL_RESULTS=str(out / "results"))
    # generous budget and timeout: the assertions are about behaviour, not about this machine's load
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--device",
        "cpu",
        "--quick",
        "--out",
        str(out),
        "--budget_s",
        "1200",
        "--ddp_timeout",
        "600",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_quick_check_fills_every_section(quick):
    data, md = quick
    sections = data["sections"]
    assert list(sections) == ["synthetic", "loader", "ensemble", "recall", "ddp"]
    assert all(s["status"] == "done" for s in sections.values())
    synthetic = sections["synthetic"]["rows"]
    assert {r["method"] for r in synthetic} == METHODS
    assert all("error" not in r and r["img_s"] > 0 and r["ms_step"] > 0 for r in synthetic)
    cpu_quick_modes = {"cgd": ["fp32", "bf16 CL"], "reir": ["fp32", "bf16 CL"], "irt": ["fp32", "bf16"]}
    for method in METHODS:  # on CPU no fp16 rows; with --quick no separate fp32 channels-last row
        rows = [r for r in synthetic if r["method"] == method]
        assert [r["mode"] for r in rows] == cpu_quick_modes.get(method, ["fp32", "bf16 CL"])
        assert rows[1]["vs_fp32"] == pytest.approx(rows[1]["img_s"] / rows[0]["img_s"]) and rows[0]["vs_fp32"] == 1
    # ms/step is in milliseconds: one timed step per row (--quick) fits, all rows together, in the section's time
    assert sum(r["ms_step"] for r in synthetic) / 1000 < sections["synthetic"]["seconds"]
    loader = sections["loader"]["rows"]
    assert {(r["method"], r["pipeline"]) for r in loader} == {(m, p) for m in METHODS for p in PIPELINES}
    assert all("error" not in r and r["loader_img_s"] > 0 and r["train_img_s"] > 0 for r in loader)
    for title in [s["title"] for s in sections.values()]:
        assert f"## {title}" in md
    assert md.count("| CGD ResNet-18 (quick) |") == len([r for r in synthetic if r["method"] == "cgd"])


def test_quick_check_equalities_and_ddp_smoke(quick):
    sections = quick[0]["sections"]
    ensemble = {(r["form"], r["precision"]): r for r in sections["ensemble"]["rows"]}
    for form in ("Model loop", "Model grouped"):  # the same weights give the originals' logits
        assert ensemble[(form, "fp32")]["max_dlogits"] < 1e-4
        assert ensemble[(form, "bf16")]["ms_step"] > 0
    assert ensemble[("originals' loop (ModuleList)", "fp32")]["max_dlogits"] == 0
    recall = {r["approach"]: r for r in sections["recall"]["rows"]}
    ours, full = recall["common.metrics.recall_at_k"], recall["full matrix + topk"]
    assert ours["equal"] and [ours[f"r{k}"] for k in (1, 10, 100)] == pytest.approx(
        [full[f"r{k}"] for k in (1, 10, 100)], abs=1e-6
    )
    assert 0 < full["r1"] < full["r10"] < full["r100"] <= 1 and recall["GEMM only (floor)"]["seconds"] > 0
    (ddp,) = sections["ddp"]["rows"]
    assert ddp["method"] == "cgd" and ddp["status"] == "ok", ddp
    assert ddp["command"].startswith("torchrun --standalone --nproc_per_node 1 cgd/train.py")


def test_a_failing_section_or_row_is_recorded_and_the_rest_is_written(tmp_path, monkeypatch):
    check = gpu_check

    def broken_section(*args):
        raise RuntimeError("injected section failure")

    def broken_row(*args):
        raise MemoryError("injected row failure")

    monkeypatch.setattr(check, "section_ensemble", broken_section)
    monkeypatch.setattr(check, "full_matrix_recall", broken_row)
    args = check.get_args_parser().parse_args(
        ["--device", "cpu", "--quick", "--out", str(tmp_path), "--sections", "ensemble", "recall", "--budget_s", "600"]
    )
    data = check.main(check.resolve_defaults(args))
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["ensemble"]["status"] == "error" and "injected section failure" in sections["ensemble"]["error"]
    rows = {r["approach"]: r for r in sections["recall"]["rows"]}
    assert sections["recall"]["status"] == "done" and "injected row failure" in rows["full matrix + topk"]["error"]
    assert rows["common.metrics.recall_at_k"]["r1"] > 0 and data["sections"].keys() == sections.keys()
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Section failed: `RuntimeError: injected section failure`" in md and "MemoryError" in md


def test_loader_benchmark_compares_modes_side_by_side(tmp_path):
    bench = loader_benchmark
    args = bench.get_args_parser().parse_args(
        [
            "--images",
            "2",
            "--rounds",
            "1",
            "--diff_images",
            "2",
            "--methods",
            "cgd",
            "--json",
            str(tmp_path / "loader.json"),
        ]
    )
    result = bench.main(args)
    assert json.loads((tmp_path / "loader.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    for row in result["rows"]:
        assert set(row["img_per_s"]) == set(bench.MODES) and all(v > 0 for v in row["img_per_s"].values())
        assert row["max_diff"]["fast"] == 0 and row["max_diff"]["original"] == 0  # bit-identical
        assert 0 < row["max_diff"]["tensor"] <= 1 + 1e-3 and row["mean_diff"]["tensor"] < 0.05
        assert row["max_diff"]["decode_jpeg"] == row["max_diff"]["tensor"]  # the same decoded pixels
        assert tuple(row["draft"]) == {"train": (252, 252), "eval": (224, 224)}[row["split"]]  # CGD's first Resize
    assert {r["split"] for r in result["rows"]} == {"train", "eval"}
