"""``ablation.py`` of every method: compare two databases query by query (REIR's AR@K, GE Rate@K, Better
Ratio@K), saved as ``results/<method>/<better>----<worse>_ablation.csv``."""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pandas as pd

from common.cli import add_flag
from common.compare import compare_runs
from common.outputs import safe_name
from common.runs import open_run_database, results_dir, run_prefix
from common.spec import MethodSpec

__all__ = ["AblationOptions", "ablation_parser", "run_ablation"]


@dataclass(frozen=True)
class AblationOptions:
    """What ``ablation.py``'s flags ask for."""

    better_data_base: str
    worse_data_base: str
    data_type: str
    retrieval_num: int
    save_results: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AblationOptions":
        return cls(
            better_data_base=args.better_data_base,
            worse_data_base=args.worse_data_base,
            data_type=args.data_type,
            retrieval_num=args.retrieval_num,
            save_results=args.save_results,
        )


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
    options = AblationOptions.from_args(args)
    result = compare_runs(
        options.better_data_base,
        options.worse_data_base,
        spec.name,
        spec.dataset,
        options.data_type,
        options.retrieval_num,
        options.save_results,
        size=spec.render_size,
        opener=lambda name: open_run_database(spec, name),
    )
    name = f"{run_prefix(Path(options.better_data_base))}----{run_prefix(Path(options.worse_data_base))}"
    out = results_dir(spec.name) / safe_name(f"{name}_ablation.csv")
    pd.DataFrame([result]).to_csv(out, index=False)
    print(f"saved {out}")
    return result
