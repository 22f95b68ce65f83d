"""What the ``--amp`` / ``--compile`` runs of every method's tests observe, their float32-evaluation check, and
TensorBoard events read back as TensorBoard reads them."""

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common import device as device_module
from common.database import load_database


def record_speed(monkeypatch, module: Any = None) -> Dict[str, List[Any]]:
    """Swap torch.compile's backend for one that records the graphs it is given and runs them eagerly (no minutes
    of C++ generation on a small CPU), ``module.upcast`` (the training step's cast of the model's outputs) for one
    that records their dtypes (bfloat16 under ``--amp``), and record the dtype of every autocast region a
    training step enters (``Precision.autocast``)."""
    seen: Dict[str, List[Any]] = {"graphs": [], "dtypes": [], "autocast": []}

    def backend(graph: torch.fx.GraphModule, example_inputs):
        seen["graphs"].append(graph)
        return graph.forward

    real: Callable[[torch.Tensor], torch.Tensor] = getattr(module, "upcast", None)

    def upcast(x: torch.Tensor) -> torch.Tensor:
        seen["dtypes"].append(x.dtype)
        return real(x)

    real_autocast = device_module.Precision.autocast

    def autocast(self):
        seen["autocast"].append(self.dtype)
        return real_autocast(self)

    monkeypatch.setattr(device_module, "COMPILE_BACKEND", backend)
    if module is not None:
        monkeypatch.setattr(module, "upcast", upcast)
    monkeypatch.setattr(device_module.Precision, "autocast", autocast)
    return seen


def assert_float32_database(test_module: Any, model_file: Path, database: Path, data: Path, tmp_path: Path) -> None:
    """The database a run saved holds float32 features, those test.py recomputes from its model file (a plain,
    uncompiled model, no autocast)."""
    copy = tmp_path / "recomputed_data_base.pth"
    argv = ["--model_file", str(model_file), "--data_path", str(data), "--num_workers", "0"]
    test_module.main(test_module.get_args_parser().parse_args(argv + ["--save_data_base", str(copy)]))
    stored, recomputed = load_database(database), load_database(copy)
    assert recomputed.splits
    for name in recomputed.splits:
        features = stored.split(name).features
        assert features.dtype == torch.float32
        # float32 rounding apart (the run's channels-last weights take other convolution kernels); bfloat16
        # features would be off by ~1e-3
        torch.testing.assert_close(features, recomputed.split(name).features, rtol=0, atol=1e-4)


def tensorboard_scalars(folder: Path) -> Dict[str, List[Tuple[int, float]]]:
    """tag -> [(step, value)] of the events files in ``folder``."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_events_match_csv(folder: Path, statistics: Path, steps: int, step_tags=("loss", "lr")) -> None:
    """Every CSV column is an ``epoch/`` tag with the CSV's values at step = epoch; ``steps`` optimizer steps were
    logged as ``step/<name>`` at steps 1..steps."""
    frame = pd.read_csv(statistics, index_col="epoch")
    scalars = tensorboard_scalars(folder)
    assert set(scalars) == {f"epoch/{c}" for c in frame.columns} | {f"step/{t}" for t in step_tags}
    for column in frame.columns:
        expected = [(int(e), v) for e, v in frame[column].items() if not pd.isna(v)]
        got = scalars[f"epoch/{column}"]
        assert [s for s, _ in got] == [s for s, _ in expected], column
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), column
    for tag in step_tags:
        assert [s for s, _ in scalars[f"step/{tag}"]] == list(range(1, steps + 1)), tag
