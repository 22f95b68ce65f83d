"""Test a trained CGD model: recompute the test-split features, report Recall@K, MAP@R and R-precision, rewrite
the database, and render one query's retrieval as leftthomas/CGD's test.py did (query_img.jpg plus
retrieval_img_<rank>_<Euclidean distance>.jpg with green/red frames, in results/cgd/<query stem>/).

    python cgd/test.py --retrieval_num 10

The model comes from ``<run>_model.pth`` next to ``--data_base``; model flags (--backbone_type, --gd_config, ...)
default to the database's values and, when given, must match it.
"""
import argparse
from typing import Dict

import pandas as pd
import torch
from torch.utils.data import DataLoader

from cgd.model import MODEL_KEYS, embed
from cgd.retrieval import open_model, rank_and_render, requested_config
from cgd.train import get_args_parser as train_parser
from common.database import Database, Split, find_query, save_database
from common.datasets import load_splits
from common.device import main_device, parse_gpu_ids
from common.engine import extract_features
from common.errors import UserError, run_cli
from common.metrics import retrieval_metrics
from common.presets import build_transform
from common.retrieval import DB_SUFFIX, open_database, run_prefix
from common.runio import results_dir

DEFAULT_DATA_BASE = "car_uncropped_resnet50_SG_1536_0.1_0.5_0.1_128_data_base.pth"
DEFAULT_QUERY = "data/car/car_ims/008055.jpg"  # the original's /home/data/car/uncropped/008055.jpg in our layout


def evaluate(model: torch.nn.Module, db: Database, args: argparse.Namespace,
             device: torch.device) -> Dict[str, Split]:
    """Features of the database's query and gallery splits, recomputed from the images under --data_path."""
    cfg = db.config
    transform = build_transform("cgd", False, cfg["data_name"], cfg["crop_type"], cfg.get("image_size"))
    names = list(dict.fromkeys((db.query, db.gallery)))
    datasets = load_splits(args.data_path, cfg["data_name"], cfg["crop_type"], {n: transform for n in names})
    splits = {}
    for name, dataset in datasets.items():
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
        features = extract_features(model, loader, device, args.amp, embed=embed, desc=f"{name} features")
        splits[name] = Split(dataset.images, dataset.labels, features)
    return splits


def metrics_of(splits: Dict[str, Split], query: str, gallery: str, ranks) -> Dict[str, float]:
    """Recall@K, MAP@R, R-precision in % (self excluded by index when query and gallery are one split)."""
    q, g = splits[query], splits[gallery]
    available = len(g.images) - (1 if query == gallery else 0)
    if max(ranks) > available:
        raise UserError(f"--recalls {max(ranks)} is larger than the gallery ({available} images to rank)")
    if query == gallery:
        values = retrieval_metrics(q.features, q.labels, ranks)
    else:
        values = retrieval_metrics(q.features, q.labels, ranks, g.features, g.labels)
    return {f"test_{k}": 100.0 * v for k, v in values.items()}


def main(args: argparse.Namespace) -> Dict[str, float]:
    db_path, db = open_database(args.data_base, "cgd", requested_config(args))
    find_query(db.split(db.query).images, args.query_img_name)  # fail before the expensive part
    device = main_device(parse_gpu_ids(args.gpu_ids))
    model = open_model(db_path, db, device)
    splits = evaluate(model, db, args, device)
    metrics = metrics_of(splits, db.query, db.gallery, args.recalls)
    print(" ".join(f"{k[5:]}: {v:.2f}%" for k, v in metrics.items()))

    run = run_prefix(db_path)
    out = results_dir("cgd")
    pd.DataFrame([metrics]).to_csv(out / f"{run}_test_metrics.csv", index=False)
    save_database(out / f"{run}{DB_SUFFIX}", config=db.config, method="cgd", splits=splits, metric="euclidean",
                  query=db.query, gallery=db.gallery)
    print(f"metrics saved to {out / f'{run}_test_metrics.csv'}, database to {out / f'{run}{DB_SUFFIX}'}")

    fresh = Database(db.config, "cgd", "euclidean", 1.0, db.query, db.gallery, splits)
    query = fresh.split(db.query)
    i = find_query(query.images, args.query_img_name)
    rank_and_render(fresh, query.images[i], query.labels[i], query.features[i], args.retrieval_num,
                    exclude=i if db.query == db.gallery else None)
    return metrics


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Test CGD: metrics on the test split and one rendered query",
                                     add_help=add_help, parents=[train_parser(add_help=False)])
    g = parser.add_argument_group("retrieval")
    g.add_argument("--query_img_name", default=DEFAULT_QUERY, type=str,
                   help=f"query image: a path or a unique file name from the test split (default: {DEFAULT_QUERY})")
    g.add_argument("--data_base", default=DEFAULT_DATA_BASE, type=str,
                   help=f"queried database, a path or a name under results/cgd/ (default: {DEFAULT_DATA_BASE})")
    g.add_argument("--retrieval_num", default=8, type=int, help="retrieval number (default: 8)")
    # Model flags: None = take the database's value; a given value must match the database.
    parser.set_defaults(**{k: None for k in MODEL_KEYS if k != "num_classes"})
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
