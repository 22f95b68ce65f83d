"""Compare two IRT databases query by query (e.g. IRT_R vs IRT_L): AR@K, GE Rate@K and Better Ratio@K.

The metrics are common.compare's (REIR's ablation, its bugs fixed); both databases must hold the same images.
With ``--save-results`` the queries the first model wins are rendered side by side under results/irt/ablation/.
"""
import argparse
from pathlib import Path

import pandas as pd

from common.compare import compare_databases
from common.database import load_database
from common.errors import UserError, run_cli
from common.runio import results_dir


def main(args):
    if args.retrieval_num < 1:
        raise UserError("--retrieval-num must be positive")
    better, worse = load_database(args.better_db), load_database(args.worse_db)
    name = f"{Path(args.better_db).stem}_vs_{Path(args.worse_db).stem}"
    out = results_dir("irt") / "ablation"
    save_dir = out / name if args.save_results else None
    metrics = compare_databases(better, worse, args.data_type, args.retrieval_num, save_dir)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([metrics]).to_csv(out / f"{name}.csv", index=False)
    print(" ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))
    print(f"wrote {out / (name + '.csv')}" + (f" and examples in {save_dir}" if save_dir else ""))
    return metrics


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("IRT ablation: compare two databases", add_help=add_help)
    p.add_argument("--better-db", "--better_data_base", dest="better_db", required=True,
                   help="database of the model expected to be better (results/irt/<run>_data_base.pth)")
    p.add_argument("--worse-db", "--worse_data_base", dest="worse_db", required=True,
                   help="database of the baseline model")
    p.add_argument("--data-type", "--data_type", dest="data_type", default="test", choices=["test"],
                   help="split compared: the databases' query vs gallery (default: test)")
    p.add_argument("--retrieval-num", "--retrieval_num", dest="retrieval_num", default=8, type=int,
                   help="K of the metrics (default: 8)")
    p.add_argument("--save-results", action="store_true", help="render the queries the better model wins")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
