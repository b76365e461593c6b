"""What a ``--input`` names: files, or a folder of 2D slices read as one volume when its layout says so."""

from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Tuple, Union

from ..errors import ConfigError, describe
from ..io import FORMATS, DatasetError, em_format, em_shape, find_em_files
from ..utils import progress, short_list

__all__ = ["slice_stack", "list_inputs"]

logger = logging.getLogger(__name__)


_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def slice_stack(folder: Union[str, os.PathLike]) -> Tuple[bool, str]:
    """Whether ``folder`` is one volume stored as per-slice 2D images, and why (or why not).

    A slice stack: no sub-folders; at least 2 image files (png/jpg/tif, hidden and non-image
    files aside), all of one format, named by one numbered pattern (``s1.png`` ... ``s120.png``,
    ``0000.tif`` ...: same text around the number, distinct numbers) and all 2D of one shape
    (headers read, no pixels). Anything else (differently shaped 2D images, 3D files, other
    names, sub-folders) is a list of separate images.

    Returns:
        ``(True, "<n> same-shaped 2D slices <first> ... <last>, (Y, X)")`` or ``(False, reason)``.
    """
    folder = os.fspath(folder)
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError as exc:
        return False, f"cannot list it ({exc.strerror or exc})"
    subdirs = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    if subdirs:
        return False, f"it has sub-folders ({short_list(subdirs)})"
    files = [n for n in names if em_format(os.path.join(folder, n)) is not None]
    if len(files) < 2:
        return False, f"it holds {len(files)} image file(s)"
    other = [n for n in files if not FORMATS[em_format(os.path.join(folder, n))].slice_file]
    if other:
        return False, f"it holds 3D formats ({short_list(other)})"
    patterns: Dict[tuple, List[str]] = {}
    numbers: Dict[tuple, str] = {}
    for n in files:
        stem, ext = os.path.splitext(n)
        m = _NUMBERED.match(stem)
        if m is None:
            return False, f"{n} has no slice number in its name"
        key = (m.group(1), m.group(3), ext.lower())
        patterns.setdefault(key, []).append(n)
        if (key, int(m.group(2))) in numbers:
            return False, f"{numbers[(key, int(m.group(2)))]} and {n} have the same slice number"
        numbers[(key, int(m.group(2)))] = n
    if len(patterns) > 1:
        a, b = (v[0] for v in list(patterns.values())[:2])
        return False, f"the names follow {len(patterns)} patterns (e.g. {a}, {b})"
    first_shape = None
    for n in progress(files, f"reading the headers in {folder}"):
        try:
            shape = tuple(em_shape(os.path.join(folder, n)))
        except DatasetError as exc:
            return False, f"cannot read the header of {n} ({describe(exc).split(': ', 1)[-1]})"
        if len(shape) != 2:
            return False, f"{n} is not 2D (shape {shape})"
        if first_shape is None:
            first_shape = shape
        elif shape != first_shape:
            return False, f"the images differ in shape ({files[0]} {first_shape}, {n} {shape})"
    order = sorted(files, key=lambda n: int(_NUMBERED.match(os.path.splitext(n)[0]).group(2)))
    return True, f"{len(files)} same-shaped 2D slices {order[0]} ... {order[-1]}, {first_shape}"


def list_inputs(path: Union[str, os.PathLike], slices_as_volume: Union[bool, str] = "auto") -> List[str]:
    """The inputs that ``path`` names: a file -> itself; a folder -> every EM file below it
    (:func:`custom.io.find_em_files`), or the folder itself as one volume of per-slice images.

    Args:
        path: a file or a folder.
        slices_as_volume: ``"auto"`` (default): a folder that :func:`slice_stack` recognises is one
            volume, any other folder a list of files; ``True``: the folder is one volume; ``False``:
            each file is an input. For a folder, one line says which reading was chosen.

    Raises:
        custom.errors.ConfigError: ``slices_as_volume`` is none of True, False, "auto".
        custom.io.DatasetError: ``path`` is missing or holds no EM file.
    """
    if slices_as_volume not in (True, False, "auto") or isinstance(slices_as_volume, (int, float)) and not isinstance(
        slices_as_volume, bool
    ):
        raise ConfigError(
            f"slices_as_volume: expected True, False or 'auto', got {slices_as_volume!r}; "
            "write --slices_as_volume True, False or auto"
        )
    path = os.fspath(path)
    if not os.path.isdir(path) or em_format(path) != "dir":  # a file, or a store folder (.zarr)
        return find_em_files(path)
    if slices_as_volume is True:
        _say(f"{path}: read as one volume of 2D slices (slices_as_volume True)")
        return [path]
    if slices_as_volume == "auto":
        stack, why = slice_stack(path)
        if stack:
            _say(f"{path}: read as one volume: {why} (--slices_as_volume False to segment each image on its own)")
            return [path]
    files = find_em_files(path)
    if slices_as_volume == "auto":
        _say(f"{path}: read as {len(files)} separate input(s), not one slice volume: {why} "
             "(--slices_as_volume True to force one volume)")
    else:
        _say(f"{path}: read as {len(files)} separate input(s) (slices_as_volume False)")
    return files


def _say(line: str) -> None:
    logger.info("[retina] %s", line)  # like the per-volume progress lines


# --------------------------------------------------------------------------------------
# where results go, and the checks that no user file is lost
# --------------------------------------------------------------------------------------
#: what ``output_ext`` may be (with or without the dot); "" is the input's format
