"""Search the gallery of a trained IRT model with one query image and render the ranked results.

The query is an image of the database's query split (given by path or unique file name) or ANY other image file,
which is then embedded with the saved model (centre crop, as in evaluation). Writes ``query_img.jpg``,
``retrieval_img_<rank>_<score>.jpg`` (green frame = same label, red = different) and ``grid.png`` under
``results/irt/<run>_retrieval/<query name>/`` and prints the ranked list.
"""
import argparse
import os
from pathlib import Path

import torch

from common.database import find_query
from common.errors import UserError, run_cli
from common.presets import build_transform
from common.render import save_retrieval
from common.retrieval import embed_file, open_database, search
from common.runio import plain_config
from irt.test import load_trained
from irt.train import MODEL_KEYS, get_args_parser as train_parser, prepare_args, resolve_device, run_files


def embed_image(args, path: str) -> torch.Tensor:
    """Embedding of a new image file with the saved model and the evaluation transform."""
    device = resolve_device(args.device)
    model = load_trained(args, args.checkpoint).to(device).eval()
    transform = build_transform("irt", False, args.data_name, args.crop_type, args.input_size)
    return embed_file(model, path, transform, device)


def main(args):
    args = prepare_args(args)
    run = run_files(args)
    config = plain_config(args)
    _, db = open_database(args.database or str(run.database), "irt", {k: config[k] for k in MODEL_KEYS})
    query, gallery = db.split(db.query), db.split(db.gallery)
    known = {os.path.realpath(p) for p in query.images}
    if os.path.isfile(args.query_img) and os.path.realpath(args.query_img) not in known:
        path, feature, label, exclude = args.query_img, embed_image(args, args.query_img), None, None
        print(f"{args.query_img} is not in the database: embedded with the saved model")
    else:
        i = find_query(query.images, args.query_img)
        path, feature, label = query.images[i], query.features[i], query.labels[i]
        exclude = i if db.query == db.gallery else None
    if args.retrieval_num < 1:
        raise UserError("--retrieval-num must be positive")
    results = search(feature, gallery, db.metric, args.retrieval_num, db.scale, exclude)
    out = save_retrieval(run.directory / f"{run.name}_retrieval" / Path(path).stem, path, label, results,
                         size=(max(args.input_size, 224),) * 2)
    print(f"query {path} (label {'unknown' if label is None else label})")
    for rank, (image, lab, score) in enumerate(results, start=1):
        print(f"{rank:3d}  {score:.4f}  label {lab}  {'ok ' if lab == label else '   '} {image}")
    print(f"rendered in {out}")
    return results


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("IRT image search", parents=[train_parser(add_help=False)], add_help=add_help)
    p.add_argument("--query-img", "--query_img_name", dest="query_img", required=True,
                   help="query: an image of the database (path or unique file name) or any image file")
    p.add_argument("--retrieval-num", "--retrieval_num", dest="retrieval_num", default=8, type=int,
                   help="number of results (default: 8)")
    p.add_argument("--database", default=None,
                   help="database file (default: results/irt/<run>_data_base.pth of these flags)")
    p.add_argument("--checkpoint", default=None,
                   help="model file used to embed a new image (default: results/irt/<run>_model.pth)")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
