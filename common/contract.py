"""``test.py``, ``inference.py`` and ``ablation.py`` of every method, written once on a :class:`MethodSpec`.

The contract (README "One contract for all five methods"):

* ``test.py --data_base <run>_data_base.pth`` (or ``--model_file <run>_model.pth``) re-embeds the run's evaluation
  splits from the images under ``--data_path`` and writes ``results/<method>/<run>_test_metrics.csv`` (the training
  CSV's ``test_recall@K`` columns plus ``test_map@r`` and ``test_r_precision``); it never overwrites the training
  database (``--save_data_base FILE`` writes a new one). ``--query_img_name`` also renders one query.
* ``inference.py --query_img_name Q --data_base DB``: Q is a file path when that file exists (a new image, embedded
  now; the same file as a stored image uses the stored feature), otherwise a database image named by its stored
  path (a bare file name only when unambiguous); a folder queries every image in it. Each query writes
  ``results/<method>/<query stem>/`` with the originals' ``query_img.jpg`` + ``retrieval_img_<rank>_<score>.jpg``,
  ``grid.png``, ``ranking.csv`` (``rank,path,label,score``) and ``index.html``; a folder of queries writes
  ``results/<method>/<folder name>/<path relative to the folder, '/' -> '__'>/`` and a summary ``index.html``.
  Names are made safe and only earlier outputs of the toolkit are replaced (``common.outputs``).
* ``ablation.py --better_data_base A --worse_data_base B`` compares two databases query by query.
"""

import argparse
import csv
import io
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from common.cli import default_workers, parse_recalls
from common.compare import compare_runs, query_and_gallery
from common.database import Database, Split, find_query, save_database
from common.datasets import eval_splits, load_splits, open_image
from common.device import main_device, parse_gpu_ids
from common.distributed import is_main_process
from common.engine import embed_dataset
from common.errors import UserError
from common.metrics import retrieval_metrics
from common.outputs import building, flat_name, new_folder, output_folder, safe_name
from common.postprocess import alpha_query_expansion, flip_embed, metrics_from_ranking, postprocess_rank, required_topk
from common.preprocess import read_text_file
from common.render import query_page, save_retrieval, summary_page
from common.retrieval import DB_SUFFIX, database_path, embed_file, model_path, open_database, run_prefix, search
from common.runio import load_model_file, results_dir, safe_load
from common.spec import MethodSpec

__all__ = [
    "script",
    "add_flag",
    "load_for_test",
    "load_run",
    "test_parser",
    "run_test",
    "inference_parser",
    "run_inference",
    "ablation_parser",
    "run_ablation",
    "open_run_model",
    "stored_or_new",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def add_flag(group, name: str, **kwargs) -> None:
    """``--name_with_underscores`` with the hyphenated spelling as an alias (IRT's and fast-reid's style)."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    group.add_argument(*names, dest=name, **kwargs)


def script(
    parser: Callable[..., argparse.ArgumentParser],
    body: Callable[[MethodSpec, argparse.Namespace], Any],
    spec: MethodSpec,
    *parser_args: Any,
) -> Tuple[Callable[..., argparse.ArgumentParser], Callable]:
    """``(get_args_parser, main)`` of a method's thin script: a shared parser and body bound to its spec."""

    def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
        return parser(spec, *parser_args, add_help=add_help)

    def main(args: argparse.Namespace) -> Any:
        return body(spec, args)

    return get_args_parser, main


# ---------------------------------------------------------------- loading a run


def open_spec_database(spec: MethodSpec, name: str) -> Tuple[Path, Database]:
    """This toolkit's database of ``spec``'s method, or the original project's (``spec.original_database``)."""
    path = database_path(name, spec.name)
    if spec.original_database is not None and path.is_file() and not _is_toolkit_file(path):
        return path, spec.original_database(path)
    return open_database(name, spec.name)


def open_run_model(spec: MethodSpec, path: Path, expected: Dict[str, Any], device: torch.device) -> nn.Module:
    """A trained ``<run>_model.pth`` in eval mode, refused in one line if its model-defining configuration differs
    from ``expected`` (the database's)."""
    keys = [k for k in spec.model_keys if k in expected]
    model = load_model_file(path, expected, keys, lambda state: spec.build_model(state["config"]), "model")
    return model.to(device).eval()


def load_for_test(
    spec: MethodSpec, args: argparse.Namespace, device: torch.device
) -> Tuple[str, Dict[str, Any], nn.Module]:
    """(run name, configuration, model) from ``--model_file`` or from the model file next to ``--data_base``.

    ``--model_file`` may also be a file of the original project (no stored configuration): the method's
    ``import_original(path, args)`` then rebuilds configuration and model from the file name or flags.
    ``args.expected_config`` (set by fast-reid's ``--eval-only``) must match the file's model-defining keys."""
    run, config, model, _ = load_run(spec, args, device)
    return run, config, model


def load_run(
    spec: MethodSpec, args: argparse.Namespace, device: torch.device
) -> Tuple[str, Dict[str, Any], nn.Module, Path]:
    """``load_for_test`` plus the model file it read, which a database embedded with the model records."""
    if args.model_file:
        path = Path(args.model_file)
        run = path.name[: -len("_model.pth")] if path.name.endswith("_model.pth") else path.stem
        if spec.import_original is not None and not _is_toolkit_file(path):
            config, model = spec.import_original(path, args)
            return run, config, model.to(device).eval(), path
        config = safe_load(path, "model")["config"]
        if config.get("method", spec.name) != spec.name:
            raise UserError(f"model {path} was trained by {config.get('method')!r}, not by {spec.display}")
        expected = getattr(args, "expected_config", None) or spec.model_config(config)
        return run, config, open_run_model(spec, path, expected, device), path
    db_path, db = open_spec_database(spec, args.data_base)
    return run_prefix(db_path), db.config, _model_beside(spec, db_path, db, device), _model_file(db_path, db)


def _model_file(db_path: Path, db: Database) -> Path:
    """The model a database was embedded with: its recorded ``model_file`` (databases written by test.py
    ``--save_data_base`` and inference.py ``--gallery``), else ``<run>_model.pth`` beside it."""
    stored = db.config.get("model_file")
    path = Path(stored) if stored else model_path(db_path)
    if stored and not path.is_file():
        raise UserError(f"database {db_path} was embedded with {path}, which no longer exists")
    return path


def _model_beside(spec: MethodSpec, db_path: Path, db: Database, device: torch.device) -> nn.Module:
    """The database's model (``_model_file``), checked against the database's configuration. A file of the original
    project is read by ``spec.import_original`` with the database's configuration as ``args.stored_config``
    (what was recovered from the file when the database was written)."""
    path = _model_file(db_path, db)
    if spec.import_original is not None and not _is_toolkit_file(path):
        config, model = spec.import_original(path, argparse.Namespace(stored_config=dict(db.config)))
        mismatch = {
            k: (config.get(k), db.config.get(k))
            for k in spec.model_keys
            if k in db.config and k != "num_classes" and config.get(k) != db.config.get(k)
        }
        if mismatch:
            raise UserError(f"model {path} does not match database {db_path}: {mismatch}")
        return model.to(device).eval()
    return open_run_model(spec, path, spec.model_config(db.config), device)


def _is_toolkit_file(path: Path, what: str = "model") -> bool:
    """True for a file this toolkit wrote (a dict with a stored ``config``); originals' files have none.

    Only peeks: a memory-mapped load reads the pickled structure, not the tensors, so the file is read once, by the
    loader that follows (a 2 GB database is not loaded twice). Files that cannot be mapped (the legacy format) or
    read at all count as foreign; the original-file readers then report them in one line."""
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")
    return _peek(path) is not None


def _peek(path: Path) -> Optional[Dict[str, Any]]:
    """The memory-mapped top-level dict of a file this toolkit wrote (tensors not read), else None."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) or unreadable: not this toolkit's
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None


SAVED_BY = "saved_by"  # config key of a database written by --gallery / test.py --save_data_base (replaceable)
_RUN_FILES = ("_model.pth", "_checkpoint.pth")


def check_database_target(target: Path, in_use: Sequence[Optional[Path]]) -> None:
    """Refuse a ``--save_data_base`` that would overwrite a run: the database or model in use, any run's model or
    checkpoint name, a run's training database (its model or checkpoint beside it), or any existing file that is
    not a database written earlier by ``--gallery`` / ``--save_data_base``."""
    target = Path(target)
    real = target.resolve()
    if any(real == Path(p).resolve() for p in in_use if p):
        raise UserError(f"--save_data_base {target} is the database or model in use; choose a new file name")
    for name in (target.name, real.name):
        if name.endswith(_RUN_FILES):
            raise UserError(f"--save_data_base {target} is named like a run's model or checkpoint; choose a new name")
    if not os.path.lexists(target) or (target.is_symlink() and not real.exists()):
        return
    if not real.is_file():
        raise UserError(f"--save_data_base {target} exists and is not a file")
    if real.name.endswith(DB_SUFFIX):
        run = real.name[: -len(DB_SUFFIX)]
        if any((real.parent / f"{run}{suffix}").exists() for suffix in _RUN_FILES):
            raise UserError(f"--save_data_base {target} is the training database of run {run}; choose a new name")
    obj = _peek(real)
    if obj is None or "splits" not in obj:
        raise UserError(f"--save_data_base {target} exists and is no database of this toolkit; not overwritten")
    if SAVED_BY not in obj["config"] and "gallery_source" not in obj["config"]:
        raise UserError(
            f"--save_data_base {target} is a database that --gallery / --save_data_base did not write (a run's?); "
            "not overwritten"
        )


def _device(args: argparse.Namespace) -> torch.device:
    return main_device(parse_gpu_ids(getattr(args, "gpu_ids", None))[:1])


# ---------------------------------------------------------------- post-processing options


def add_postprocess_flags(parser: argparse.ArgumentParser, rerank: bool) -> None:
    """fast-reid's evaluation options: flip test, alpha-query expansion, database-side augmentation and (test.py)
    k-reciprocal re-ranking, with fast-reid's defaults."""
    g = parser.add_argument_group("post-processing (fast-reid TEST.FLIP / QE / RERANK; all off by default)")
    add_flag(g, "flip", action="store_true", help="embed every image and its mirror, average, re-normalise")
    add_flag(
        g,
        "qe_k",
        default=0,
        type=int,
        help="alpha-query expansion with the k nearest (query included; 0 = off; fast-reid: 5)",
    )
    add_flag(g, "qe_alpha", default=3.0, type=float, help="alpha of alpha-QE / DBA weights sim^alpha (default: 3)")
    add_flag(g, "dba_k", default=0, type=int, help="database-side augmentation with the k nearest (0 = off)")
    if rerank:
        add_flag(g, "rerank", action="store_true", help="k-reciprocal re-ranking (Zhong et al. 2017)")
        add_flag(g, "k1", default=20, type=int, help="re-ranking k1 (default: 20)")
        add_flag(g, "k2", default=6, type=int, help="re-ranking k2 (default: 6)")
        add_flag(g, "lambda_value", default=0.3, type=float, help="re-ranking lambda (default: 0.3)")


def _embed_fn(spec: MethodSpec, args: argparse.Namespace):
    """The method's embedding, or its flip-test version (norm kept, so REIR's scale-E scores stay comparable)."""
    if not getattr(args, "flip", False):
        return spec.embed
    return flip_embed(spec.embed, keep_norm=True)


def _postprocess_tag(args: argparse.Namespace) -> str:
    parts = ["flip"] if getattr(args, "flip", False) else []
    parts += [f"dba{args.dba_k}"] if getattr(args, "dba_k", 0) else []
    parts += [f"qe{args.qe_k}"] if getattr(args, "qe_k", 0) else []
    parts += ["rerank"] if getattr(args, "rerank", False) else []
    return "-".join(parts)


def postprocessed_metrics(
    splits: Dict[str, Split], query: str, gallery: str, ranks: Sequence[int], args: argparse.Namespace
) -> Dict[str, float]:
    """Recall@K, MAP@R, R-precision after DBA / alpha-QE / re-ranking, from memory-bounded ranked lists."""
    q, g = splits[query], splits[gallery]
    same = query == gallery
    topk = required_topk(ranks, q.labels, None if same else g.labels)
    indices, _ = postprocess_rank(
        q.features,
        None if same else g.features,
        same_set=same,
        rerank=getattr(args, "rerank", False),
        k1=getattr(args, "k1", 20),
        k2=getattr(args, "k2", 6),
        lambda_value=getattr(args, "lambda_value", 0.3),
        qe_k=args.qe_k,
        qe_alpha=args.qe_alpha,
        dba_k=args.dba_k,
        dba_alpha=args.qe_alpha,
        topk=topk,
    )
    values = metrics_from_ranking(indices, q.labels, None if same else g.labels, ranks)
    return {f"test_{k}": 100.0 * v for k, v in values.items()}


# ---------------------------------------------------------------- test.py


def add_run_flags(parser: argparse.ArgumentParser, spec: MethodSpec, verb: str) -> None:
    """``--data_base`` / ``--model_file``: which trained run a script works on (test.py, export.py)."""
    g = parser.add_argument_group("run")
    add_flag(
        g,
        "data_base",
        default=spec.default_data_base,
        type=str,
        help=f"the run's database, a path or a name under results/{spec.name}/; its model is the "
        f"<run>_model.pth beside it (default: {spec.default_data_base})",
    )
    g.add_argument(
        "--model_file",
        "--model-file",
        "--checkpoint",
        dest="model_file",
        default=None,
        type=str,
        help=f"a <run>_model.pth to {verb} instead of --data_base's model (or an original project's file)",
    )


def test_parser(spec: MethodSpec, add_help: bool = True) -> argparse.ArgumentParser:
    """The flags of every method's ``test.py`` (originals' underscore names, hyphenated aliases)."""
    parser = argparse.ArgumentParser(
        description=f"Test a trained {spec.display} run: Recall@K, MAP@R, R-precision on its evaluation splits",
        add_help=add_help,
    )
    add_run_flags(parser, spec, "test")
    g = parser.add_argument_group("data and evaluation")
    add_flag(g, "data_path", default="data", type=str, help="root of the processed datasets (default: data)")
    add_flag(
        g,
        "recalls",
        default=None,
        type=parse_recalls,
        help="ranks K, comma separated (default: the run's own, else " + spec.default_recalls + ")",
    )
    add_flag(g, "batch_size", default=64, type=int, help="images per forward pass (default: 64)")
    add_flag(
        g,
        "num_workers",
        default=default_workers(4),
        type=int,
        help=f"DataLoader workers (default: min(4, cores) = {default_workers(4)})",
    )
    add_flag(
        g, "gpu_ids", default=None, type=str, help="GPU to embed on, e.g. '0' (default: first visible; CPU if none)"
    )
    add_flag(
        g,
        "save_data_base",
        default=None,
        type=str,
        help="also write the recomputed features as a new database FILE (the training database is never overwritten)",
    )
    add_flag(g, "float64", action="store_true", help="embed in float64 (N torchrun processes then match one)")
    add_postprocess_flags(parser, rerank=True)
    g = parser.add_argument_group("rendering one query (CGD's original test.py)")
    add_flag(g, "query_img_name", default=None, type=str, help="render this query (a file or a database image)")
    add_flag(g, "retrieval_num", default=8, type=int, help="results rendered (default: 8)")
    return parser


def _recalls(args: argparse.Namespace, spec: MethodSpec, config: Dict[str, Any]) -> List[int]:
    if args.recalls:
        return list(args.recalls)
    stored = config.get("recalls") or config.get("rank") or config.get("TEST.RECALLS")
    return list(stored) if isinstance(stored, (list, tuple)) and stored else parse_recalls(spec.default_recalls)


def evaluation_splits(
    spec: MethodSpec, config: Dict[str, Any], model: nn.Module, args: argparse.Namespace, device: torch.device
) -> Tuple[Dict[str, Split], str, str]:
    """Features of the run's query and gallery splits, recomputed from the images."""
    data_name, crop_type = spec.dataset(config)
    query, gallery = eval_splits(data_name, args.data_path)
    transform = spec.eval_transform(config)
    names = list(dict.fromkeys((query, gallery)))
    datasets = load_splits(args.data_path, data_name, crop_type, {n: transform for n in names})
    splits = {}
    for name, dataset in datasets.items():
        features = embed_dataset(
            model,
            dataset,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            embed=_embed_fn(spec, args),
            desc=f"{name} features",
        )
        splits[name] = Split(dataset.images, dataset.labels, features)
    return splits, query, gallery


def test_metrics(splits: Dict[str, Split], query: str, gallery: str, ranks: Sequence[int]) -> Dict[str, float]:
    """``test_recall@K``, ``test_map@r``, ``test_r_precision`` in % (self excluded by index on one split)."""
    q, g = splits[query], splits[gallery]
    available = len(g.images) - (1 if query == gallery else 0)
    if max(ranks) > available:
        raise UserError(f"--recalls {max(ranks)} is larger than the gallery ({available} images to rank)")
    if query == gallery:
        values = retrieval_metrics(q.features, q.labels, ranks)
    else:
        values = retrieval_metrics(q.features, q.labels, ranks, g.features, g.labels)
    return {f"test_{k}": 100.0 * v for k, v in values.items()}


def run_test(spec: MethodSpec, args: argparse.Namespace) -> Dict[str, float]:
    """``test.py``: metrics CSV (+ optional new database and one rendered query). Under torchrun each process
    embeds a shard of every split (gathered by index) and rank 0 evaluates and writes."""
    from common.catalogue import join_processes

    device = join_processes(args)
    if args.save_data_base:
        in_use = [args.model_file and Path(args.model_file)]
        if not args.model_file:
            in_use += [database_path(args.data_base, spec.name)]
        check_database_target(Path(args.save_data_base), in_use)
    run, config, model, model_file = load_run(spec, args, device)
    model = model.double() if getattr(args, "float64", False) else model
    splits, query, gallery = evaluation_splits(spec, config, model, args, device)
    if not is_main_process():
        return {}
    ranks, tag = _recalls(args, spec, config), _postprocess_tag(args)
    if getattr(args, "qe_k", 0) or getattr(args, "dba_k", 0) or getattr(args, "rerank", False):
        test_metrics(splits, query, gallery, ranks)  # the same checks of --recalls against the gallery
        metrics = postprocessed_metrics(splits, query, gallery, ranks, args)
    else:
        metrics = test_metrics(splits, query, gallery, ranks)
    print(f"{tag or 'plain'}: " + " | ".join(f"{k[5:]}: {v:.2f}%" for k, v in metrics.items()))
    out = results_dir(spec.name) / f"{run}_test_metrics{'_' + tag if tag else ''}.csv"
    pd.DataFrame([metrics]).to_csv(out, index=False)
    print(f"metrics saved to {out}")
    db = Database(dict(config), spec.name, spec.metric, spec.scale(config), query, gallery, splits)
    if args.save_data_base:
        target = Path(args.save_data_base)
        check_database_target(target, [results_dir(spec.name) / f"{run}{DB_SUFFIX}", args.model_file])
        save_database(
            target,
            # new-image queries embed with the model file recorded here
            config={**config, "model_file": str(model_file.resolve()), SAVED_BY: "test.py --save_data_base"},
            method=spec.name,
            splits=splits,
            metric=spec.metric,
            scale=db.scale,
            query=query,
            gallery=gallery,
        )
        print(f"database saved to {target}")
    if args.query_img_name:
        answer_query(
            spec, db, args.query_img_name, args.retrieval_num, query, gallery, lambda: model, device, options=args
        )
    return metrics


# ---------------------------------------------------------------- inference.py


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
    add_flag(g, "batch_size", default=64, type=int, help="images per forward pass for --gallery (default: 64)")
    add_flag(
        g,
        "num_workers",
        default=default_workers(4),
        type=int,
        help=f"DataLoader workers for --gallery (default: min(4, cores) = {default_workers(4)})",
    )
    from common.catalogue import add_catalogue_flags

    add_catalogue_flags(parser)
    return parser


def stored_or_new(images: Sequence[str], name: str) -> int:
    """Index of the query among the stored images, or -1 for a new image file.

    An existing file is stored only if it IS a stored file (same real path): a new file that merely shares a
    stored image's name gets its own embedding. A name that is no file must be a stored image."""
    if Path(name).is_file():
        target = Path(name).resolve()
        return next((i for i, p in enumerate(images) if Path(p).resolve() == target), -1)
    try:
        return find_query(images, name)
    except UserError as e:
        raise UserError(f"{name} is neither an image file nor an image of the database ({e})") from None


def _queries(name: str) -> List[str]:
    """One query, or every image below a folder (sorted, recursive)."""
    path = Path(name)
    if not path.is_dir():
        return [name]
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return files


def write_ranking(out_dir: Path, results: Sequence[Tuple[str, Optional[int], float]]) -> Path:
    """``ranking.csv``: rank, path, label (empty when unknown), score (distance for euclidean, else similarity)."""
    path = Path(out_dir) / "ranking.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "path", "label", "score"])
        for rank, (p, label, score) in enumerate(results, start=1):
            writer.writerow([rank, p, "" if label is None else label, f"{score:.6f}"])
    return path


def answer_query(
    spec: MethodSpec,
    db: Database,
    name: str,
    k: int,
    q_name: str,
    g_name: str,
    get_model,
    device: torch.device,
    out_dir: Optional[Path] = None,
    options: Optional[argparse.Namespace] = None,
    title: Optional[str] = None,
) -> Tuple[Path, list]:
    """Rank the gallery for one query and write its files (the originals' files, grid.png, ranking.csv,
    index.html titled ``title``) into the fresh folder ``out_dir``, or by default into
    ``results/<method>/<safe query stem>/``, which replaces only an earlier query output of that name.
    ``get_model()`` is only called for a new image."""
    query, gallery = db.split(q_name), db.split(g_name)
    index = stored_or_new(query.images, name)
    if index >= 0:
        path, label, feature = query.images[index], query.labels[index], query.features[index]
        exclude = index if q_name == g_name else None
    else:
        transform = spec.eval_transform(db.config)
        path, label, exclude = name, None, None
        feature = embed_file(get_model(), name, transform, device, _embed_fn(spec, options))
    available = len(gallery.images) - (1 if exclude is not None else 0)
    if not 1 <= k <= available:
        raise UserError(f"--retrieval_num {k} must be between 1 and the {available} gallery images")
    options = options or argparse.Namespace()
    if getattr(options, "qe_k", 0) > 1:  # alpha-QE: the query plus its nearest gallery items, re-normalised
        norm = feature.norm()
        feature = (
            alpha_query_expansion(
                feature[None], gallery.features, k=options.qe_k, alpha=options.qe_alpha, exclude_self=False
            )[0]
            * norm
        )
    results = search(feature, gallery, db.metric, k, db.scale, exclude, _ann_index(db))
    if out_dir is not None:
        out = _write_query(spec, Path(out_dir), path, label, results, db.metric, title)
    else:
        out = output_folder(results_dir(spec.name), Path(path).stem, "query")
        with building(out, "query") as tmp:
            _write_query(spec, tmp, path, label, results, db.metric, title)
    known = "unknown" if label is None else label
    print(f"query {path} (label {known}): {k} best of {len(gallery.images)} gallery images by {db.metric}")
    for rank, (p, lab, score) in enumerate(results, start=1):
        mark = "" if label is None else ("  correct" if lab == label else "  wrong")
        shown = lab if lab is not None and lab >= 0 else "?"
        print(f"{rank:3d}. {score:.4f}  label {shown}  {p}{mark}")
    if out_dir is None:
        print(f"saved to {out}")
    return out, results


def _write_query(
    spec: MethodSpec, out: Path, path: str, label: Optional[int], results: list, metric: str, title: Optional[str]
) -> Path:
    save_retrieval(out, path, label, results, size=spec.render_size, width=spec.frame_width)
    write_ranking(out, results)
    query_page(out, path, label, results, metric, title)
    return out


_ANN_CACHE: Dict[str, Any] = {}


def _ann_index(db: Database):
    """The ANN index built with the database (``--gallery --index ivf|hnsw``), or None for exact search."""
    path = db.config.get("ann_index")
    if not path:
        return None
    if not Path(path).is_file():
        raise UserError(f"the database's ANN index {path} is missing; rebuild it or use the exact search")
    if path not in _ANN_CACHE:
        from common.ann import load_index

        _ANN_CACHE[path] = load_index(path)
    return _ANN_CACHE[path]


def run_inference(spec: MethodSpec, args: argparse.Namespace) -> List[Tuple[Path, list]]:
    """``inference.py``: optionally embed ``--gallery`` into a new database, then one folder of results per query
    (a folder of queries also gets a summary ``index.html``)."""
    if getattr(args, "gallery", None) or getattr(args, "add", None) or getattr(args, "remove", None):
        from common.catalogue import join_processes, run_update

        if args.gallery and (args.add or args.remove):
            raise UserError("--gallery writes a new database; --add / --remove change --data_base: give one of them")
        device = join_processes(args)  # under torchrun: one shard of the images per process
        build = build_gallery_database if args.gallery else run_update
        db_path, db = build(spec, args, device)
        if not args.query_img_name or not is_main_process():
            return []
    else:
        device = _device(args)
        if not args.query_img_name:
            raise UserError(
                "give --query_img_name (a query image or folder), --gallery to embed a collection, or --add / --remove"
            )
        db_path, db = open_spec_database(spec, args.data_base)
    q_name, g_name = query_and_gallery(db, args.data_type)
    cache: Dict[str, nn.Module] = {}

    def get_model() -> nn.Module:
        if "model" not in cache:
            cache["model"] = _model_beside(spec, db_path, db, device)
        return cache["model"]

    queries = _queries(args.query_img_name)
    folder = Path(args.query_img_name)
    if not folder.is_dir():
        return [answer_query(spec, db, queries[0], args.retrieval_num, q_name, g_name, get_model, device, options=args)]
    root = output_folder(results_dir(spec.name), folder.resolve().name, "queries")
    answers, taken = [], set()
    with building(root, "queries") as tmp:
        entries = []
        for q in tqdm(queries, desc="queries", dynamic_ncols=True):
            rel = Path(q).relative_to(folder).as_posix()
            out = new_folder(output_folder(tmp, flat_name(rel), "query", taken), "query")
            _, results = answer_query(
                spec, db, q, args.retrieval_num, q_name, g_name, get_model, device, out, args, title=rel
            )
            answers.append((root / out.name, results))
            entries.append((out, rel, None))
        summary_page(tmp, entries)
    print(f"saved {len(entries)} queries to {root}; summary page: {root / 'index.html'}")
    return answers


def _gallery_items(source: str, names: Optional[Dict[str, int]] = None) -> List[Tuple[str, int]]:
    """(path, label) pairs of a folder (label -1 = unknown) or a list file (paths, or a CSV with path[,label])."""
    return label_ids(_listed_items(source), names)


def _listed_items(source: str) -> List[Tuple[str, Optional[str]]]:
    """(path, label name or None) of an image file, a folder (recursive) or a list file (paths, or a CSV with a
    'path' and an optional 'label' column)."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [(str(path), None)]
    if path.is_dir():
        return [(p, None) for p in _queries(str(path))]
    if not path.is_file():
        raise UserError(f"{source}: no such folder or list file")
    text = read_text_file(path, "list file")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and "path" in [c.strip() for c in lines[0].split(",")]:
        frame = pd.read_csv(io.StringIO(text))
        labels = [str(x) for x in frame["label"]] if "label" in frame.columns else [None] * len(frame)
        return list(zip([str(p) for p in frame["path"]], labels))
    return [(line, None) for line in lines]


def label_ids(
    items: Sequence[Tuple[str, Optional[str]]], names: Optional[Dict[str, int]] = None, first_id: int = 0
) -> List[Tuple[str, int]]:
    """(path, label id): no label is -1; integer labels are their own ids unless ``names`` already holds names;
    other labels get ids by sorted name, continuing ``names`` (name -> id, extended in place, new ids from
    ``first_id`` on) so that a database keeps one id per name across additions."""
    given = sorted({x for _, x in items if x is not None}, key=lambda x: (not x.lstrip("-").isdigit(), x))
    if not names and all(x.lstrip("-").isdigit() for x in given):
        return [(p, -1 if x is None else int(x)) for p, x in items]
    names = {} if names is None else names
    for x in given:
        if x not in names:
            names[x] = max(first_id, max(names.values(), default=-1) + 1)
    return [(p, -1 if x is None else names[x]) for p, x in items]


class _Images(torch.utils.data.Dataset):
    """Images of a collection; an unreadable file yields None and is skipped by the collate function."""

    def __init__(self, items: Sequence[Tuple[str, int]], transform):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return self.transform(open_image(self.items[i][0])), i
        except (OSError, ValueError, SyntaxError):
            return None, i


def _collate(batch):
    good = [(x, i) for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), bad


@torch.inference_mode()
def build_gallery_database(spec: MethodSpec, args: argparse.Namespace, device: torch.device) -> Tuple[Path, Database]:
    """Embed ``--gallery`` with the run's model into ``--save_data_base``: progress bar, unreadable images skipped,
    counted and listed in ``<database>.errors.log``; the database stores the model's configuration and file."""
    if not args.save_data_base:
        raise UserError("--gallery needs --save_data_base FILE (where the new database is written)")
    check_database_target(Path(args.save_data_base), [database_path(args.data_base, spec.name), args.model_file])
    if args.model_file:
        run, config, model = load_for_test(spec, argparse.Namespace(model_file=args.model_file), device)
        model_file = Path(args.model_file)
    else:
        src_path, src = open_spec_database(spec, args.data_base)
        config, model, model_file = src.config, _model_beside(spec, src_path, src, device), _model_file(src_path, src)
    if getattr(args, "float64", False):
        model = model.double()
    names: Dict[str, int] = {}
    items = _gallery_items(args.gallery, names)
    if not items:
        raise UserError(f"--gallery {args.gallery} lists no images")
    from common.catalogue import embed_items  # sharded over torchrun ranks, gathered by index

    features, kept, failed = embed_items(
        model,
        items,
        spec.eval_transform(config),
        device=device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        embed=_embed_fn(spec, args),
        desc="embedding the gallery",
    )
    if not kept:
        raise UserError(f"none of the {len(items)} images of --gallery {args.gallery} could be read")
    target = Path(args.save_data_base)
    log = Path(f"{target}.errors.log")
    split = Split([items[i][0] for i in kept], [items[i][1] for i in kept], features.float())
    stored = {
        **dict(config),
        "model_file": str(model_file.resolve()),
        "gallery_source": str(args.gallery),
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
    if getattr(args, "index", "exact") != "exact":
        from common.ann import build_index, save_index

        ann = build_index(split.features, "euclidean" if spec.metric == "euclidean" else "cosine", args.index)
        stored["ann_index"] = str(Path(f"{target}.{args.index}.faiss").resolve())
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


# ---------------------------------------------------------------- ablation.py


def ablation_parser(
    spec: MethodSpec, better: str = "", worse: str = "", add_help: bool = True
) -> argparse.ArgumentParser:
    """The flags of every method's ``ablation.py`` (REIR's names; IRT's ``--better-db`` / ``--worse-db`` too)."""
    parser = argparse.ArgumentParser(
        description=f"Compare two {spec.display} databases query by query", add_help=add_help
    )
    parser.add_argument(
        "--better_data_base",
        "--better-data-base",
        "--better-db",
        dest="better_data_base",
        default=better or None,
        required=not better,
        type=str,
        help=f"the database expected to be better (path or name under results/{spec.name}/)",
    )
    parser.add_argument(
        "--worse_data_base",
        "--worse-data-base",
        "--worse-db",
        dest="worse_data_base",
        default=worse or None,
        required=not worse,
        type=str,
        help="the database it is compared with",
    )
    add_flag(
        parser,
        "data_type",
        default="test",
        choices=["test", "train"],
        help="compare on the query/gallery splits (test) or the train split (default: test)",
    )
    add_flag(parser, "retrieval_num", default=8, type=int, help="K of the top-K lists (default: 8)")
    add_flag(parser, "save_results", action="store_true", help="render every query the better database wins")
    return parser


def run_ablation(spec: MethodSpec, args: argparse.Namespace) -> Dict[str, float]:
    """``ablation.py``: AR@K, GE Rate@K, Better Ratio@K printed and saved as ``<better>----<worse>_ablation.csv``."""
    result = compare_runs(
        args.better_data_base,
        args.worse_data_base,
        spec.name,
        spec.dataset,
        args.data_type,
        args.retrieval_num,
        args.save_results,
        size=spec.render_size,
        opener=lambda name: open_spec_database(spec, name),
    )
    name = f"{run_prefix(Path(args.better_data_base))}----{run_prefix(Path(args.worse_data_base))}"
    out = results_dir(spec.name) / safe_name(f"{name}_ablation.csv")
    pd.DataFrame([result]).to_csv(out, index=False)
    print(f"saved {out}")
    return result
