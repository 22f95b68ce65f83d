"""CGD's part of ``cgd/test.py`` and ``cgd/inference.py``: its model flags, its saved model, and ranking + rendering
one query as leftthomas/CGD's test.py did. Finding the database, the model file and embedding a new image are
``common.retrieval``'s."""
import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from cgd.model import MODEL_KEYS, model_from_config
from common.database import Database
from common.errors import UserError
from common.render import save_retrieval
from common.retrieval import model_path, search
from common.runio import load_model_file, results_dir

__all__ = ["requested_config", "open_model", "rank_and_render"]


def requested_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The model-defining flags the user actually gave (the rest default to None and come from the database)."""
    return {k: getattr(args, k) for k in MODEL_KEYS if getattr(args, k, None) is not None}


def open_model(db_path: Path, db: Database, device: torch.device) -> nn.Module:
    """The trained model saved with the database, checked against the database's configuration."""
    expected = {k: db.config.get(k) for k in MODEL_KEYS}
    model = load_model_file(model_path(db_path), expected, MODEL_KEYS, lambda state: model_from_config(state["config"]),
                            "model")
    return model.to(device).eval()


def rank_and_render(db: Database, query_path: str, query_label: Optional[int], feature: torch.Tensor, k: int,
                    exclude: Optional[int] = None) -> Tuple[Path, List[Tuple[str, int, float]]]:
    """Rank the gallery by Euclidean distance, print the list and write ``results/cgd/<query stem>/``
    (no green/red frames when ``query_label`` is None: a new image's correctness is unknown)."""
    gallery = db.split(db.gallery)
    available = len(gallery.images) - (1 if exclude is not None else 0)
    if not 1 <= k <= available:
        raise UserError(f"--retrieval_num {k} must be between 1 and the {available} gallery images")
    results = search(feature, gallery, "euclidean", k, exclude=exclude)
    out = save_retrieval(results_dir("cgd") / Path(query_path).stem, query_path, query_label, results)
    print(f"query {query_path} (label {'unknown' if query_label is None else query_label}): "
          f"{k} nearest of {len(gallery.images)} gallery images")
    for rank, (path, lab, dist) in enumerate(results, start=1):
        mark = "" if query_label is None else ("  correct" if lab == query_label else "  wrong")
        print(f"{rank:3d}. {dist:.4f}  label {lab}  {path}{mark}")
    print(f"saved to {out}")
    return out, results
