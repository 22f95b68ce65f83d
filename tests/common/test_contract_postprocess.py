"""test.py's post-processing options on a CGD run: the ranked-list path agrees with the exact metrics, and each
option writes its own CSV."""

import pandas as pd
import pytest

from cgd import test as cgd_test
from tests.tiny import CGD_CONFIG, CGD_RUN, make_tiny_processed, make_untrained_cgd_run

RUN, CONFIG = CGD_RUN, CGD_CONFIG


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    data = make_tiny_processed(tmp_path / "data", "cub", num_classes=8, per_class=6, size=40)
    folder = make_untrained_cgd_run(tmp_path / "results" / "cgd")
    return data, folder


def _test(data, *extra):
    return cgd_test.main(
        cgd_test.get_args_parser().parse_args(
            [
                "--data_base",
                f"{RUN}_data_base.pth",
                "--data_path",
                str(data),
                "--num_workers",
                "0",
                "--recalls",
                "1,2,4",
                *extra,
            ]
        )
    )


def test_ranked_list_path_equals_exact_metrics(run):
    """alpha-QE with k = 1 leaves every query unchanged, so the post-processing path must give the exact metrics."""
    data, folder = run
    plain = _test(data)
    same = _test(data, "--qe_k", "1")
    assert same == pytest.approx(plain, abs=1e-9)
    assert (folder / f"{RUN}_test_metrics.csv").is_file() and (folder / f"{RUN}_test_metrics_qe1.csv").is_file()


def test_every_option_runs_and_is_named_in_its_csv(run):
    data, folder = run
    out = _test(data, "--flip", "--qe_k", "3", "--dba_k", "3", "--rerank", "--k1", "6", "--k2", "2")
    assert set(out) == {"test_recall@1", "test_recall@2", "test_recall@4", "test_map@r", "test_r_precision"}
    assert all(0 <= v <= 100 for v in out.values())
    saved = pd.read_csv(folder / f"{RUN}_test_metrics_flip-dba3-qe3-rerank.csv")
    assert saved["test_recall@1"].item() == pytest.approx(out["test_recall@1"])
