"""``inference.py --gallery``: embed a collection (a folder, a list file or a CSV) with a run's model into a new
database, optionally with a faiss ANN index beside it. Under torchrun each process embeds a shard of the images
and rank 0 writes."""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from common.collection import embed_items, label_ids, list_items
from common.database import Database, Split, save_database
from common.distributed import is_main_process
from common.errors import UserError
from common.query import embed_fn
from common.runs import (
    SAVED_BY,
    check_database_target,
    database_path,
    load_run,
    model_file_of,
    model_of_database,
    open_run_database,
)
from common.spec import MethodSpec

__all__ = ["GalleryOptions", "gallery_items", "build_gallery_database"]


@dataclass(frozen=True)
class GalleryOptions:
    """What ``inference.py --gallery`` asks for."""

    gallery: str
    save_data_base: Optional[str]
    data_base: str
    model_file: Optional[str]
    index: str  # exact, ivf or hnsw
    batch_size: int
    num_workers: int
    flip: bool
    float64: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GalleryOptions":
        return cls(
            gallery=args.gallery,
            save_data_base=args.save_data_base,
            data_base=args.data_base,
            model_file=args.model_file,
            index=getattr(args, "index", "exact"),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            flip=getattr(args, "flip", False),
            float64=getattr(args, "float64", False),
        )


def gallery_items(source: str, names: Optional[Dict[str, int]] = None) -> List[Tuple[str, int]]:
    """(path, label) pairs of a folder (label -1 = unknown) or a list file (paths, or a CSV with path[,label])."""
    return label_ids(list_items(source), names)


@torch.inference_mode()
def build_gallery_database(spec: MethodSpec, options: GalleryOptions, device: torch.device) -> Tuple[Path, Database]:
    """Embed ``--gallery`` with the run's model into ``--save_data_base``: progress bar, unreadable images skipped,
    counted and listed in ``<database>.errors.log``; the database stores the model's configuration and file."""
    if not options.save_data_base:
        raise UserError("--gallery needs --save_data_base FILE (where the new database is written)")
    check_database_target(
        Path(options.save_data_base), [database_path(options.data_base, spec.name), options.model_file]
    )
    if options.model_file:
        _, config, model, _ = load_run(spec, device, model_file=options.model_file)
        model_file = Path(options.model_file)
    else:
        src_path, src = open_run_database(spec, options.data_base)
        config = src.config
        model, model_file = model_of_database(spec, src_path, src, device), model_file_of(src_path, src)
    if options.float64:
        model = model.double()
    names: Dict[str, int] = {}
    items = gallery_items(options.gallery, names)
    if not items:
        raise UserError(f"--gallery {options.gallery} lists no images")
    features, kept, failed = embed_items(
        model,
        items,
        spec.eval_transform(config),
        device=device,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        embed=embed_fn(spec, options.flip),
        desc="embedding the gallery",
    )
    if not kept:
        raise UserError(f"none of the {len(items)} images of --gallery {options.gallery} could be read")
    target = Path(options.save_data_base)
    log = Path(f"{target}.errors.log")
    split = Split([items[i][0] for i in kept], [items[i][1] for i in kept], features.float())
    stored = {
        **dict(config),
        "model_file": str(model_file.resolve()),
        "gallery_source": str(options.gallery),
        SAVED_BY: "inference.py --gallery",
    }
    stored.update({"label_names": names} if names else {})
    db = Database(stored, spec.name, spec.metric, spec.scale(config), "gallery", "gallery", {"gallery": split})
    if not is_main_process():  # rank 0 writes
        return target, db
    if failed:
        target.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(f"{items[i][0]}\n" for i in sorted(failed)))
    target.parent.mkdir(parents=True, exist_ok=True)
    if options.index != "exact":
        from common.ann import build_index, save_index

        ann = build_index(split.features, "euclidean" if spec.metric == "euclidean" else "cosine", options.index)
        stored["ann_index"] = str(Path(f"{target}.{options.index}.faiss").resolve())
        save_index(ann, stored["ann_index"])
    save_database(
        target,
        config=stored,
        method=spec.name,
        splits={"gallery": split},
        metric=spec.metric,
        scale=spec.scale(config),
        query="gallery",
        gallery="gallery",
    )
    print(
        f"embedded {len(kept)} images into {target}"
        + (f"; skipped {len(failed)} unreadable (listed in {log})" if failed else "")
    )
    return target, db
