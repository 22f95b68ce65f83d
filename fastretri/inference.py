"""Search a FastRetri database with one image: a query from the database, or any new image file.

    python fastretri/inference.py --query_img_name data/cub/images/...jpg \
        --data_base results/fastretri/cub_uncropped_resnet50_data_base.pth --retrieval_num 8

A query stored in the database uses its stored feature (itself excluded from the results); any other image is
embedded with the run's ``<name>_model.pth`` and its test transform. Results: ``results/fastretri/<run>/<query>/``
with query_img.jpg, retrieval_img_<rank>_<cosine>.jpg (green frame = same label, red = different) and grid.png.
"""
import argparse
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F

from common.database import Database, find_query
from common.device import main_device, parse_gpu_ids
from common.errors import UserError, run_cli
from common.render import save_retrieval
from common.retrieval import embed_file, model_path, open_database, run_prefix, search
from common.runio import results_dir
from fastretri.config import unflatten
from fastretri.data import build_transforms
from fastretri.model import load_model


def embed_new_image(db_path: Path, db: Database, image: str, gpu_ids) -> torch.Tensor:
    """L2-normalised embedding of an image file with the model that wrote the database."""
    if not Path(image).is_file():
        raise UserError(f"{image} is neither in the database nor an image file")
    cfg = unflatten(db.config)
    device = main_device(parse_gpu_ids(gpu_ids))
    model = load_model(cfg, str(model_path(db_path))).to(device)
    _, test_tf = build_transforms(cfg)
    return F.normalize(embed_file(model, image, test_tf, device), dim=0)


def main(args: argparse.Namespace) -> List[Tuple[str, int, float]]:
    if args.retrieval_num < 1:
        raise UserError(f"--retrieval_num must be positive, got {args.retrieval_num}")
    db_path, db = open_database(args.data_base, "fastretri")
    query_split, gallery = db.split(db.query), db.split(db.gallery)
    try:
        index = find_query(query_split.images, args.query_img_name)
    except UserError:
        index = None
    if index is not None:
        feature, label = query_split.features[index], query_split.labels[index]
        exclude = index if db.query == db.gallery else None
    else:
        feature, label, exclude = embed_new_image(db_path, db, args.query_img_name, args.gpu_ids), None, None
    results = search(feature, gallery, db.metric, args.retrieval_num, db.scale, exclude)
    out = results_dir("fastretri") / run_prefix(db_path) / Path(args.query_img_name).stem
    save_retrieval(out, args.query_img_name, label, results)
    for rank, (path, lab, score) in enumerate(results, start=1):
        mark = "" if label is None else (" +" if lab == label else " -")
        print(f"{rank:3d} {score:.4f} label {lab}{mark} {path}")
    print(f"wrote {out}")
    return results


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("FastRetri inference", add_help=add_help)
    parser.add_argument("--query_img_name", required=True, type=str,
                        help="query image: one stored in the database, or any image file")
    parser.add_argument("--data_base", default="cub_uncropped_resnet50_data_base.pth", type=str,
                        help="database path or name in results/fastretri/ (default: cub_uncropped_resnet50_data_base.pth)")
    parser.add_argument("--retrieval_num", default=8, type=int, help="retrieval number (default: 8)")
    parser.add_argument("--gpu_ids", default=None, type=str, help="GPU for embedding a new image (default: first; CPU if none)")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
