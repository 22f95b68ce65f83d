"""``test.py`` of every method: re-embed a trained run's evaluation splits and write its metrics.

``test.py --data_base <run>_data_base.pth`` (or ``--model_file <run>_model.pth``) re-embeds the run's evaluation
splits from the images under ``--data_path`` and writes ``results/<method>/<run>_test_metrics.csv`` (the training
CSV's ``test_recall@K`` columns plus ``test_map@r`` and ``test_r_precision``); it never overwrites the training
database (``--save_data_base FILE`` writes a new one). ``--query_img_name`` also renders one query.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import torch
from torch import nn

from common.cli import add_embedding_flags, add_flag, parse_recalls
from common.collection import join_processes
from common.data.datasets import eval_splits, load_splits
from common.database import Database, Split, save_database
from common.distributed import is_main_process
from common.engine import embed_splits
from common.errors import UserError
from common.metrics import metrics_from_ranking, required_topk, retrieval_metrics
from common.postprocess import postprocess_rank
from common.query import Postprocessing, add_postprocess_flags, answer_query, embed_fn
from common.runs import (
    DB_SUFFIX,
    SAVED_BY,
    add_run_flags,
    check_database_target,
    database_path,
    load_run,
    results_dir,
)
from common.spec import MethodSpec

__all__ = ["TestOptions", "test_parser", "evaluation_splits", "test_metrics", "postprocessed_metrics", "run_test"]


@dataclass(frozen=True)
class TestOptions:
    """What ``test.py``'s flags ask for."""

    data_base: Optional[str]
    model_file: Optional[str]
    data_path: str
    recalls: Optional[List[int]]
    batch_size: int
    num_workers: int
    gpu_ids: Optional[str]
    save_data_base: Optional[str]
    float64: bool
    post: Postprocessing
    query_img_name: Optional[str]
    retrieval_num: int
    expected_config: Optional[Dict[str, Any]] = None  # fast-reid's --eval-only: the model-defining keys
    original_args: Any = None  # the flags a method's import_original reads (fast-reid's --eval-only config)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TestOptions":
        return cls(
            data_base=args.data_base,
            model_file=args.model_file,
            data_path=args.data_path,
            recalls=list(args.recalls) if args.recalls else None,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            gpu_ids=getattr(args, "gpu_ids", None),
            save_data_base=args.save_data_base,
            float64=getattr(args, "float64", False),
            post=Postprocessing.from_args(args),
            query_img_name=args.query_img_name,
            retrieval_num=args.retrieval_num,
            expected_config=getattr(args, "expected_config", None),
            original_args=args,
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
    add_embedding_flags(g)
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


def _recalls(options: TestOptions, spec: MethodSpec, config: Dict[str, Any]) -> List[int]:
    if options.recalls:
        return list(options.recalls)
    stored = config.get("recalls") or config.get("rank") or config.get("TEST.RECALLS")
    return list(stored) if isinstance(stored, (list, tuple)) and stored else parse_recalls(spec.default_recalls)


def evaluation_splits(
    spec: MethodSpec, config: Dict[str, Any], model: nn.Module, options: TestOptions, device: torch.device
) -> Tuple[Dict[str, Split], str, str]:
    """Features of the run's query and gallery splits, recomputed from the images."""
    data_name, crop_type = spec.dataset(config)
    query, gallery = eval_splits(data_name, options.data_path)
    transform = spec.eval_transform(config)
    names = list(dict.fromkeys((query, gallery)))
    datasets = load_splits(options.data_path, data_name, crop_type, {n: transform for n in names})
    splits = embed_splits(
        model,
        datasets,
        names,
        embed=embed_fn(spec, options.post.flip),
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        device=device,
    )
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


def postprocessed_metrics(
    splits: Dict[str, Split], query: str, gallery: str, ranks: Sequence[int], post: Postprocessing
) -> Dict[str, float]:
    """Recall@K, MAP@R, R-precision after DBA / alpha-QE / re-ranking, from memory-bounded ranked lists."""
    q, g = splits[query], splits[gallery]
    same = query == gallery
    topk = required_topk(ranks, q.labels, None if same else g.labels)
    indices, _ = postprocess_rank(
        q.features,
        None if same else g.features,
        same_set=same,
        rerank=post.rerank,
        k1=post.k1,
        k2=post.k2,
        lambda_value=post.lambda_value,
        qe_k=post.qe_k,
        qe_alpha=post.qe_alpha,
        dba_k=post.dba_k,
        dba_alpha=post.qe_alpha,
        topk=topk,
    )
    values = metrics_from_ranking(indices, q.labels, None if same else g.labels, ranks)
    return {f"test_{k}": 100.0 * v for k, v in values.items()}


def run_test(spec: MethodSpec, args: argparse.Namespace) -> Dict[str, float]:
    """``test.py``: metrics CSV (+ optional new database and one rendered query). Under torchrun each process
    embeds a shard of every split (gathered by index) and rank 0 evaluates and writes."""
    options = TestOptions.from_args(args)
    device = join_processes(options)
    if options.save_data_base:
        in_use = [options.model_file and Path(options.model_file)]
        if not options.model_file:
            in_use += [database_path(options.data_base, spec.name)]
        check_database_target(Path(options.save_data_base), in_use)
    run, config, model, model_file = load_run(
        spec,
        device,
        model_file=options.model_file,
        data_base=options.data_base,
        expected_config=options.expected_config,
        original_args=options.original_args,
    )
    model = model.double() if options.float64 else model
    splits, query, gallery = evaluation_splits(spec, config, model, options, device)
    if not is_main_process():
        return {}
    ranks, tag = _recalls(options, spec, config), options.post.tag()
    if options.post.reranks:
        test_metrics(splits, query, gallery, ranks)  # the same checks of --recalls against the gallery
        metrics = postprocessed_metrics(splits, query, gallery, ranks, options.post)
    else:
        metrics = test_metrics(splits, query, gallery, ranks)
    print(f"{tag or 'plain'}: " + " | ".join(f"{k[5:]}: {v:.2f}%" for k, v in metrics.items()))
    out = results_dir(spec.name) / f"{run}_test_metrics{'_' + tag if tag else ''}.csv"
    pd.DataFrame([metrics]).to_csv(out, index=False)
    print(f"metrics saved to {out}")
    db = Database(dict(config), spec.name, spec.metric, spec.scale(config), query, gallery, splits)
    if options.save_data_base:
        target = Path(options.save_data_base)
        check_database_target(target, [results_dir(spec.name) / f"{run}{DB_SUFFIX}", options.model_file])
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
    if options.query_img_name:
        answer_query(
            spec,
            db,
            options.query_img_name,
            options.retrieval_num,
            query,
            gallery,
            lambda: model,
            device,
            post=options.post,
        )
    return metrics
