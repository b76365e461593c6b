"""How ``custom.io`` reports a problem with a file.

Every problem a user can cause with a file raises :class:`custom.errors.DatasetError` with a one-line message
``"<path>: <problem>"``, never a raw traceback of tifffile, PIL, h5py, nibabel, pynrrd, mrcfile or ITK.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Union

from ..errors import DatasetError  # the one error hierarchy of custom (kind "dataset")

__all__ = ["DatasetError"]

PathLike = Union[str, os.PathLike]

#: the package's logger: ``logging.getLogger("custom.io").setLevel(...)`` quietens every module of it
logger = logging.getLogger(__package__)

_warned: set[tuple[str, str]] = set()
_warn_lock = threading.Lock()


def one_line(text: str, limit: int = 240) -> str:
    """``text`` on one line (runs of white space collapsed), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dataset_error(path: PathLike, problem: str, limit: int = 240) -> DatasetError:
    """``DatasetError("<path>: <problem>")``, the problem on one line."""
    return DatasetError(f"{os.fspath(path)}: {one_line(problem, limit)}")


def exc_text(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"`` of a library exception."""
    msg = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {msg}"


def short_list(names: list[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def warn_once(path: PathLike, message: str) -> None:
    """Log ``"<path>: <message>"`` as a warning, once per path and message in this process."""
    tag = (os.fspath(path), message)
    with _warn_lock:
        if tag in _warned:
            return
        _warned.add(tag)
    logger.warning("%s: %s", os.fspath(path), message)
