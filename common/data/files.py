"""Files of a dataset folder: annotation text read as UTF-8, and writes that stay inside ``<data_path>/<name>/``.

Everything data preparation writes goes through :func:`write_inside`: a link in the dataset folder that leads out
of it is refused before anything is written, never followed, and every file is replaced atomically.
"""

import functools
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence

from common.errors import UserError

__all__ = [
    "read_text_file",
    "OutsideDataset",
    "make_dirs_inside",
    "write_inside",
    "write_text_inside",
    "dataset_root",
    "refuse_links_out",
]


def read_text_file(path: os.PathLike, what: str = "file") -> str:
    """The text of an annotation, CSV or list file, which must be UTF-8 (a leading byte-order mark is dropped);
    anything else is one line naming the file, the line and the byte."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{what} {path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8; the file must be UTF-8 text "
            f"(re-save it as UTF-8)"
        ) from None


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    """The process umask (read once, on the first write: reading it means setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutsideDataset(ValueError):
    """A write whose path leads out of the dataset folder (through a symbolic link)."""


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (all links followed) to ``root`` (a resolved folder) or below it."""
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def _leaving(root: Path, folder: Path) -> Optional[Path]:
    """The first existing component of ``folder`` (below ``root``) that resolves outside ``root``, else None."""
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        if not os.path.lexists(current):
            return None
        if not _inside(current, root):
            return current
    return None


def make_dirs_inside(root: Path, folder: Path) -> None:
    """``mkdir -p folder`` that never creates or enters anything outside ``root``: the existing components are
    checked first (a symbolic link out of ``root`` raises :class:`OutsideDataset`)."""
    link = _leaving(root, folder)
    if link is not None:
        raise OutsideDataset(f"{link} is a link to {link.resolve()}, outside {root}")
    folder.mkdir(parents=True, exist_ok=True)


def write_inside(root: Path, path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` (below ``root``, the resolved dataset folder) atomically: ``write(file)`` fills a new temp
    file in the checked folder, which then replaces ``path`` (a link there is replaced, never followed). The file
    gets the usual permissions (0666 minus the umask)."""
    make_dirs_inside(root, path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def write_text_inside(path: Path, text: str) -> None:
    """An index or log file of the dataset folder ``path.parent``, written atomically inside it."""
    root = path.parent.resolve()
    write_inside(root, root / path.name, lambda f: f.write(text.encode("utf-8")))


def dataset_root(data_path: os.PathLike, name: str) -> Path:
    """``<data_path>/<name>`` resolved: the one folder data preparation writes into (the folder itself may be a
    link, e.g. to another disk; links inside it may not lead out)."""
    return (Path(data_path) / name).resolve()


def refuse_links_out(root: Path, targets: Sequence[Path], name: str) -> None:
    """One ``error:`` line, before anything is written, when a folder that crops go into leads out of ``root``
    (e.g. ``cropped/`` or ``cropped/images/`` unpacked as a link); otherwise nothing."""
    for folder in dict.fromkeys(t.parent for t in targets):
        link = _leaving(root, folder)
        if link is not None:
            raise UserError(
                f"{name}: {link} is a link to {link.resolve()}, outside the dataset folder {root}; crops are "
                f"written only inside it: replace the link by a folder"
            )
