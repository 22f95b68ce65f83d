"""Evaluate a trained FastRetri model: Recall@K, MAP@R and R-precision (cosine) on the evaluation splits.

    python fastretri/test.py --config-file fastretri/configs/cub.yml [MODEL.WEIGHTS results/fastretri/..._model.pth]

The model file's stored configuration must match the config's model keys (backbone, stride, neck, dataset, test
input); by default the run's own ``<name>_model.pth`` (best R@1) is evaluated.
"""
import argparse
from typing import Dict

import torch

from common.datasets import eval_splits
from common.device import main_device, parse_gpu_ids
from common.distributed import DistInfo
from common.errors import run_cli
from common.metrics import retrieval_metrics
from fastretri.config import data_name, resolve_config, run_files
from fastretri.data import build_datasets, embed_split
from fastretri.model import load_model
from fastretri.train import get_args_parser as train_parser


def main(args: argparse.Namespace) -> Dict[str, float]:
    cfg = resolve_config(args)
    path = cfg["MODEL"]["WEIGHTS"] or str(run_files(cfg).model)
    device = main_device(parse_gpu_ids(args.gpu_ids) if args.num_gpus > 0 else [])
    model = load_model(cfg, path).to(device)
    datasets = build_datasets(cfg)
    info = DistInfo(device=device)
    q_name, g_name = eval_splits(data_name(cfg))
    amp = cfg["SOLVER"]["AMP"]["ENABLED"] and device.type == "cuda"
    feats = {name: embed_split(model, datasets[name], info, cfg["TEST"]["IMS_PER_BATCH"],
                               cfg["DATALOADER"]["NUM_WORKERS"], amp) for name in dict.fromkeys((q_name, g_name))}
    query_labels = torch.as_tensor(datasets[q_name].labels)
    if q_name == g_name:
        metrics = retrieval_metrics(feats[q_name], query_labels, cfg["TEST"]["RECALLS"])
    else:
        metrics = retrieval_metrics(feats[q_name], query_labels, cfg["TEST"]["RECALLS"], feats[g_name],
                                    torch.as_tensor(datasets[g_name].labels))
    metrics = {k: 100.0 * v for k, v in metrics.items()}
    print(f"{path} on {data_name(cfg)} {q_name}/{g_name} ({len(datasets[q_name])} queries): "
          + " ".join(f"{k.replace('recall', 'R')}:{v:.2f}%" for k, v in metrics.items()))
    return metrics


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return argparse.ArgumentParser("FastRetri evaluation", parents=[train_parser(add_help=False)], add_help=add_help)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
