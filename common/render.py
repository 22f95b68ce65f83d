"""Rendering a ranked retrieval: the originals' per-image files plus one grid PNG to see it at a glance."""
import shutil
from pathlib import Path
from typing import Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from common.datasets import open_image

__all__ = ["GREEN", "RED", "BLUE", "framed", "save_retrieval", "retrieval_grid"]

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


def save_retrieval(out_dir: Path, query_path: str, query_label: Optional[int], results: Sequence[Result],
                   size: Tuple[int, int] = (224, 224), width: int = 8, clean: bool = True) -> Path:
    """Write ``query_img.jpg`` and ``retrieval_img_<rank>_<score>.jpg`` (originals' names) and ``grid.png``.

    ``query_label=None`` is a query of unknown label (a new image file): same files, but no frames, since
    whether a result is correct is unknown."""
    out_dir = Path(out_dir)
    if clean and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    framed(query_path, size).save(out_dir / "query_img.jpg")
    for rank, (path, label, score) in enumerate(results, start=1):
        framed(path, size, _color(label, query_label), width).save(out_dir / f"retrieval_img_{rank}_{score:.4f}.jpg")
    retrieval_grid(query_path, query_label, results).save(out_dir / "grid.png")
    return out_dir


def retrieval_grid(query_path: str, query_label: Optional[int], results: Sequence[Result], cell: int = 160,
                   width: int = 6) -> Image.Image:
    """Query (blue frame) then the K results in one row, each captioned with its rank and score; unframed when
    ``query_label`` is None."""
    pad, caption = 8, 18
    grid = Image.new("RGB", ((len(results) + 1) * (cell + pad) + pad, cell + 2 * pad + caption), "white")
    draw = ImageDraw.Draw(grid)
    tiles = [(framed(query_path, (cell, cell), None if query_label is None else BLUE, width), "query")]
    tiles += [(framed(p, (cell, cell), _color(lab, query_label), width), f"#{r} {s:.4f}")
              for r, (p, lab, s) in enumerate(results, start=1)]
    for i, (tile, text) in enumerate(tiles):
        x = pad + i * (cell + pad)
        grid.paste(tile, (x, pad))
        draw.text((x + 4, pad + cell + 3), text, fill="black")
    return grid
