"""Test a trained REIR model: recompute the features of the run's splits with ``<run>_model.pth``, report
Recall@K, MAP@R and R-precision (ranking by the mean per-learner cosine), write ``<run>_test_results.csv`` and
rewrite the database.

    python reir/test.py --data_base car_uncropped_fixed_random_layer1_resnet18_48_12_data_base.pth

Dataset and model flags default to the database's stored configuration; when given, they must match it.
"""
import argparse
from typing import Dict

import pandas as pd

from common.database import Split, save_database
from common.device import get_devices, parse_gpu_ids
from common.engine import extract_features
from common.errors import UserError, run_cli
from common.metrics import retrieval_metrics
from common.retrieval import open_database, run_prefix
from reir.retrieval import open_model, runtime_args
from reir.train import MODEL_KEYS, ensemble_embed, eval_loaders
from reir.train import get_args_parser as train_parser

DEFAULT_DATA_BASE = "car_uncropped_fixed_random_layer1_resnet18_48_12_data_base.pth"


def metrics_of(splits: Dict[str, Split], query: str, gallery: str, ranks) -> Dict[str, float]:
    """Recall@K, MAP@R and R-precision in % (self excluded by index when query and gallery are one split)."""
    q, g = splits[query], splits[gallery]
    extra = () if query == gallery else (g.features, g.labels)
    return {f"test_{k}": 100.0 * v for k, v in retrieval_metrics(q.features, q.labels, ranks, *extra).items()}


def main(args: argparse.Namespace) -> Dict[str, float]:
    requested = {k: getattr(args, k, None) for k in MODEL_KEYS if k != "method"}
    db_path, db = open_database(args.data_base, args.method, requested)
    gpu_ids = parse_gpu_ids(args.gpu_ids)
    model = open_model(db_path, db, gpu_ids, args.ensemble_impl)
    run = runtime_args(args, db.config)
    loaders, query, gallery = eval_loaders(run)
    splits = {}
    for name, loader in loaders.items():
        features = extract_features(model, loader, get_devices(gpu_ids)[0], args.amp, embed=ensemble_embed,
                                    desc=f"{name} features")
        splits[name] = Split(loader.dataset.images, loader.dataset.labels, features)
    if splits[query].features.shape[1] != db.split(query).features.shape[1]:
        raise UserError("recomputed features do not match the database's dimension")
    metrics = metrics_of(splits, query, gallery, args.recalls)
    print(" ".join(f"{k.replace('test_', '')}:{v:.2f}%" for k, v in metrics.items()))
    prefix = run_prefix(db_path)
    csv = db_path.with_name(f"{prefix}_test_results.csv")
    pd.DataFrame([metrics]).to_csv(csv, index=False)
    save_database(db_path, config=db.config, method=db.method, splits=splits, metric=db.metric, scale=db.scale,
                  query=db.query, gallery=db.gallery)
    print(f"wrote {csv} and {db_path}")
    return metrics


def get_args_parser(add_help: bool = True, method: str = "reir",
                    default_data_base: str = DEFAULT_DATA_BASE) -> argparse.ArgumentParser:
    parent = train_parser(add_help=False) if method == "reir" else _sreml_parser()
    parser = argparse.ArgumentParser(description=f"Test a trained {method.upper()} model", add_help=add_help,
                                     parents=[parent])
    parser.add_argument("--data_base", default=default_data_base,
                        help=f"database of the run, a path or a name under results/{method}/ "
                             f"(default: {default_data_base})")
    parser.set_defaults(**{k: None for k in MODEL_KEYS if k != "method"})
    return parser


def _sreml_parser() -> argparse.ArgumentParser:
    from sreml.train import get_args_parser as sreml_train_parser
    return sreml_train_parser(add_help=False)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
