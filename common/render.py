"""Rendering a ranked retrieval: the originals' per-image files plus one grid PNG to see it at a glance."""

import html
from pathlib import Path
from typing import Optional, Sequence, Tuple
from urllib.parse import quote

from PIL import Image, ImageDraw

from common.data.images import open_image

__all__ = [
    "GREEN",
    "RED",
    "BLUE",
    "framed",
    "result_file",
    "save_retrieval",
    "retrieval_grid",
    "query_page",
    "summary_page",
]

GREEN, RED, BLUE = (0, 255, 0), (255, 0, 0), (0, 0, 255)
Result = Tuple[str, int, float]  # (image path, label, score)


def _color(label: int, query_label: Optional[int]):
    """Green for a result of the query's label, red otherwise; no frame when the query's label is unknown."""
    return None if query_label is None else (GREEN if label == query_label else RED)


def framed(path: str, size: Tuple[int, int], color=None, width: int = 8) -> Image.Image:
    """The image resized to ``size`` with a ``width``-px outline (green = same label, red = different)."""
    img = open_image(path).resize(size, Image.BILINEAR)
    if color is not None:
        ImageDraw.Draw(img).rectangle((0, 0, size[0] - 1, size[1] - 1), outline=color, width=width)
    return img


def result_file(rank: int, score: float) -> str:
    """The originals' name of a rendered result: ``retrieval_img_<rank>_<score>.jpg``."""
    return f"retrieval_img_{rank}_{score:.4f}.jpg"


def save_retrieval(
    out_dir: Path,
    query_path: str,
    query_label: Optional[int],
    results: Sequence[Result],
    size: Tuple[int, int] = (224, 224),
    width: int = 8,
) -> Path:
    """Write ``query_img.jpg`` and ``retrieval_img_<rank>_<score>.jpg`` (originals' names) and ``grid.png``.

    ``query_label=None`` is a query of unknown label (a new image file): same files, but no frames, since
    whether a result is correct is unknown. Nothing is deleted: callers write into a fresh folder
    (``common.outputs.building``), which replaces the previous output as a whole."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    framed(query_path, size).save(out_dir / "query_img.jpg")
    for rank, (path, label, score) in enumerate(results, start=1):
        framed(path, size, _color(label, query_label), width).save(out_dir / result_file(rank, score))
    retrieval_grid(query_path, query_label, results).save(out_dir / "grid.png")
    return out_dir


def retrieval_grid(
    query_path: str, query_label: Optional[int], results: Sequence[Result], cell: int = 160, width: int = 6
) -> Image.Image:
    """Query (blue frame) then the K results in one row, each captioned with its rank and score; unframed when
    ``query_label`` is None."""
    pad, caption = 8, 18
    grid = Image.new("RGB", ((len(results) + 1) * (cell + pad) + pad, cell + 2 * pad + caption), "white")
    draw = ImageDraw.Draw(grid)
    tiles = [(framed(query_path, (cell, cell), None if query_label is None else BLUE, width), "query")]
    tiles += [
        (framed(p, (cell, cell), _color(lab, query_label), width), f"#{r} {s:.4f}")
        for r, (p, lab, s) in enumerate(results, start=1)
    ]
    for i, (tile, text) in enumerate(tiles):
        x = pad + i * (cell + pad)
        grid.paste(tile, (x, pad))
        draw.text((x + 4, pad + cell + 3), text, fill="black")
    return grid


def _known(label: Optional[int]) -> bool:
    return label is not None and int(label) >= 0


def query_page(
    out_dir: Path,
    query_path: str,
    query_label: Optional[int],
    results: Sequence[Result],
    metric: str,
    title: Optional[str] = None,
) -> Path:
    """``index.html`` beside the rendered files: the query (``title``, default its file name), then the top-K
    thumbnails with rank and score, green / red frames when both labels are known. Only relative links and file
    names (no folder of the user's machine), UTF-8, so the folder can be zipped and shared."""
    out_dir = Path(out_dir)
    title = html.escape(title or Path(query_path).name)
    cells = []
    for rank, (path, label, score) in enumerate(results, start=1):
        colour = "" if not (_known(query_label) and _known(label)) else ("#0a0" if label == query_label else "#d00")
        style = f"border:6px solid {colour}" if colour else "border:6px solid transparent"
        cells.append(
            f'<figure><img src="{html.escape(quote(result_file(rank, score)))}" style="{style}" width="160">'
            f"<figcaption>#{rank} {score:.4f}<br>{html.escape(Path(path).name)}"
            f"{'' if not _known(label) else f' (label {label})'}</figcaption></figure>"
        )
    order = "smaller is closer" if metric == "euclidean" else "larger is closer"
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px;text-align:center}"
        "figcaption{font-size:12px;max-width:170px;word-wrap:break-word}</style>"
        f"<h2>Query {title}"
        f"{'' if not _known(query_label) else f' (label {query_label})'}</h2>"
        f'<figure><img src="query_img.jpg" style="border:6px solid #00f" width="160">'
        f"<figcaption>query</figcaption></figure><h3>Top {len(cells)} ({metric}: {order})</h3>"
        + "".join(cells)
        + '<p><a href="ranking.csv">ranking.csv</a></p>'
    )
    target = out_dir / "index.html"
    target.write_text(page, encoding="utf-8")
    return target


def summary_page(folder: Path, entries: Sequence[Tuple[Path, str, Optional[bool]]]) -> Path:
    """``index.html`` linking every query's page: (its folder, query name, top-1 correct or None if unknown).

    Links are relative and URL-encoded (folder names may hold ``#``, ``?``, ``%``, spaces, any script)."""
    folder = Path(folder)
    rows = []
    for out, name, correct in entries:
        rel = quote(Path(out).relative_to(folder).as_posix())
        mark = "" if correct is None else ("&#10003;" if correct else "&#10007;")
        rows.append(
            f'<tr><td><a href="{html.escape(rel)}/index.html"><img src="{html.escape(rel)}/grid.png" '
            f'height="90"></a></td><td><a href="{html.escape(rel)}/index.html">{html.escape(name)}</a>'
            f"</td><td>{mark}</td></tr>"
        )
    known = [c for _, _, c in entries if c is not None]
    score = f"<p>top-1 correct: {sum(known)} of {len(known)}</p>" if known else ""
    page = (
        "<!doctype html><meta charset='utf-8'><title>Queries</title><style>body{font-family:sans-serif}"
        "td{padding:4px}</style>"
        f"<h2>{len(entries)} queries</h2>{score}<table>" + "".join(rows) + "</table>"
    )
    target = folder / "index.html"
    target.write_text(page, encoding="utf-8")
    return target
