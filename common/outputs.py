"""Output folders of queries: safe names, and replacing only folders this toolkit wrote.

A query's name comes from a user's files (``..jpg``, ``CON.png``, ``cam1/IMG_0001.jpg``), so it never becomes a
path component as it is: :func:`safe_name` makes it one harmless component. Every output folder carries a marker
file (:data:`MARKER`, naming its kind); :func:`replace_folder` removes only a real folder (not a symlink) whose
marker names the same kind, so a name coincidence never deletes a run, an export or a folder of the user's.
Outputs are built in a hidden temporary sibling and renamed into place (:func:`building`): a reader never sees a
half-written folder, and two processes writing the same query both succeed (the last one wins).
"""

import hashlib
import os
import secrets
import shutil
import unicodedata
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Iterator, Optional, Set

from common.errors import UserError

__all__ = ["MARKER", "safe_name", "flat_name", "is_output", "new_folder", "output_folder", "replace_folder", "building"]

MARKER = ".retrieval-output"
_MARKER_TEXT = "written by the image-retrieval toolkit: {kind}\n"
_MAX_BYTES = 120  # well under the 255-byte limit of common file systems, leaving room for a suffix
_FORBIDDEN = set('/\\<>:"|?*') | {chr(c) for c in range(32)} | {chr(127)}
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(10)}


def safe_name(name: str) -> str:
    """One path component for ``name`` that is valid and harmless everywhere.

    Separators, control and Windows-forbidden characters become ``_``; leading dots (``.``, ``..``, hidden names)
    and trailing dots or spaces (dropped by Windows) become ``_``; reserved device names (``CON``, ``nul.txt``)
    get a ``_`` prefix; the empty name is ``_``; a name over 120 UTF-8 bytes is cut and suffixed with a hash of
    the whole name, so two long names stay distinct. Readable names (``IMG_0001``, ``été #2``) pass unchanged."""
    text = "".join("_" if c in _FORBIDDEN else c for c in unicodedata.normalize("NFC", name))
    stripped = text.lstrip(".")
    text = "_" * (len(text) - len(stripped)) + stripped
    core = text.rstrip(". ")
    text = core + "_" * (len(text) - len(core))
    if text.split(".")[0].rstrip(" ").upper() in _RESERVED:
        text = "_" + text
    if len(text.encode("utf-8")) > _MAX_BYTES:
        digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        text = text.encode("utf-8")[: _MAX_BYTES - 11].decode("utf-8", "ignore").rstrip(". ") + "~" + digest
    return text or "_"


def flat_name(relative: str) -> str:
    """A safe folder name for a path relative to a queried folder: ``cam1/IMG_0001.jpg`` -> ``cam1__IMG_0001.jpg``
    (extension kept, so ``IMG_0001.jpg`` and ``IMG_0001.png`` differ)."""
    parts = [p for p in PurePath(relative).parts if p not in ("", ".", "/", "\\")]
    return safe_name("__".join(parts))


def is_output(path: Path, kind: str) -> bool:
    """True only for a real folder (not a symlink) holding this toolkit's marker of ``kind``."""
    path = Path(path)
    marker = path / MARKER
    if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return marker.read_text(encoding="utf-8") == _MARKER_TEXT.format(kind=kind)
    except (OSError, UnicodeDecodeError):
        return False


def new_folder(path: Path, kind: str) -> Path:
    """Create the folder ``path`` (which must not exist) with its marker."""
    path = Path(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text(_MARKER_TEXT.format(kind=kind), encoding="utf-8")
    return path


def output_folder(root: Path, name: str, kind: str, taken: Optional[Set[str]] = None) -> Path:
    """``root/<safe name>``, free for an output of ``kind``: absent, or a folder of that kind this toolkit wrote.

    Anything else under that name (a run's files, a symlink, the user's folder, another kind of output) is left
    alone and ``~2``, ``~3``, ... is appended instead. ``taken`` collects the names already used in this run
    (compared case-insensitively, as on Windows and macOS)."""
    taken = set() if taken is None else taken
    base = safe_name(name)
    for i in range(1, 10_000):
        candidate = base if i == 1 else f"{base}~{i}"
        path = Path(root) / candidate
        if candidate.casefold() in taken:
            continue
        if not os.path.lexists(path) or is_output(path, kind):
            taken.add(candidate.casefold())
            return path
    raise UserError(f"no free output folder name for {name!r} under {root}")


def replace_folder(built: Path, target: Path, kind: str, attempts: int = 100) -> Path:
    """Rename the finished folder ``built`` to ``target``, moving an older output of ``kind`` there aside first
    and removing it. A ``target`` that is not such an output is never touched (one-line error instead)."""
    built, target = Path(built), Path(target)
    for _ in range(attempts):
        if os.path.lexists(target):
            if not is_output(target, kind):
                raise UserError(f"{target} is not a folder this toolkit wrote; left as it is (new output in {built})")
            old = _fresh_sibling(target, "old")
            try:
                os.rename(target, old)
            except FileNotFoundError:  # another process moved it first
                continue
            if is_output(old, kind):
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(built, target)
            return target
        except OSError:  # another process put its folder there meanwhile: replace that one
            continue
    raise UserError(f"could not move {built} to {target}: it keeps being replaced")


def _fresh_sibling(target: Path, tag: str) -> Path:
    """An unused hidden name beside ``target`` (``.<name>.<random>.<tag>``); created by the caller, with the
    umask's permissions (not ``mkdtemp``'s owner-only ones), so outputs can be shared like any other folder."""
    while True:
        path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.{tag}")
        if not os.path.lexists(path):
            return path


@contextmanager
def building(target: Path, kind: str) -> Iterator[Path]:
    """A fresh marked temporary sibling of ``target`` to write into; renamed to ``target`` on success, removed on
    failure."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(target, "tmp")
    try:
        new_folder(tmp, kind)
        yield tmp
        replace_folder(tmp, target, kind)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
