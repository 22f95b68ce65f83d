"""``inference.py`` of every method: answer queries against a database (``common.query``), embed a collection
into a new database (``--gallery``, :mod:`common.scripts.gallery`), or grow and shrink a database in place
(``--add`` / ``--remove``, :mod:`common.catalogue`)."""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from common.catalogue import add_catalogue_flags, run_update
from common.cli import add_embedding_flags, add_flag
from common.collection import join_processes
from common.device import script_device
from common.distributed import is_main_process
from common.errors import UserError
from common.query import Postprocessing, add_postprocess_flags, answer_queries
from common.runs import open_run_database
from common.scripts.gallery import GalleryOptions, build_gallery_database
from common.spec import MethodSpec

__all__ = ["InferenceOptions", "inference_parser", "run_inference"]


@dataclass(frozen=True)
class InferenceOptions:
    """What ``inference.py``'s flags ask for."""

    query_img_name: Optional[str]
    data_base: str
    data_type: str
    retrieval_num: int
    gpu_ids: Optional[str]
    post: Postprocessing
    gallery: Optional[str]
    add: Optional[str]
    remove: Optional[str]
    index: str
    batch_size: int
    num_workers: int
    float64: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "InferenceOptions":
        return cls(
            query_img_name=args.query_img_name,
            data_base=args.data_base,
            data_type=args.data_type,
            retrieval_num=args.retrieval_num,
            gpu_ids=args.gpu_ids,
            post=Postprocessing.from_args(args),
            gallery=args.gallery,
            add=getattr(args, "add", None),
            remove=getattr(args, "remove", None),
            index=args.index,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            float64=getattr(args, "float64", False),
        )


def inference_parser(spec: MethodSpec, add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of every method's ``inference.py`` (CGD/REIR names; hyphenated aliases)."""
    parser = argparse.ArgumentParser(
        description=f"{spec.display} retrieval: rank a database's gallery for a query "
        "image (new file or database image) or a folder of them",
        add_help=add_help,
    )
    add_flag(
        parser,
        "query_img_name",
        default=None,
        type=str,
        help="an image file (embedded now), a database image (its stored path or unique file name), or a folder",
    )
    add_flag(
        parser,
        "data_base",
        default=spec.default_data_base,
        type=str,
        help=f"queried database, a path or a name under results/{spec.name}/ (default: {spec.default_data_base})",
    )
    add_flag(
        parser,
        "data_type",
        default="test",
        choices=["test", "train"],
        help="search the database's query/gallery splits (test) or its train split (default: test)",
    )
    add_flag(parser, "retrieval_num", default=8, type=int, help="results per query (default: 8)")
    add_flag(
        parser, "gpu_ids", default=None, type=str, help="GPU for embedding new images (default: first; CPU if none)"
    )
    add_postprocess_flags(parser, rerank=False)
    g = parser.add_argument_group("searching your own collection")
    add_flag(
        g,
        "gallery",
        default=None,
        type=str,
        help="embed a collection into a new database: a folder (recursive) or a list file (one path per line, "
        "or a CSV with a 'path' and an optional 'label' column); needs --save_data_base",
    )
    add_flag(g, "save_data_base", default=None, type=str, help="where --gallery's database is written")
    add_flag(
        g,
        "index",
        default="exact",
        choices=["exact", "ivf", "hnsw"],
        help="with --gallery: also build a faiss ANN index beside the database (its Recall@10 against the exact "
        "search is measured and printed), used by later queries; for collections beyond ~1M images (default: exact)",
    )
    g.add_argument(
        "--model_file",
        "--model-file",
        dest="model_file",
        default=None,
        type=str,
        help="the model that embeds --gallery (default: the <run>_model.pth beside --data_base)",
    )
    add_embedding_flags(g, " for --gallery")
    add_catalogue_flags(parser)
    return parser


def run_inference(spec: MethodSpec, args: argparse.Namespace) -> List[Tuple[Path, list]]:
    """``inference.py``: update ``--data_base`` in place with ``--add`` / ``--remove``, or embed ``--gallery`` into a
    new database, then answer any query: one folder of results per query (a folder of queries also gets a summary
    ``index.html``)."""
    options = InferenceOptions.from_args(args)
    if options.add or options.remove:
        if options.gallery:
            raise UserError("--gallery writes a new database; --add / --remove change --data_base: give one of them")
        device = join_processes(options)  # under torchrun: one shard of the images per process
        db_path, db = run_update(
            spec,
            options.data_base,
            device,
            add=options.add,
            remove=options.remove,
            index=options.index,
            batch_size=options.batch_size,
            num_workers=options.num_workers,
            float64=options.float64,
            flip=options.post.flip,
        )
        if not options.query_img_name or not is_main_process():
            return []
    elif options.gallery:
        device = join_processes(options)  # under torchrun: one shard of the images per process
        db_path, db = build_gallery_database(spec, GalleryOptions.from_args(args), device)
        if not options.query_img_name or not is_main_process():
            return []
    else:
        device = script_device(options)
        if not options.query_img_name:
            raise UserError(
                "give --query_img_name (a query image or folder), --gallery to embed a collection, or --add / --remove"
            )
        db_path, db = open_run_database(spec, options.data_base)
    return answer_queries(
        spec, db_path, db, device, options.query_img_name, options.retrieval_num, options.data_type, options.post
    )
