"""Method-agnostic comparison of two databases, query by query (REIR's ablation metrics, bugs fixed).

For each query both databases rank the same gallery; ``correct`` = same-label items in the top K.
* AR@K: mean precision@K over the queries with at least one hit (REIR's "average recall");
* GE Rate@K: share of queries where the first database is at least as good;
* Better Ratio@K: wins / losses; ``inf`` when there are no losses (the original divided by zero).
The original decided "same set, exclude self" with ``is`` on strings, which was always false; here self is
excluded exactly when query and gallery are the same split.
"""

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from common.database import Database
from common.errors import UserError
from common.outputs import building, flat_name, new_folder, output_folder
from common.render import save_retrieval
from common.runs import open_database, results_dir, run_prefix
from common.search import search

__all__ = ["query_and_gallery", "compare_databases", "compare_runs"]


def query_and_gallery(db: Database, data_type: str) -> Tuple[str, str]:
    """Split names for ``--data_type test`` (the database's query vs gallery) or ``train`` (train vs train)."""
    return ("train", "train") if data_type == "train" else (db.query, db.gallery)


def _check_same(a: Database, b: Database, q: str, g: str) -> None:
    for split in {q, g}:
        sa, sb = a.split(split), b.split(split)
        if sa.images != sb.images or sa.labels != sb.labels:
            raise UserError(
                f"the two databases hold different '{split}' images or labels; "
                "compare runs on the same dataset and crop type"
            )


def compare_databases(
    better: Database,
    worse: Database,
    data_type: str = "test",
    k: int = 8,
    save_dir: Optional[Path] = None,
    size=(224, 224),
) -> Dict[str, float]:
    """AR@K of each database, GE Rate@K and Better Ratio@K; with ``save_dir`` the queries ``better`` wins, one
    folder each, named by the query's path relative to the query images' common folder (``005.x__img.jpg``)."""
    q_name, g_name = query_and_gallery(better, data_type)
    _check_same(better, worse, q_name, g_name)
    query, gallery = better.split(q_name), better.split(g_name)
    same_set = q_name == g_name
    if k > len(gallery.images) - (1 if same_set else 0):
        raise UserError(f"--retrieval_num {k} is larger than the gallery")
    gallery_labels = torch.as_tensor(gallery.labels)
    exclude = torch.arange(len(query.images)) if same_set else None
    found = {
        key: search(db.split(q_name).features, db.split(g_name).features, k, db.metric, db.scale, exclude)
        for key, db in (("better", better), ("worse", worse))
    }
    totals = {"better": [0, 0], "worse": [0, 0]}  # [sum of correct, queries with a hit]
    wins = ties = 0
    drawn = []
    for i in tqdm(range(len(query.images)), desc="comparing", leave=False):
        ranked = {}
        for key in ("better", "worse"):
            score, idx = found[key][0][i], found[key][1][i]
            correct = int((gallery_labels[idx] == query.labels[i]).sum())
            totals[key][0] += correct
            totals[key][1] += correct > 0
            ranked[key] = (idx, score, correct)
        wins += ranked["better"][2] > ranked["worse"][2]
        ties += ranked["better"][2] == ranked["worse"][2]
        if save_dir is not None and ranked["better"][2] > ranked["worse"][2]:
            drawn.append((i, ranked))
    if save_dir is not None:
        _save_examples(Path(save_dir), query, gallery, drawn, size)
    n = len(query.images)
    losses = n - wins - ties
    return {
        f"better_AR@{k}": 100.0 * totals["better"][0] / max(1, totals["better"][1] * k),
        f"worse_AR@{k}": 100.0 * totals["worse"][0] / max(1, totals["worse"][1] * k),
        f"GE_Rate@{k}": 100.0 * (wins + ties) / n,
        f"Better_Ratio@{k}": wins / losses if losses else float("inf"),
        "wins": wins,
        "ties": ties,
        "losses": losses,
    }


def relative_names(paths: Sequence[str]) -> List[str]:
    """Each path relative to the folder all of them share (the full path when they share none)."""
    try:
        base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    except ValueError:  # different drives
        return list(paths)
    return [os.path.relpath(os.path.abspath(p), base) for p in paths]


def _save_examples(save_dir: Path, query, gallery, drawn, size) -> None:
    """Build ``save_dir`` (replacing only an earlier ablation output) with one marked folder per drawn query."""
    names = relative_names(query.images)
    taken: set = set()
    with building(save_dir, "ablation") as tmp:
        for i, ranked in drawn:
            out = new_folder(output_folder(tmp, flat_name(names[i]), "query", taken), "query")
            _save_example(out, query.images[i], query.labels[i], gallery, ranked, size)


def _save_example(out: Path, query_path: str, query_label: int, gallery, ranked, size) -> None:
    for key, width in (("better", 5), ("worse", 8)):
        idx, score, _ = ranked[key]
        results = [(gallery.images[j], gallery.labels[j], float(s)) for j, s in zip(idx.tolist(), score)]
        save_retrieval(out / key, query_path, query_label, results, size=size, width=width)
    (out / "better" / "query_img.jpg").replace(out / "query_img.jpg")
    (out / "worse" / "query_img.jpg").unlink()


def compare_runs(
    better: str,
    worse: str,
    method: str,
    dataset: Callable[[Mapping[str, Any]], Tuple[str, str]],
    data_type: str = "test",
    k: int = 8,
    save_results: bool = False,
    size=(224, 224),
    opener: Optional[Callable[[str], Tuple[Path, Database]]] = None,
) -> Dict[str, float]:
    """The ablation script of every method: two databases of ``method`` (paths or names under
    ``results/<method>/``, opened by ``opener``), refused unless built on the same data (``dataset(config)``: name
    and crop type), compared and printed; ``save_results`` draws the queries ``better`` wins under
    ``results/<method>/<better>----<worse>/``."""
    if k < 1:
        raise UserError(f"--retrieval_num must be positive, got {k}")
    opener = opener or (lambda name: open_database(name, method))
    better_path, better_db = opener(better)
    worse_path, worse_db = opener(worse)
    if dataset(better_db.config) != dataset(worse_db.config):
        raise UserError(
            f"the databases were built on different data: {dataset(better_db.config)} vs {dataset(worse_db.config)}"
        )
    save_dir = None
    if save_results:
        name = f"{run_prefix(better_path)}----{run_prefix(worse_path)}"
        save_dir = output_folder(results_dir(method), name, "ablation")
    result = compare_databases(better_db, worse_db, data_type, k, save_dir, size=size)
    print(
        f"better data base AR@{k}:{result[f'better_AR@{k}']:.2f}% | worse data base AR@{k}:"
        f"{result[f'worse_AR@{k}']:.2f}% | GE Rate@{k}:{result[f'GE_Rate@{k}']:.2f}% | "
        f"Better Ratio@{k}:{result[f'Better_Ratio@{k}']:.2f}"
    )
    if save_dir is not None:
        print(f"wrote the {result['wins']} queries the better database wins to {save_dir}")
    return result
