"""Retrieve the top K images of one query from a REIR database and draw them as the original did.

Writes ``results/reir/<query stem>/query_img.jpg`` and ``retrieval_img_<rank>_<score>.jpg`` (256x256, 8-px frame,
green = same label, red = different; score = mean per-learner cosine) plus ``grid.png``.
A query in the database uses its stored features; any other image file is embedded with ``<run>_model.pth``
(next to the database; its configuration must match) and drawn without frames, its label being unknown.
The query itself is excluded only when query and gallery are the same split (the original compared strings
with ``is`` and also dropped a gallery item of the In-shop gallery).

    python reir/inference.py --retrieval_num 10 --data_type train
"""
import argparse
from pathlib import Path

from common.compare import query_and_gallery
from common.database import find_query
from common.device import parse_gpu_ids
from common.errors import UserError, run_cli
from common.presets import build_transform
from common.render import save_retrieval
from common.retrieval import embed_file, open_database, search
from common.runio import results_dir
from reir.retrieval import open_model
from reir.train import ensemble_embed

DEFAULT_QUERY = "data/car/car_ims/008055.jpg"  # the original's data/car/uncropped/008055.jpg in our layout
DEFAULT_DATA_BASE = "car_uncropped_fixed_random_layer1_resnet18_48_12_data_base.pth"


def main(args: argparse.Namespace):
    if args.retrieval_num < 1:
        raise UserError(f"--retrieval_num must be positive, got {args.retrieval_num}")
    db_path, db = open_database(args.data_base, args.method)
    q_name, g_name = query_and_gallery(db, args.data_type)
    query, gallery = db.split(q_name), db.split(g_name)
    try:
        index = find_query(query.images, args.query_img_name)
        path, label, feature = query.images[index], query.labels[index], query.features[index]
        exclude = index if q_name == g_name else None
    except UserError:
        if not Path(args.query_img_name).is_file():
            raise UserError(f"{args.query_img_name} not found in the database's {q_name} split nor as a file")
        model = open_model(db_path, db, parse_gpu_ids(args.gpu_ids))
        path, label, exclude = args.query_img_name, None, None
        cfg = db.config
        transform = build_transform(cfg["method"], False, cfg["data_name"], cfg["crop_type"], cfg.get("image_size"))
        feature = embed_file(model, path, transform, next(model.parameters()).device, ensemble_embed)
    results = search(feature, gallery, db.metric, args.retrieval_num, db.scale, exclude)
    out = save_retrieval(results_dir(args.method) / Path(path).stem, path, label, results, size=(256, 256), width=8)
    for rank, (p, lab, s) in enumerate(results, start=1):
        mark = "" if label is None else (" +" if lab == label else " -")
        print(f"{rank:3d} {s:.4f} {p}{mark}")
    print(f"wrote {out}")
    return results


def get_args_parser(add_help: bool = True, method: str = "reir",
                    default_data_base: str = DEFAULT_DATA_BASE) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"{method.upper()} retrieval demo", add_help=add_help)
    parser.add_argument("--query_img_name", default=DEFAULT_QUERY, type=str,
                        help=f"query image: a database entry or any image file (default: {DEFAULT_QUERY})")
    parser.add_argument("--data_base", default=default_data_base, type=str,
                        help=f"queried database, a path or a name under results/{method}/ "
                             f"(default: {default_data_base})")
    parser.add_argument("--data_type", default="test", choices=["train", "test"],
                        help="retrieval database type (default: test)")
    parser.add_argument("--retrieval_num", default=8, type=int, help="retrieval number (default: 8)")
    parser.add_argument("--gpu_ids", default=None, type=str, help="GPUs for embedding a new image (default: all)")
    parser.set_defaults(method=method)
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
