"""Tiny data and a tiny FastRetri config shared by the tests."""

from pathlib import Path

import pytest

from tests.tiny import make_tiny_processed

TINY_YML = """\
_BASE_: {base}
MODEL:
  BACKBONE:
    NAME: resnet18
    PRETRAIN: False
INPUT:
  SIZE_TRAIN: [36]
  SIZE_TEST: [32, 32]
  CROP:
    SIZE: [32]
DATALOADER:
  NUM_WORKERS: 0
SOLVER:
  MAX_EPOCH: 2
  WARMUP_ITERS: 2
  IMS_PER_BATCH: 8
TEST:
  EVAL_PERIOD: 1
  IMS_PER_BATCH: 16
  RECALLS: [1, 2, 4]
"""
CONFIGS = Path(__file__).resolve().parents[2] / "fastretri" / "configs"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_tiny_processed(root, "cub", num_classes=8, per_class=6, size=32)
    make_tiny_processed(root, "isc", num_classes=8, per_class=6, size=32)
    return root


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yml"
    path.write_text(TINY_YML.format(base=CONFIGS / "cub.yml"))
    return path


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results" / "fastretri"
