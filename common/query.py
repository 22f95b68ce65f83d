"""Answering queries against a database: which image a query names, embedding a new one, ranking the gallery,
and the files of an answer.

A query is a file path when that file exists (a new image, embedded now; the same file as a stored image uses
the stored feature), otherwise a database image named by its stored path (a bare file name only when
unambiguous); a folder queries every image in it. Each query writes ``results/<method>/<query stem>/`` with the
originals' ``query_img.jpg`` + ``retrieval_img_<rank>_<score>.jpg``, ``grid.png``, ``ranking.csv``
(``rank,path,label,score``) and ``index.html``; a folder of queries writes ``results/<method>/<folder name>/<path
relative to the folder, '/' -> '__'>/`` and a summary ``index.html``. Names are made safe and only earlier
outputs of the toolkit are replaced (``common.outputs``).
"""

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from common.cli import add_flag
from common.collection import image_paths
from common.compare import query_and_gallery
from common.data.images import open_image
from common.database import Database, Split, find_query
from common.errors import UserError
from common.outputs import building, flat_name, new_folder, output_folder
from common.postprocess import alpha_query_expansion, flip_embed
from common.render import query_page, save_retrieval, summary_page
from common.runs import model_of_database, results_dir
from common.search import search
from common.spec import MethodSpec

__all__ = [
    "Result",
    "Postprocessing",
    "add_postprocess_flags",
    "embed_fn",
    "embed_file",
    "check_dim",
    "labelled",
    "stored_or_new",
    "write_ranking",
    "answer_query",
    "answer_queries",
]

Result = Tuple[str, int, float]  # (image path, label, score), as common.render draws it


# ---------------------------------------------------------------- post-processing options


@dataclass(frozen=True)
class Postprocessing:
    """fast-reid's evaluation options (TEST.FLIP / QE / RERANK); all off by default."""

    flip: bool = False
    qe_k: int = 0
    qe_alpha: float = 3.0
    dba_k: int = 0
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Postprocessing":
        """The options a script's flags set (a script without some of the flags keeps their defaults)."""
        return cls(**{k: getattr(args, k, v) for k, v in vars(cls()).items()})

    @property
    def reranks(self) -> bool:
        """Whether the ranked lists differ from the plain search (query expansion, DBA or re-ranking)."""
        return bool(self.qe_k or self.dba_k or self.rerank)

    def tag(self) -> str:
        """``flip-dba5-qe5-rerank``: the suffix of a metrics file computed with these options ('' = none)."""
        parts = ["flip"] if self.flip else []
        parts += [f"dba{self.dba_k}"] if self.dba_k else []
        parts += [f"qe{self.qe_k}"] if self.qe_k else []
        parts += ["rerank"] if self.rerank else []
        return "-".join(parts)


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


def embed_fn(spec: MethodSpec, flip: bool) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The method's embedding, or its flip-test version (norm kept, so REIR's scale-E scores stay comparable)."""
    return flip_embed(spec.embed, keep_norm=True) if flip else spec.embed


# ---------------------------------------------------------------- one query


@torch.inference_mode()
def embed_file(
    model: nn.Module,
    path: str,
    transform: Callable[[Any], torch.Tensor],
    device: torch.device,
    embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Float embedding (on CPU) of any image file, so a query need not be in the database.

    ``transform`` must be the method's evaluation transform and ``embed(model, images)`` (as in
    :func:`common.engine.extract_features`) picks the retrieval embedding when ``model(images)`` is not it.
    """
    try:
        image = open_image(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    images = transform(image)[None].to(device, next(model.parameters()).dtype)
    out = embed(model, images) if embed is not None else model(images)
    return out[0].float().cpu()


def check_dim(features: torch.Tensor, gallery: Split) -> None:
    """Query features (Q, d) embedded by the run's model must have the dimension of the database's features."""
    if features.shape[-1] != gallery.features.shape[1]:
        raise UserError(
            f"the model embeds {features.shape[-1]} dimensions, the database's features have "
            f"{gallery.features.shape[1]}: the database was not written by this model"
        )


def labelled(gallery: Split, scores: torch.Tensor, ids: torch.Tensor) -> List[List[Result]]:
    """Each query's results of :func:`common.search.search` on ``gallery`` as (path, label, score), best first, to
    print and render; missing ones (id -1: an excluded item or an ANN index finding fewer) are left out."""
    return [
        [(gallery.images[i], gallery.labels[i], v) for i, v in zip(row_ids, row_scores) if i >= 0]
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist())
    ]


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
    get_model: Callable[[], nn.Module],
    device: torch.device,
    out_dir: Optional[Path] = None,
    post: Optional[Postprocessing] = None,
    title: Optional[str] = None,
) -> Tuple[Path, list]:
    """Rank the gallery for one query and write its files (the originals' files, grid.png, ranking.csv,
    index.html titled ``title``) into the fresh folder ``out_dir``, or by default into
    ``results/<method>/<safe query stem>/``, which replaces only an earlier query output of that name.
    ``get_model()`` is only called for a new image; ``post`` sets flip test and alpha-query expansion."""
    post = post or Postprocessing()
    query, gallery = db.split(q_name), db.split(g_name)
    index = stored_or_new(query.images, name)
    if index >= 0:
        path, label, feature = query.images[index], query.labels[index], query.features[index]
        exclude = index if q_name == g_name else None
    else:
        transform = spec.eval_transform(db.config)
        path, label, exclude = name, None, None
        feature = embed_file(get_model(), name, transform, device, embed_fn(spec, post.flip))
    available = len(gallery.images) - (1 if exclude is not None else 0)
    if not 1 <= k <= available:
        raise UserError(f"--retrieval_num {k} must be between 1 and the {available} gallery images")
    if post.qe_k > 1:  # alpha-QE: the query plus its nearest gallery items, re-normalised
        norm = feature.norm()
        feature = (
            alpha_query_expansion(
                feature[None], gallery.features, k=post.qe_k, alpha=post.qe_alpha, exclude_self=False
            )[0]
            * norm
        )
    check_dim(feature[None], gallery)
    found = search(feature[None], gallery.features, k, db.metric, db.scale, [exclude], _ann_index(db))
    results = labelled(gallery, *found)[0]
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


# ---------------------------------------------------------------- many queries


def answer_queries(
    spec: MethodSpec,
    db_path: Path,
    db: Database,
    device: torch.device,
    source: str,
    k: int,
    data_type: str = "test",
    post: Optional[Postprocessing] = None,
) -> List[Tuple[Path, list]]:
    """Answer ``source`` (one image, or every image below a folder) against ``db``'s query / gallery splits
    (``data_type`` test) or its train split; a folder of queries also gets a summary ``index.html``."""
    q_name, g_name = query_and_gallery(db, data_type)
    cache: Dict[str, nn.Module] = {}

    def get_model() -> nn.Module:
        if "model" not in cache:
            cache["model"] = model_of_database(spec, db_path, db, device)
        return cache["model"]

    queries = image_paths(source)
    folder = Path(source)
    if not folder.is_dir():
        return [answer_query(spec, db, queries[0], k, q_name, g_name, get_model, device, post=post)]
    root = output_folder(results_dir(spec.name), folder.resolve().name, "queries")
    answers, taken = [], set()
    with building(root, "queries") as tmp:
        entries = []
        for q in tqdm(queries, desc="queries", dynamic_ncols=True):
            rel = Path(q).relative_to(folder).as_posix()
            out = new_folder(output_folder(tmp, flat_name(rel), "query", taken), "query")
            _, results = answer_query(spec, db, q, k, q_name, g_name, get_model, device, out, post, title=rel)
            answers.append((root / out.name, results))
            entries.append((out, rel, None))
        summary_page(tmp, entries)
    print(f"saved {len(entries)} queries to {root}; summary page: {root / 'index.html'}")
    return answers
