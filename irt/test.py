"""Evaluate a trained IRT model: Recall@K, MAP@R and R-precision on the test split (In-shop: query vs gallery).

The original had no test script (issues #3 and #5 asked for one). Give the training flags (they name the run and
build the network) or ``--checkpoint PATH``; the stored configuration must describe the same network. Writes
``<run>_test.csv`` and a database ``<run>_test_data_base.pth`` for ``inference.py``/``ablation.py``.
"""
import argparse
from pathlib import Path

import pandas as pd
import torch

from common.database import Split, save_database
from common.engine import extract_features
from common.errors import UserError, run_cli
from common.metrics import retrieval_metrics
from common.runio import load_model_file, plain_config
from irt.data import build_datasets, eval_loader
from irt.train import MODEL_KEYS, get_args_parser as train_parser, model_from_args, prepare_args, resolve_device, \
    run_files

__all__ = ["load_trained", "main", "get_args_parser"]


def load_trained(args, checkpoint=None) -> torch.nn.Module:
    """The network described by ``args`` with the weights of ``checkpoint`` (default: the run's best model)."""
    path = Path(checkpoint or run_files(args).model)
    return load_model_file(path, plain_config(args), MODEL_KEYS, lambda state: model_from_args(args, pretrained="none"))


def main(args):
    args = prepare_args(args)
    device = resolve_device(args.device)
    pin = args.pin_mem and device.type == "cuda"
    model = load_trained(args, args.checkpoint).to(device)
    datasets = build_datasets(args.data_path, args.data_name, args.crop_type, args.input_size, train=False)
    query, gallery = ("query", "gallery") if args.data_name == "isc" else ("test", "test")
    splits = {}
    for name in dict.fromkeys((query, gallery)):
        features = extract_features(model, eval_loader(datasets[name], args.batch_size, args.num_workers, pin),
                                    device, args.amp, desc=name)
        splits[name] = Split(datasets[name].images, datasets[name].labels, features)
    q, g = splits[query], splits[gallery]
    try:
        if query == gallery:
            metrics = retrieval_metrics(q.features, q.labels, args.rank)
        else:
            metrics = retrieval_metrics(q.features, q.labels, args.rank, g.features, g.labels)
    except ValueError as e:
        raise UserError(f"--rank: {e}") from None
    metrics = {k: 100.0 * v for k, v in metrics.items()}
    run = run_files(args)
    pd.DataFrame([metrics]).to_csv(run.path("test.csv"), index=False, float_format="%.4f")
    save_database(run.path("test_data_base.pth"), config=plain_config(args), method="irt", splits=splits,
                  metric="cosine", query=query, gallery=gallery)
    print(" ".join(f"{k.replace('recall', 'Recall')}: {v:.2f}%" for k, v in metrics.items()))
    print(f"wrote {run.path('test.csv')} and {run.path('test_data_base.pth')}")
    return metrics


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("IRT evaluation", parents=[train_parser(add_help=False)], add_help=add_help)
    p.add_argument("--checkpoint", default=None,
                   help="model file to evaluate (default: results/irt/<run>_model.pth of these flags)")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
