"""Writing EM images and volumes (:func:`write_em`): the format from the suffix (the registry of
:mod:`custom.io.formats`), every file through a temporary name renamed into place
(:func:`custom.utils.atomic_path`), a folder of slices through a temporary folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_numpy

from ..utils import atomic_path, temp_name
from .errors import DatasetError, PathLike, dataset_error, exc_text
from .formats import (
    FORMATS,
    Format,
    em_format,
    is_hidden,
    is_slice_file,
    native,
    voxel_of,
)

__all__ = ["slice_folder_problem", "write_em"]


def _exists_error(path: PathLike) -> DatasetError:
    return dataset_error(path, "already exists; not replaced (overwrite is off)")


def _refuse_existing(path: PathLike, overwrite: bool | None) -> None:
    """Raise when ``path`` exists and ``overwrite`` is False."""
    if overwrite is False and os.path.lexists(path):
        raise _exists_error(path)


def slice_folder_problem(folder: PathLike) -> str | None:
    """Why the existing folder ``folder`` may not be replaced by a folder of slices (None: it may).

    Only a folder holding nothing but 2D image files (png/jpg/tif, hidden files aside) is
    replaceable: a folder with sub-folders or other files is somebody's data, never deleted."""
    try:
        names = [n for n in os.listdir(folder) if not is_hidden(n)]
    except OSError as exc:
        return f"cannot list folder ({exc_text(exc)})"
    for n in names:
        p = os.path.join(folder, n)
        if os.path.isdir(p):
            return f"holds a sub-folder ({n}), not only image slices"
        if not is_slice_file(n):
            return f"holds {n}, not only image slices"
    return None


def _write_folder(out: Path, arr: np.ndarray, pattern: str, compression: str | None, overwrite: bool | None) -> None:
    """One 2D file per z slice, written into a hidden sibling folder renamed onto ``out`` at the end,
    so a killed writer never leaves a partial folder that reads back as a shorter volume. An
    existing ``out`` is replaced (unless ``overwrite`` is False) only when it holds nothing but
    image slices (:func:`slice_folder_problem`); it is renamed away first and deleted last."""
    _refuse_existing(out, overwrite)
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise dataset_error(out, "exists and is not a folder; not replaced by a folder of slices")
        problem = slice_folder_problem(out)
        if problem is not None:
            raise dataset_error(out, f"exists and {problem}; not replaced (choose another output name)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    tmp.mkdir()
    try:
        for z, sl in enumerate(arr if arr.ndim == 3 else arr[None]):
            write_em(tmp / pattern.format(z), sl, compression=compression)
        replace_folder(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: Path, out: Path, overwrite: bool | None) -> None:
    """Rename the finished folder ``tmp`` onto ``out``; an existing ``out`` (unless ``overwrite`` is False)
    is renamed away first and deleted only once ``tmp`` is in its place."""
    if os.path.lexists(out):
        if overwrite is False:
            raise _exists_error(out)
        old = temp_name(out, ".old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)  # fails on a non-empty folder that appeared meanwhile: nothing is lost


def store_problem(path: PathLike) -> str | None:
    """Why the existing ``path`` may not be replaced by a zarr store (None: it is a zarr store)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return "exists and is not a zarr folder"
    if not any(os.path.exists(os.path.join(path, n)) for n in ("zarr.json", ".zgroup", ".zarray")):
        return "exists and is not a zarr store (no zarr.json/.zgroup/.zarray)"
    return None


def _write_store(fmt: Format, out: Path, arr: np.ndarray, overwrite: bool | None, **kw) -> None:
    """A zarr store written into a hidden sibling folder renamed onto ``out`` (only a zarr store is replaced)."""
    _refuse_existing(out, overwrite)
    if os.path.lexists(out) and store_problem(out) is not None:
        raise dataset_error(out, f"{store_problem(out)}; not replaced (choose another output name)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    try:
        fmt.write(tmp, arr, dest=os.fspath(out), **kw)
        replace_folder(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def voxel_kwargs(fmt: Format, reference: PathLike | None, key: str | None, voxel: dict) -> dict:
    """The ``spacing`` / ``units`` / ``attrs`` keywords for ``fmt.write``: those given, else the
    ``reference``'s (attributes only from a reference of the same format); ``{}`` when ``fmt`` records none."""
    if not fmt.voxel:
        return {}
    given = {k: v for k, v in voxel.items() if v is not None}
    ref = voxel_of(reference) if reference is not None and not {"spacing", "units"} <= set(given) else {}
    out = {"spacing": ref.get("spacing"), "units": ref.get("units"),
           "attrs": ref.get("attrs") if ref.get("format") == fmt.name else None}
    out.update(given)
    if out["spacing"] is not None and all(float(s) == 1.0 for s in out["spacing"]) and not any(out["units"] or ()):
        out["spacing"] = out["units"] = None  # tifffile's default resolution: no voxel size was recorded
    return out


def write_em(
    path: PathLike,
    array: np.ndarray | torch.Tensor,
    reference: PathLike | None = None,
    key: str | None = None,
    pattern: str = "{:04d}.png",
    compression: str | None = None,
    overwrite: bool | None = None,
    spacing: tuple | None = None,
    units: tuple | None = None,
    attrs: dict | None = None,
) -> str:
    """Write a 2D ``(Y, X)`` or 3D ``(Z, Y, X)`` array; the format comes from ``path``'s suffix.

    - ``.tif``/``.tiff``: one page per z slice (grayscale, ``compression`` e.g. ``"zlib"``).
    - ``.nii``/``.nii.gz``: stored (x, y, z) so that :func:`custom.io.read_em` gives the array back;
      the affine and header come from ``reference`` when it is a NIfTI file.
    - ``.h5``/``.hdf5``: dataset ``key`` (default ``"label"``), gzip; an existing file keeps its
      other datasets.
    - ``.nrrd`` (space fields copied from a NRRD ``reference``), ``.mrc``.
    - ``.mha``/``.gipl`` (through ITK; spacing, origin and direction from an ITK ``reference``).
    - ``.zarr`` / ``.ome.zarr``: OME-Zarr (NGFF 0.5, zarr v3), chunked by section, written as a hidden
      sibling folder renamed into place (only an existing zarr store is replaced).
    - ``.png``: 2D only (uint8/uint16, or integers that fit).
    - a path without suffix (or an existing folder): one 2D file per z slice named
      ``pattern.format(z)`` (PNG unless the pattern ends in .tif), written into a hidden sibling
      folder that is renamed onto ``path`` at the end. An existing folder is replaced as a whole,
      and only when it holds nothing but image slices (otherwise ``DatasetError``).

    Files are written to a temporary name and renamed, so a killed writer leaves no partial
    file or folder under ``path`` (only a hidden ``.tmp-*`` sibling). ``overwrite``: ``False``
    never replaces an existing ``path`` (``DatasetError`` "already exists", checked again at the
    final rename); ``True`` replaces it (an HDF5 file as a whole); ``None`` (default) replaces it,
    except that an existing HDF5 file keeps its other datasets (updated in place). Returns
    ``path`` as str.

    Voxel size (TIFF, HDF5, NIfTI, OME-Zarr): ``spacing`` (z, y, x) and ``units`` (NGFF names), else the
    ``reference``'s when it opens lazily (:func:`custom.io.formats.voxel_of`); HDF5 copies the
    attributes of an HDF5 reference's dataset (``attrs``). A NIfTI reference's header wins for NIfTI.
    """
    path_s = os.fspath(path)
    out = Path(path_s)
    arr = native(convert_to_numpy(array))
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise dataset_error(path_s, f"can only write a 2D (Y, X) or 3D (Z, Y, X) array, got shape {arr.shape}")
    name = em_format(path_s)
    if name is None and out.suffix == "":
        name = "dir"
    fmt = FORMATS.get(name or "")
    try:
        if fmt is not None and fmt.store:
            kw = voxel_kwargs(fmt, reference, key, {"spacing": spacing, "units": units, "attrs": attrs})
            _write_store(fmt, out, arr, overwrite, reference=None, key=key, compression=compression, **kw)
        elif name == "dir":
            _write_folder(out, arr, pattern, compression, overwrite)
        elif fmt is None or fmt.write is None:
            raise dataset_error(
                path_s, "unsupported output type (use .tif, .nii.gz, .h5, .nrrd, .mrc, .mha, .png or a folder)"
            )
        elif fmt.update is not None and overwrite is None and out.exists():
            fmt.update(out, arr, key)
        else:
            ref = reference if reference is not None and em_format(reference) == fmt.name else None
            kw = voxel_kwargs(fmt, reference, key, {"spacing": spacing, "units": units, "attrs": attrs})
            with atomic_path(out, replace=overwrite is not False) as tmp:
                fmt.write(tmp, arr, dest=path_s, reference=ref, key=key, compression=compression, **kw)
    except DatasetError:
        raise
    except FileExistsError as exc:
        if exc.filename != str(out):  # not atomic_path's refusal
            raise dataset_error(path_s, f"cannot write ({exc_text(exc)})") from None
        raise _exists_error(path_s) from None
    except Exception as exc:
        raise dataset_error(path_s, f"cannot write ({exc_text(exc)})") from None
    return path_s
