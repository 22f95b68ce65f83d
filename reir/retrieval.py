"""REIR/SREML's part of ``test.py`` and ``inference.py``: loading the ensemble saved next to a database and the
run's stored configuration for re-evaluation. Finding the database and embedding new images are
``common.retrieval``'s."""
import argparse
from pathlib import Path
from typing import Any, Dict, Sequence

from common.database import Database
from common.retrieval import model_path
from common.runio import load_model_file
from reir.model import Model
from reir.train import MODEL_KEYS, build_model

__all__ = ["open_model", "runtime_args"]


def open_model(db_path: Path, db: Database, gpu_ids: Sequence[int], impl: str = "auto") -> Model:
    """The best-epoch model saved next to the database (``<run>_model.pth``), checked against its config."""
    model = load_model_file(model_path(db_path), db.config, MODEL_KEYS,
                            lambda state: build_model(db.config, gpu_ids, impl))
    return model.eval()


def runtime_args(args: argparse.Namespace, config: Dict[str, Any]) -> argparse.Namespace:
    """The run's stored configuration, with this invocation's data path, batch size, workers and recalls."""
    merged = dict(config)
    for key in ("data_path", "batch_size", "num_workers", "recalls", "amp", "gpu_ids"):
        if getattr(args, key, None) is not None:
            merged[key] = getattr(args, key)
    return argparse.Namespace(**merged)
