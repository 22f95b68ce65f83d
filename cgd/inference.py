"""Retrieve the nearest gallery images of one query with a trained CGD model.

The query is either an image of the database's query split (its stored feature is used and it is excluded from
its own results) or ANY other image file, which is embedded with ``<run>_model.pth`` saved next to the database.
Writes query_img.jpg, retrieval_img_<rank>_<Euclidean distance>.jpg and grid.png into results/cgd/<query stem>/
and prints the ranked list.

    python cgd/inference.py --query_img_name data/car/car_ims/008055.jpg --retrieval_num 10
"""
import argparse
import os
from pathlib import Path
from typing import List, Tuple

from cgd.model import embed
from cgd.retrieval import open_model, rank_and_render, requested_config
from cgd.test import get_args_parser as test_parser
from common.database import find_query
from common.device import main_device, parse_gpu_ids
from common.errors import UserError, run_cli
from common.presets import build_transform
from common.retrieval import embed_file, open_database


def stored_query(images: List[str], name: str) -> int:
    """Index of the query in the database, or -1 for an image file that is not in it."""
    if Path(name).is_file():  # an existing file: in the database only if it is the same file
        target = os.path.realpath(name)
        return next((i for i, p in enumerate(images) if os.path.realpath(p) == target), -1)
    try:
        return find_query(images, name)
    except UserError:
        raise UserError(f"{name} is neither an image file nor an image of the database")


def main(args: argparse.Namespace) -> List[Tuple[str, int, float]]:
    db_path, db = open_database(args.data_base, "cgd", requested_config(args))
    query = db.split(db.query)
    i = stored_query(query.images, args.query_img_name)
    if i >= 0:
        exclude = i if db.query == db.gallery else None
        _, results = rank_and_render(db, query.images[i], query.labels[i], query.features[i],
                                     args.retrieval_num, exclude=exclude)
        return results
    device = main_device(parse_gpu_ids(args.gpu_ids))
    model = open_model(db_path, db, device)
    cfg = db.config
    transform = build_transform("cgd", False, cfg["data_name"], cfg["crop_type"], cfg.get("image_size"))
    feature = embed_file(model, args.query_img_name, transform, device, embed)
    _, results = rank_and_render(db, args.query_img_name, None, feature, args.retrieval_num)
    return results


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description="CGD retrieval for one query image (database image or new file)",
                                   add_help=add_help, parents=[test_parser(add_help=False)])


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
