"""Small helpers every part of ``custom`` uses, each written once: atomic writes, file stems,
natural sort order, the names of slice planes, paths inside a folder, command-line values and
short lists in messages. Imports nothing from ``custom``."""

from __future__ import annotations

import ast
import errno
import os
import re
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, TypeVar, Union

__all__ = [
    "COMPOUND_SUFFIXES", "PLANES", "PLANE_AXIS", "atomic_path", "class_name", "file_stem", "is_within", "literal_value", "natural_key",
    "plane_list", "progress", "short_list", "temp_name",
]

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

#: the slice planes of a (Z, Y, X) volume
PLANES = ("xy", "xz", "yz")
#: plane -> the volume axis its slice index runs along
PLANE_AXIS = {"xy": 0, "xz": 1, "yz": 2}
#: suffixes of two parts that :func:`file_stem` drops whole
COMPOUND_SUFFIXES = (".nii.gz", ".ome.tif", ".ome.tiff", ".ome.zarr")


def temp_name(path: PathLike, prefix: str = ".tmp") -> Path:
    """A hidden unique name next to ``path`` that keeps its suffixes: ``<dir>/.tmp-1a2b3c4d-<name>``."""
    path = Path(path)
    return path.with_name(f"{prefix}-{uuid.uuid4().hex[:8]}-{path.name}")


def _move_no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` onto ``path`` unless ``path`` exists, atomically where the file system has hard
    links (``link`` fails on an existing name, so two writers cannot both win)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
    except OSError:  # no hard links here (FAT, some network file systems): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "already exists", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_path(path: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary name next to ``path`` (:func:`temp_name`) and move it onto ``path`` when
    the block succeeds, so a reader (or a killed writer) never leaves a half-written file under ``path``.

    Args:
        path: the file to write (its folder is created).
        replace: an existing ``path`` is replaced; False: never, ``FileExistsError`` (``filename`` =
            ``path``) before the block when it exists, and again at the final move when it appeared meanwhile.
    """
    path = Path(path)
    if not replace and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "already exists", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if replace:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def class_name(index: int, names: Any = None, fallback: str = "class_{}") -> str:
    """The name of class ``index`` in ``names``: a mapping with int or str keys (a config's ``label_names``,
    ``{"0": "background", ...}``) or a sequence by index; ``fallback.format(index)`` when it has none."""
    if isinstance(names, Mapping):
        for key in (index, str(index)):
            if key in names:
                return str(names[key])
    elif names is not None and 0 <= index < len(names):
        return str(names[index])
    return fallback.format(index)


def file_stem(path: PathLike) -> str:
    """A file's name without its suffix: ``a/vol.nii.gz`` -> ``vol`` (:data:`COMPOUND_SUFFIXES` whole),
    ``a/s12.png`` -> ``s12``; a trailing separator is ignored."""
    name = os.path.basename(os.fspath(path).rstrip("/\\"))
    low = name.lower()
    for ext in COMPOUND_SUFFIXES:
        if low.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def is_within(path: PathLike, folder: PathLike) -> bool:
    """True when ``path`` is ``folder`` or lies below it, links resolved (``os.path.realpath`` of both), so
    ``folder/../elsewhere`` and a link out of ``folder`` are outside. A plain string prefix test would
    take ``/data/configs-old`` to lie within ``/data/configs``; the separator check does not."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def literal_value(text: str) -> Any:
    """A command-line value read as a Python literal where it is one (``"3"`` -> ``3``, ``"[1, 2]"`` ->
    ``[1, 2]``, ``"False"`` -> ``False``), else the text itself (``"abc"``, ``"false"``), as
    ``python -m monai.bundle run`` (fire) reads ``--key value``. Never evaluates code (``ast.literal_eval``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def short_list(names: Sequence[str], limit: int = 3) -> str:
    """The first ``limit`` of ``names`` for a one-line message: ``"a, b, c and 2 more"``."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def natural_key(text: str) -> list:
    """Sort key putting ``s2.png`` before ``s10.png`` (digit runs compare as numbers, the rest case-blind)."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", text)]


def plane_list(planes: Union[str, Sequence[str]]) -> List[str]:
    """``"xy"`` -> ``["xy"]``; ``"orthoplane"`` (or ``"all"``) -> ``["xy", "xz", "yz"]``; a list of plane
    names as is. Raises ``ValueError`` for anything else (and for an empty list)."""
    if isinstance(planes, str):
        planes = list(PLANES) if planes in ("orthoplane", "all") else [planes]
    out = list(planes)
    bad = [p for p in out if p not in PLANE_AXIS]
    if bad or not out:
        raise ValueError(f"planes must be 'xy', 'xz', 'yz', 'orthoplane' or a list of those, got {planes!r}")
    return out


def progress(items: Iterable[T], desc: str, total: Optional[int] = None) -> Iterable[T]:
    """``items`` with a tqdm progress bar on stderr, for long loops that are not Ignite engines (those
    log per iteration); silent when stderr is not a terminal (logs, CI, MONAI Label), gone when done."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, disable=None, leave=False, dynamic_ncols=True)
