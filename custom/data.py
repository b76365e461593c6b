"""Electron-microscopy files: discovery, lazy reading, writing, slicing and validation.

Conventions used throughout this module:

- Every array is grayscale. A 2D image is ``(Y, X)``; a volume is ``(Z, Y, X)`` with Z the
  section (slowest) axis, whatever the file format stores on disk.
- A *path* is a file, or a folder of per-slice 2D images that reads as one volume (slices in
  natural order: ``s2.png`` before ``s10.png``).
- Layouts are read as a user means them. A trailing axis of length 1 is a channel and is
  dropped: ``(Y, X, 1)`` (a gray image saved channel-last) is the 2D image ``(Y, X)``, not Y
  slices of X x 1 pixels, and ``(Z, Y, X, 1)`` is the volume ``(Z, Y, X)``. Beyond three axes,
  other length-1 axes are dropped too (``(1, Z, Y, X)``, ``(Z, 1, Y, X)``: time or channel
  axes of ImageJ/OME stacks and 4D NIfTI). A leading 1 of three axes stays: ``(1, Y, X)`` is a
  one-slice volume (a single-section stack, or a 2D NIfTI stored as ``(x, y, 1)``); its one xy
  slice is the image (train it with ``planes`` ``"xy"``: its xz/yz slices are one pixel thick).
- HDF5 files hold several datasets; ``key`` names one. Without a key, images use the first of
  :data:`IMAGE_H5_KEYS`, labels the first of :data:`LABEL_H5_KEYS`; a file with a single
  dataset uses it. A file with several datasets and none of those names is refused with the
  list of its datasets (never guessed: a file with ``volume`` and ``label`` would otherwise
  train on the label as the image). Dataset items may carry ``"<key>_key"`` (e.g.
  ``"image_key": "volume"``); :func:`pair_images_labels` adds them to the items of HDF5 files
  (the ``retina_finetune`` settings ``h5_image_key`` / ``h5_label_key``).
- Every problem a user can cause with a file raises :class:`DatasetError` with a one-line
  message ``"<path>: <problem>"``, never a raw traceback of tifffile, PIL or h5py.
- Nothing reads pixel data unless asked: :func:`find_em_files` lists names,
  :func:`em_shape` reads headers only, :class:`LoadEMSliced` reads one slice (caching a few
  recently used volumes).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, ImageReader, MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy, ensure_tuple

__all__ = [
    "DatasetError",
    "EMReader",
    "IMAGE_H5_KEYS",
    "LABEL_H5_KEYS",
    "LoadEMSliced",
    "SliceDataset",
    "check_foreground",
    "em_format",
    "em_shape",
    "find_em_files",
    "no_foreground_error",
    "pair_images_labels",
    "read_em",
    "read_em_slice",
    "slice_items",
    "to_unit_range",
    "validate_items",
    "write_em",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# suffix (lower case) -> format name
_SUFFIXES: dict[str, str] = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "pil",
    ".jpg": "pil",
    ".jpeg": "pil",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".mrc": "mrc",
    ".mrcs": "mrc",
    ".rec": "mrc",
}
#: formats whose files are always 2D (no header read needed to know it)
_ALWAYS_2D = {"pil"}
#: files a per-slice folder may hold
_SLICE_FORMATS = {"pil", "tiff"}

IMAGE_H5_KEYS = ("raw", "volumes/raw", "data", "image", "images", "em")
LABEL_H5_KEYS = ("label", "labels", "volumes/labels", "seg", "segmentation", "mask")

PLANES = ("xy", "xz", "yz")
# plane -> volume axis that the slice index runs along
_PLANE_AXIS = {"xy": 0, "xz": 1, "yz": 2}

_warned: set[tuple[str, str]] = set()
_warn_lock = threading.Lock()


class DatasetError(ValueError):
    """A user-fixable problem with a data file; the message is ``"<path>: <problem>"``, one line."""


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(path: PathLike, problem: str) -> DatasetError:
    return DatasetError(f"{os.fspath(path)}: {_one_line(problem)}")


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {msg}"


def _warn_once(path: PathLike, message: str) -> None:
    tag = (os.fspath(path), message)
    with _warn_lock:
        if tag in _warned:
            return
        _warned.add(tag)
    logger.warning("%s: %s", os.fspath(path), message)


def _natural_key(text: str) -> list:
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", text)]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _name_format(name: str) -> str | None:
    """Format of a file name from its suffix alone (no file-system access)."""
    name = name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    return _SUFFIXES.get(os.path.splitext(name)[1])


def em_format(path: PathLike) -> str | None:
    """Format name of ``path`` from its suffix: ``"tiff"``, ``"pil"`` (png/jpg), ``"hdf5"``,
    ``"nifti"``, ``"nrrd"``, ``"mrc"``, ``"dir"`` for an existing folder, else ``None``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return "dir"
    return _name_format(os.path.basename(path))


def _stem(path: PathLike) -> str:
    name = os.path.basename(os.fspath(path).rstrip("/\\"))
    if name.lower().endswith(".nii.gz"):
        return name[:-7]
    return os.path.splitext(name)[0] if em_format(path) not in (None, "dir") else name


# --------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------
def find_em_files(root: PathLike) -> list[str]:
    """List the EM files under ``root``, recursively, in natural sort order.

    Args:
        root: a folder (searched recursively, hidden files and folders skipped) or one file.

    Returns:
        paths (str) of 2D images (tif/tiff/png/jpg/jpeg) and 3D stacks (multi-page tif,
        h5/hdf5, nii/nii.gz, nrrd, mrc). Only names are looked at: nothing is opened.

    Raises:
        DatasetError: ``root`` is missing, or holds no file of a supported format.
    """
    root = os.fspath(root)
    if not root or not os.path.exists(root):
        raise _error(root, "no such file or folder")
    if os.path.isfile(root):
        if em_format(root) is None:
            raise _error(root, f"unsupported file type (supported: {', '.join(sorted(_SUFFIXES))})")
        return [root]
    found: list[str] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink cycle, or a folder linked twice
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted((d for d in dirnames if not _is_hidden(d)), key=_natural_key)
        found.extend(
            os.path.join(dirpath, name) for name in filenames if not _is_hidden(name) and _name_format(name) is not None
        )
    if not found:
        raise _error(root, f"folder holds no readable EM images (looked for {', '.join(sorted(_SUFFIXES))})")
    return sorted(found, key=lambda p: _natural_key(os.path.relpath(p, root)))


def _slice_files(folder: PathLike) -> list[str]:
    """The per-slice 2D image files of a folder volume, in natural order."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise _error(folder, f"cannot list folder ({_describe(exc)})") from None
    files = [os.path.join(folder, n) for n in names if not _is_hidden(n) and _name_format(n) in _SLICE_FORMATS]
    if not files:
        raise _error(folder, "folder holds no 2D image slices (png/jpg/tif)")
    return sorted(files, key=lambda p: _natural_key(os.path.basename(p)))


# --------------------------------------------------------------------------------------
# format back-ends: each returns a native-byte-order array, or a header shape
# --------------------------------------------------------------------------------------
def _native(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _rgb_to_gray(arr: np.ndarray, axis: int, path: PathLike) -> np.ndarray:
    """Collapse a samples axis of length 2 (gray+alpha), 3 (RGB) or 4 (RGBA) to gray.

    Identical R, G, B channels are taken as they are; otherwise ITU-R 601 luma, rounded back
    to the input dtype for integer images. Logs one warning naming the file.
    """
    arr = np.moveaxis(arr, axis, -1)
    n = arr.shape[-1]
    if n == 2:
        return arr[..., 0]
    rgb = arr[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        _warn_once(path, f"stored with {n} colour channels that are identical; reading one as grayscale")
        return np.ascontiguousarray(rgb[..., 0])
    _warn_once(path, f"{'RGBA' if n == 4 else 'RGB'} image converted to grayscale (luma 0.299 R + 0.587 G + 0.114 B)")
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(gray), info.min, info.max).astype(arr.dtype)
    return gray.astype(arr.dtype, copy=False)


def _tiff_samples_axis(series) -> int | None:
    """Index of a colour-samples axis (length 2-4) in a tifffile series, else None."""
    axes = series.axes
    if "S" in axes:
        axis = axes.index("S")
        if series.shape[axis] in (2, 3, 4):
            return axis
    return None


def _needs_codec(exc: BaseException) -> bool:
    return "imagecodecs" in str(exc)


def _pil_frames(path: str) -> np.ndarray:
    """All frames of an image file through PIL (fallback for TIFF compressions tifffile cannot
    decode without ``imagecodecs``, e.g. LZW)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        frames = [_pil_to_array(frame.copy(), path) for frame in ImageSequence.Iterator(im)]
    return frames[0] if len(frames) == 1 else np.stack(frames)


def _read_tiff(path: str) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axis = _tiff_samples_axis(series)
        try:
            arr = series.asarray()
        except (KeyError, ValueError) as exc:
            if not _needs_codec(exc):
                raise
            return _pil_frames(path)
    if axis is not None:
        arr = _rgb_to_gray(arr, axis, path)
    return arr


def _tiff_shape(path: str) -> tuple[int, ...]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = list(series.shape)
        axis = _tiff_samples_axis(series)
    if axis is not None:
        del shape[axis]
    return tuple(shape)


def _tiff_page(path: str, index: int) -> np.ndarray | None:
    """Page ``index`` of a plain (Z, Y, X) stack without reading the others; None if the file
    is not such a stack (then the caller reads the whole volume)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if len(series.shape) != 3 or _tiff_samples_axis(series) is not None or len(series.pages) != series.shape[0]:
            return None
        page = series.pages[index]
        if page is None:
            return None
        try:
            return page.asarray()
        except (KeyError, ValueError) as exc:
            if not _needs_codec(exc):
                raise
            return None


def _pil_to_array(im, path: PathLike) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        src = np.asarray(im.convert("RGBA" if mode == "RGBA" else "RGB"))
        return _rgb_to_gray(src, -1, path)
    if mode in ("LA", "La", "PA"):
        return np.asarray(im.convert("L"))
    if mode == "P":
        palette = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
        if len(palette) and (palette[:, 0] == palette[:, 1]).all() and (palette[:, 0] == palette[:, 2]).all():
            return np.asarray(im.convert("L"))
        _warn_once(path, "palette image with colours: reading its palette indices (as for a label mask)")
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im).astype(bool)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    return np.asarray(im)


def _read_pil(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        arr = _pil_to_array(im, path)
    # np.asarray of a PIL image is read-only; torch warns on every such tensor (and may not write to it)
    return arr if arr.flags.writeable else np.array(arr)


def _pil_shape(path: str) -> tuple[int, ...]:
    from PIL import Image

    with Image.open(path) as im:
        return (im.size[1], im.size[0])


def _h5_dataset(f, path: str, key: str | None, role: str):
    import h5py

    if key:
        obj = f.get(key)
        if not isinstance(obj, h5py.Dataset):
            raise _error(path, f"has no dataset '{key}' (datasets: {', '.join(_h5_names(f)) or 'none'})")
        return obj
    known = IMAGE_H5_KEYS if role == "image" else LABEL_H5_KEYS
    for name in known:
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            return obj
    names = _h5_names(f)
    if not names:
        raise _error(path, "HDF5 file holds no dataset")
    if len(names) == 1:
        return f[names[0]]
    raise _h5_ambiguous(path, names, role)


def _h5_ambiguous(path: str, names: list[str], role: str) -> DatasetError:
    """Several datasets, none with a known name for ``role``: which one is meant is the user's call."""
    other = LABEL_H5_KEYS if role == "image" else IMAGE_H5_KEYS
    example = next((n for n in names if n.lower() not in other and n.rsplit("/", 1)[-1].lower() not in other), names[0])
    known = IMAGE_H5_KEYS if role == "image" else LABEL_H5_KEYS
    problem = (
        f"HDF5 file holds {len(names)} datasets ({_names(names)}) and none has a known {role} name "
        f"({', '.join(known)}); choose the {role} dataset: --h5_{role}_key {example} (retina_finetune), "
        f"or \"{role}_key\": \"{example}\" in the dataset item"
    )
    return DatasetError(f"{path}: {_one_line(problem, 480)}")


def _h5_names(f) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _read_h5(path: str, key: str | None, role: str, index: tuple | None = None) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        ds = _h5_dataset(f, path, key, role)
        return ds[()] if index is None else ds[index]


def _h5_shape(path: str, key: str | None, role: str) -> tuple[int, ...]:
    import h5py

    with h5py.File(path, "r") as f:
        return tuple(_h5_dataset(f, path, key, role).shape)


def _nifti_image(path: str):
    import nibabel as nib

    return nib.load(path)


def _read_nifti(path: str) -> np.ndarray:
    # NIfTI stores (x, y, z); reversing all axes gives (z, y, x), and writing .T back restores it.
    return np.asanyarray(_nifti_image(path).dataobj).T


def _read_nrrd(path: str) -> np.ndarray:
    import nrrd

    data, _ = nrrd.read(path, index_order="C")
    return data


def _nrrd_shape(path: str) -> tuple[int, ...]:
    import nrrd

    header = nrrd.read_header(path)
    return tuple(int(s) for s in header["sizes"][::-1])


@contextmanager
def _mrc(path: str):
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.mmap(path, mode="r", permissive=False) as m:
            yield m


def _read_raw(path: str, key: str | None, role: str) -> np.ndarray:
    fmt = em_format(path)
    if fmt == "tiff":
        return _read_tiff(path)
    if fmt == "pil":
        return _read_pil(path)
    if fmt == "hdf5":
        return _read_h5(path, key, role)
    if fmt == "nifti":
        return _read_nifti(path)
    if fmt == "nrrd":
        return _read_nrrd(path)
    if fmt == "mrc":
        with _mrc(path) as m:
            return np.array(m.data)
    if fmt == "dir":
        return _read_folder(path)
    raise _error(path, f"unsupported file type (supported: {', '.join(sorted(_SUFFIXES))} or a folder of slices)")


def _shape_raw(path: str, key: str | None, role: str) -> tuple[int, ...]:
    fmt = em_format(path)
    if fmt == "tiff":
        return _tiff_shape(path)
    if fmt == "pil":
        return _pil_shape(path)
    if fmt == "hdf5":
        return _h5_shape(path, key, role)
    if fmt == "nifti":
        return tuple(int(s) for s in _nifti_image(path).shape[::-1])
    if fmt == "nrrd":
        return _nrrd_shape(path)
    if fmt == "mrc":
        with _mrc(path) as m:
            return tuple(m.data.shape)
    if fmt == "dir":
        files = _slice_files(path)
        return (len(files), *_slice_shape(files[0]))
    raise _error(path, f"unsupported file type (supported: {', '.join(sorted(_SUFFIXES))} or a folder of slices)")


def _slice_shape(path: str) -> tuple[int, ...]:
    shape = em_shape(path)
    if len(shape) != 2:
        raise _error(path, f"a slice of a folder volume must be 2D, got shape {shape}")
    return shape


def _read_folder(folder: str) -> np.ndarray:
    files = _slice_files(folder)
    first = read_em(files[0])
    if first.ndim != 2:
        raise _error(files[0], f"a slice of a folder volume must be 2D, got shape {first.shape}")
    out = np.empty((len(files), *first.shape), dtype=first.dtype)
    out[0] = first
    for i, f in enumerate(files[1:], start=1):
        sl = read_em(f)
        if sl.shape != first.shape:
            raise _error(f, f"slice shape {sl.shape} differs from the folder's first slice {first.shape}")
        out[i] = sl
    return out


def _squeeze_extra(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape a stored array is read as (see the module docstring).

    Trailing length-1 axes (a channel of one) are dropped down to two axes: ``(Y, X, 1) -> (Y, X)``,
    ``(Z, Y, X, 1) -> (Z, Y, X)``. Then, while more than three axes are left, other length-1 axes,
    first ones first: ``(1, Z, Y, X) -> (Z, Y, X)``, ``(Z, 1, Y, X) -> (Z, Y, X)``. Three axes with a
    leading 1 stay: ``(1, Y, X)`` is a one-slice volume.
    """
    shape = list(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    while len(shape) > 3 and 1 in shape:
        del shape[shape.index(1)]
    return tuple(shape)


def _check_ndim(path: PathLike, shape: Sequence[int]) -> None:
    if len(shape) not in (2, 3):
        raise _error(path, f"{len(shape)}D array of shape {tuple(shape)}; expected a 2D image (Y, X) or a 3D volume (Z, Y, X)")
    if 0 in shape:
        raise _error(path, f"empty array of shape {tuple(shape)}")


@contextmanager
def _wrap_errors(path: PathLike, action: str = "cannot read"):
    """Turn any library exception into a one-line DatasetError naming ``path``."""
    if not os.path.exists(path):
        raise _error(path, "no such file or folder")
    try:
        yield
    except DatasetError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # tifffile / PIL / h5py / nibabel / nrrd / mrcfile errors
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise _error(path, f"{action}: empty file (0 bytes)") from None
        kind = {"tiff": "TIFF", "pil": "image", "hdf5": "HDF5", "nifti": "NIfTI", "nrrd": "NRRD", "mrc": "MRC"}
        what = kind.get(em_format(path) or "", "file")
        raise _error(path, f"{action} {what} (corrupt or truncated? {_describe(exc)})") from None


# --------------------------------------------------------------------------------------
# public reading API
# --------------------------------------------------------------------------------------
def read_em(path: PathLike, key: str | None = None, role: str = "image") -> np.ndarray:
    """Read a whole EM image or volume.

    Args:
        path: a file of a supported format, or a folder of per-slice 2D images.
        key: HDF5 dataset name (see the module docstring for the default).
        role: ``"image"`` or ``"label"``; only chooses the default HDF5 dataset.

    Returns:
        ``(Y, X)`` or ``(Z, Y, X)`` array in the file's dtype (native byte order), grayscale:
        RGB(A) is converted with a logged warning; NIfTI (x, y, z) is returned as (z, y, x).
        A trailing length-1 (channel) axis is dropped (``(Y, X, 1)`` is read as ``(Y, X)``), and
        so are other length-1 axes beyond the third; ``(1, Y, X)`` stays a one-slice volume.

    Raises:
        DatasetError: missing, unreadable or truncated file; not 2D/3D; empty.
    """
    path = os.fspath(path)
    with _wrap_errors(path):
        arr = _native(_read_raw(path, key, role))
        shape = _squeeze_extra(arr.shape)
        if shape != arr.shape:
            arr = arr.reshape(shape)
    _check_ndim(path, arr.shape)
    return arr


def em_shape(path: PathLike, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    """Shape that :func:`read_em` would return, from headers only (tifffile pages, HDF5
    dataset, NIfTI/NRRD/MRC headers, PIL size; a folder: slice count and first slice).

    Raises:
        DatasetError: as :func:`read_em`, for problems visible in the header.
    """
    path = os.fspath(path)
    with _wrap_errors(path):
        shape = _squeeze_extra(_shape_raw(path, key, role))
    _check_ndim(path, shape)
    return tuple(int(s) for s in shape)


def _check_plane(path: PathLike, shape: Sequence[int], plane: str, index: int) -> None:
    if plane not in _PLANE_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    if len(shape) == 2:
        if plane != "xy" or index not in (-1, 0):
            raise _error(path, f"2D image of shape {tuple(shape)} has no {plane} slice {index}")
        return
    n = shape[_PLANE_AXIS[plane]]
    if not 0 <= index < n:
        raise _error(path, f"{plane} slice index {index} out of range for a volume of shape {tuple(shape)}")


def _take(vol: np.ndarray, plane: str, index: int) -> np.ndarray:
    if vol.ndim == 2:
        return vol
    return np.take(vol, index, axis=_PLANE_AXIS[plane])


def read_em_slice(
    path: PathLike, plane: str = "xy", index: int = -1, key: str | None = None, role: str = "image"
) -> np.ndarray:
    """Read one 2D slice, touching only that slice where the format allows.

    Args:
        path, key, role: as :func:`read_em`.
        plane: ``"xy"`` gives ``vol[index]`` (Y, X); ``"xz"`` gives ``vol[:, index]`` (Z, X);
            ``"yz"`` gives ``vol[:, :, index]`` (Z, Y).
        index: slice number along that plane's normal; ``-1`` (or 0) for a 2D image.

    Returns:
        the 2D slice, same dtype and gray conversion as :func:`read_em`. Partial reads: TIFF
        stack pages (xy), HDF5 and MRC (all planes), NIfTI (all planes), folders (xy); other
        cases read the whole volume.
    """
    path = os.fspath(path)
    shape = em_shape(path, key, role)
    _check_plane(path, shape, plane, index)
    if len(shape) == 2:
        return read_em(path, key, role)
    fmt = em_format(path)
    out = None
    with _wrap_errors(path):
        raw_shape = _h5_shape(path, key, role) if fmt == "hdf5" else ()
        if fmt == "hdf5" and tuple(raw_shape[:3]) == tuple(shape) and all(s == 1 for s in raw_shape[3:]):
            # (Z, Y, X) or (Z, Y, X, 1): index the first three axes, drop the trailing channel
            sel = [slice(None)] * 3
            sel[_PLANE_AXIS[plane]] = index
            raw = _read_h5(path, key, role, tuple(sel))
            raw = raw.reshape(raw.shape[:2]) if raw.ndim > 2 and all(s == 1 for s in raw.shape[2:]) else raw
            out = raw if raw.ndim == 2 else None
        elif fmt == "mrc":
            with _mrc(path) as m:
                if m.data.ndim == 3:
                    out = np.array(_take(m.data, plane, index))
        elif fmt == "nifti":
            proxy = _nifti_image(path).dataobj
            if len(proxy.shape) == 3:
                axis = 2 - _PLANE_AXIS[plane]  # NIfTI axes are reversed
                sel = [slice(None)] * 3
                sel[axis] = index
                out = np.asanyarray(proxy[tuple(sel)]).T
        elif fmt == "tiff" and plane == "xy":
            out = _tiff_page(path, index)
        elif fmt == "dir" and plane == "xy":
            return read_em(_slice_files(path)[index])
    if out is None:
        return _take(read_em(path, key, role), plane, index)
    return _native(out)


def to_unit_range(arr: np.ndarray | torch.Tensor) -> np.ndarray:
    """Scale an image to float32 in [0, 1] by its dtype, never by its content.

    uint8 / 255, uint16 / 65535, bool as 0/1, any other integer type maps its full dtype range
    ``[iinfo.min, iinfo.max]`` onto [0, 1]; floats are returned as float32 unchanged.
    Shape is kept.
    """
    arr = convert_to_numpy(arr)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if info.min == 0:
            return arr.astype(np.float32) / np.float32(info.max)
        return (arr.astype(np.float64) - info.min).astype(np.float32) / np.float32(float(info.max) - float(info.min))
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    raise TypeError(f"cannot scale an array of dtype {arr.dtype} to [0, 1]")


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _exists_error(path: PathLike) -> DatasetError:
    return _error(path, "already exists; not replaced (overwrite is off)")


def _refuse_existing(path: PathLike, overwrite: bool | None) -> None:
    """Raise when ``path`` exists and ``overwrite`` is False."""
    if overwrite is False and os.path.lexists(path):
        raise _exists_error(path)


def _move_no_clobber(tmp: Path, path: Path) -> None:
    """Move the file ``tmp`` onto ``path`` unless ``path`` exists, atomically where the file system
    has hard links (``link`` fails on an existing name, so two writers cannot both win)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # no hard links here (FAT, some network file systems): check, then rename
        if os.path.lexists(path):
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def _atomic(path: Path, overwrite: bool | None = None):
    """Yield a temporary name next to ``path`` (same suffixes, hidden) and move it onto
    ``path`` when the block succeeds, so a reader never sees a half-written file.
    With ``overwrite=False`` an existing ``path`` is never replaced (``DatasetError``)."""
    _refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        if overwrite is False:
            _move_no_clobber(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def slice_folder_problem(folder: PathLike) -> str | None:
    """Why the existing folder ``folder`` may not be replaced by a folder of slices (None: it may).

    Only a folder holding nothing but 2D image files (png/jpg/tif, hidden files aside) is
    replaceable: a folder with sub-folders or other files is somebody's data, never deleted."""
    try:
        names = [n for n in os.listdir(folder) if not _is_hidden(n)]
    except OSError as exc:
        return f"cannot list folder ({_describe(exc)})"
    for n in names:
        p = os.path.join(folder, n)
        if os.path.isdir(p):
            return f"holds a sub-folder ({n}), not only image slices"
        if _name_format(n) not in _SLICE_FORMATS:
            return f"holds {n}, not only image slices"
    return None


def _write_folder(out: Path, arr: np.ndarray, pattern: str, compression: str | None, overwrite: bool | None) -> None:
    """One 2D file per z slice, written into a hidden sibling folder renamed onto ``out`` at the end,
    so a killed writer never leaves a partial folder that reads back as a shorter volume. An
    existing ``out`` is replaced (unless ``overwrite`` is False) only when it holds nothing but
    image slices (:func:`slice_folder_problem`); it is renamed away first and deleted last."""
    import shutil

    _refuse_existing(out, overwrite)
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise _error(out, "exists and is not a folder; not replaced by a folder of slices")
        problem = slice_folder_problem(out)
        if problem is not None:
            raise _error(out, f"exists and {problem}; not replaced (choose another output name)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.with_name(f".tmp-{tag}-{out.name}")
    tmp.mkdir()
    try:
        for z, sl in enumerate(arr if arr.ndim == 3 else arr[None]):
            write_em(tmp / pattern.format(z), sl, compression=compression)
        if os.path.lexists(out):
            if overwrite is False:
                raise _exists_error(out)
            old = out.with_name(f".old-{tag}-{out.name}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)  # fails on a non-empty folder that appeared meanwhile: nothing is lost
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _png_ready(arr: np.ndarray, path: PathLike) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0:
        if arr.max() <= 255:
            return arr.astype(np.uint8)
        if arr.max() <= 65535:
            return arr.astype(np.uint16)
    raise _error(path, f"PNG holds uint8 or uint16 values; got {arr.dtype} (use .tif, .nii.gz, .h5 or .nrrd)")


def write_em(
    path: PathLike,
    array: np.ndarray | torch.Tensor,
    reference: PathLike | None = None,
    key: str | None = None,
    pattern: str = "{:04d}.png",
    compression: str | None = None,
    overwrite: bool | None = None,
) -> str:
    """Write a 2D ``(Y, X)`` or 3D ``(Z, Y, X)`` array; the format comes from ``path``'s suffix.

    - ``.tif``/``.tiff``: one page per z slice (grayscale, ``compression`` e.g. ``"zlib"``).
    - ``.nii``/``.nii.gz``: stored (x, y, z) so that :func:`read_em` gives the array back; the
      affine and header come from ``reference`` when it is a NIfTI file.
    - ``.h5``/``.hdf5``: dataset ``key`` (default ``"label"``), gzip; an existing file keeps its
      other datasets.
    - ``.nrrd`` (space fields copied from a NRRD ``reference``), ``.mrc``.
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
    """
    path_s = os.fspath(path)
    out = Path(path_s)
    arr = _native(convert_to_numpy(array))
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise _error(path_s, f"can only write a 2D (Y, X) or 3D (Z, Y, X) array, got shape {arr.shape}")
    fmt = em_format(path_s)
    if fmt is None and out.suffix == "":
        fmt = "dir"
    try:
        if fmt == "dir":
            _write_folder(out, arr, pattern, compression, overwrite)
        elif fmt == "tiff":
            import tifffile

            data = arr.astype(np.uint8) if arr.dtype == bool else arr
            with _atomic(out, overwrite) as tmp:
                tifffile.imwrite(tmp, data, photometric="minisblack", compression=compression)
        elif fmt == "pil":
            if out.suffix.lower() != ".png":
                raise _error(path_s, "lossy JPEG output is not supported; use .png or .tif")
            if arr.ndim != 2:
                raise _error(path_s, f"PNG is 2D; got shape {arr.shape} (write a folder of slices or a .tif stack)")
            from PIL import Image

            with _atomic(out, overwrite) as tmp:
                Image.fromarray(_png_ready(arr, path_s)).save(tmp, format="PNG")
        elif fmt == "nifti":
            _write_nifti(out, arr, reference, overwrite)
        elif fmt == "hdf5":
            _write_h5(out, arr, key or "label", overwrite)
        elif fmt == "nrrd":
            _write_nrrd(out, arr, reference, overwrite)
        elif fmt == "mrc":
            import mrcfile

            with _atomic(out, overwrite) as tmp:
                with mrcfile.new(tmp, overwrite=True) as m:
                    m.set_data(arr.astype(np.uint8) if arr.dtype == bool else arr)
        else:
            raise _error(path_s, "unsupported output type (use .tif, .nii.gz, .h5, .nrrd, .mrc, .png or a folder)")
    except DatasetError:
        raise
    except Exception as exc:
        raise _error(path_s, f"cannot write ({_describe(exc)})") from None
    return path_s


def _write_nifti(out: Path, arr: np.ndarray, reference: PathLike | None, overwrite: bool | None = None) -> None:
    import nibabel as nib

    data = arr.T
    if data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype in (np.int64, np.uint64):
        data = data.astype(np.int32 if data.size == 0 or (data.min() >= -(2**31) and data.max() < 2**31) else np.float64)
    affine, header = np.eye(4), None
    if reference is not None and em_format(reference) == "nifti":
        with _wrap_errors(reference):
            ref = nib.load(os.fspath(reference))
            affine, header = ref.affine, ref.header.copy()
    img = nib.Nifti1Image(data, affine, header=header, dtype=data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    with _atomic(out, overwrite) as tmp:
        nib.save(img, tmp)


def _write_h5(out: Path, arr: np.ndarray, key: str, overwrite: bool | None = None) -> None:
    import h5py

    def _put(f):
        if key in f:
            del f[key]
        chunks = (1, *arr.shape[1:]) if arr.ndim == 3 and arr[0].nbytes <= 2**22 else True
        f.create_dataset(key, data=arr, compression="gzip", compression_opts=4, chunks=chunks)

    if out.exists() and overwrite is None:  # keep the file's other datasets
        with h5py.File(out, "a") as f:
            _put(f)
    else:
        with _atomic(out, overwrite) as tmp:
            with h5py.File(tmp, "w") as f:
                _put(f)


def _write_nrrd(out: Path, arr: np.ndarray, reference: PathLike | None, overwrite: bool | None = None) -> None:
    import nrrd

    header: dict[str, Any] = {}
    if reference is not None and em_format(reference) == "nrrd":
        with _wrap_errors(reference):
            ref = nrrd.read_header(os.fspath(reference))
        header = {k: ref[k] for k in ("space", "space directions", "space origin", "space units") if k in ref}
    data = arr.astype(np.uint8) if arr.dtype == bool else arr
    with _atomic(out, overwrite) as tmp:
        nrrd.write(os.fspath(tmp), data, header=header, index_order="C")


# --------------------------------------------------------------------------------------
# dataset items
# --------------------------------------------------------------------------------------
def _as_item(item: Any, key: str) -> dict:
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, (str, os.PathLike)):
        return {key: os.fspath(item)}
    raise TypeError(f"a dataset item is a path or a dict, got {type(item).__name__}")


def _planes(planes: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(planes, str):
        if planes in ("orthoplane", "all"):
            return PLANES
        planes = (planes,)
    planes = tuple(planes)
    bad = [p for p in planes if p not in PLANES]
    if bad:
        raise ValueError(f"planes must be 'xy', 'xz', 'yz', 'orthoplane' or a list of those, got {bad}")
    return planes


def slice_items(
    items: Iterable[Mapping | PathLike], planes: str | Sequence[str] = "xy", keys: KeysCollection = ("image",)
) -> list[dict]:
    """Expand dataset items into one item per 2D slice (shapes from headers only).

    Args:
        items: dicts like ``{"image": path, "label": path}`` or bare paths (taken as ``keys[0]``).
        planes: ``"xy"`` (default, anisotropic data), ``"orthoplane"`` (xy, xz and yz), one plane
            or a list of planes.
        keys: ``keys[0]`` names the entry whose shape decides the slicing; every entry of the
            item is copied into each slice item.

    Returns:
        ``[{**item, "plane": "xy"|"xz"|"yz", "index": i}, ...]``: a (Z, Y, X) volume gives Z xy,
        Y xz and X yz items; a 2D image gives one item with ``"plane": "xy", "index": -1``; an
        item that already has ``"plane"`` and ``"index"`` is kept as it is.
    """
    keys = ensure_tuple(keys)
    main = str(keys[0])
    wanted = _planes(planes)
    out: list[dict] = []
    for item in items:
        d = _as_item(item, main)
        if main not in d:
            raise DatasetError(f"item {d}: no '{main}' entry")
        if "plane" in d and "index" in d:  # already one slice
            out.append(d)
            continue
        path = d[main]
        fmt = em_format(path)
        if fmt in _ALWAYS_2D:
            shape: tuple[int, ...] = (0, 0)
        else:
            shape = em_shape(path, d.get(f"{main}_key"), "image")
        if len(shape) == 2:
            out.append({**d, "plane": "xy", "index": -1})
            continue
        for plane in wanted:
            out.extend({**d, "plane": plane, "index": i} for i in range(shape[_PLANE_AXIS[plane]]))
    return out


class _VolumeCache:
    """A small thread-safe LRU (volumes, or header shapes) keyed by (path, key, role, mtime, size)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._data: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tag: tuple) -> Any:
        with self._lock:
            vol = self._data.get(tag)
            if vol is not None:
                self._data.move_to_end(tag)
            return vol

    def put(self, tag: tuple, vol: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[tag] = vol
            self._data.move_to_end(tag)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __getstate__(self) -> dict:
        return {"size": self.size}  # pickled copies (data-loader workers) start empty

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def _file_tag(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


def _as_label(arr: np.ndarray, path: PathLike, dtype) -> np.ndarray:
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(dtype, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise _error(path, "label holds non-finite values (NaN or inf)")
        if not np.array_equal(arr, np.round(arr)):
            raise _error(path, "label holds non-integer values; expected class indices 0, 1, 2, ...")
        return arr.astype(dtype)
    raise _error(path, f"label dtype {arr.dtype} is not an integer type")


class LoadEMSliced(MapTransform):
    """Read the 2D slice named by a :func:`slice_items` item, channel-first.

    For each key the item's ``"plane"`` and ``"index"`` (defaults ``"xy"``, ``-1``) select
    the slice (see :func:`read_em_slice`); an optional ``"<key>_key"`` entry names the HDF5
    dataset. Output per key: ``(1, H, W)`` float32 in [0, 1] (:func:`to_unit_range`) for
    images, ``(1, H, W)`` ``label_dtype`` class indices for ``label_keys``; as
    ``MetaTensor`` (meta: ``filename_or_obj``, ``plane``, ``index``, ``spatial_shape``,
    ``original_channel_dim``) unless ``as_tensor=False`` (then numpy arrays).

    Volumes of at most ``cache_max_voxels`` voxels are read whole and kept in an LRU of
    ``cache_size`` volumes (per transform instance, i.e. per data-loader worker; dropped when
    pickled), so iterating over the slices of one stack reads it once. Larger volumes are read
    slice by slice where the format allows.

    Args:
        keys: item entries holding paths.
        label_keys: which of ``keys`` are label maps.
        label_dtype: numpy dtype of labels (int64 default; uint8 saves memory).
        h5_keys: default HDF5 dataset per key, e.g. ``{"image": "raw", "label": "labels"}``.
        cache_size: volumes kept in memory; 0 disables the cache.
        cache_max_voxels: volumes larger than this are never cached whole.
        as_tensor: return MetaTensors (default) or numpy arrays.
        scale: images as float32 in [0, 1] by their dtype (:func:`to_unit_range`, the default), or
            False: their raw values as float32, for ``custom.intensity.MapIntensityd`` to map as the
            dataset's intensity record says (what the bundles do).
        allow_missing_keys: don't raise when a key is absent from an item.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_keys: KeysCollection = ("label",),
        label_dtype: Any = np.int64,
        h5_keys: Mapping[Hashable, str] | None = None,
        cache_size: int = 4,
        cache_max_voxels: int = 2**27,
        as_tensor: bool = True,
        scale: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scale = scale
        self.label_keys = set(ensure_tuple(label_keys))
        self.label_dtype = np.dtype(label_dtype)
        self.h5_keys = dict(h5_keys or {})
        self.cache_max_voxels = int(cache_max_voxels)
        self.as_tensor = as_tensor
        self._cache = _VolumeCache(cache_size)
        self._shapes = _VolumeCache(4096)

    def _slice(self, path: str, key: str | None, role: str, plane: str, index: int) -> np.ndarray:
        with _wrap_errors(path):
            tag = (path, key, role, *_file_tag(path))
        shape = self._shapes.get(tag)
        if shape is None:
            shape = em_shape(path, key, role)
            self._shapes.put(tag, shape)
        _check_plane(path, shape, plane, index)
        if len(shape) == 2:
            return read_em(path, key, role)
        vol = self._cache.get(tag)
        if vol is None and int(np.prod(shape)) <= self.cache_max_voxels and self._cache.size > 0:
            vol = read_em(path, key, role)
            self._cache.put(tag, vol)
        if vol is not None:
            return _take(vol, plane, index)
        return read_em_slice(path, plane, index, key, role)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        plane = str(d.get("plane", "xy"))
        index = int(d.get("index", -1))
        for k in self.key_iterator(d):
            path = os.fspath(d[k])
            role = "label" if k in self.label_keys else "image"
            h5key = d.get(f"{k}_key", self.h5_keys.get(k))
            sl = self._slice(path, h5key, role, plane, index)
            if role == "label":
                arr = _as_label(sl, path, self.label_dtype)
            else:
                arr = to_unit_range(sl) if self.scale else sl.astype(np.float32)
            arr = np.ascontiguousarray(arr)[None]
            if self.as_tensor:
                meta = {
                    "filename_or_obj": path,
                    "plane": plane,
                    "index": index,
                    "spatial_shape": np.asarray(arr.shape[1:]),
                    "original_channel_dim": "no_channel",
                }
                d[k] = MetaTensor(torch.from_numpy(arr), meta=meta)
            else:
                d[k] = arr
        return d


class SliceDataset(CacheDataset):
    """MONAI ``CacheDataset`` over the 2D slices of whole-image items.

    ``data`` holds items such as ``{"image": path, "label": path}`` (whole images or volumes, the
    form MONAI Label passes as ``train#dataset#data``); :func:`slice_items` expands them into one
    item per slice of ``planes`` (slice items given already stay as they are); ``planes=None``
    keeps the items whole. Other arguments are ``CacheDataset``'s.
    """

    def __init__(
        self,
        data: Sequence,
        transform: Any = None,
        planes: str | Sequence[str] | None = "xy",
        keys: KeysCollection = ("image", "label"),
        **kwargs: Any,
    ) -> None:
        items = list(data) if planes is None else slice_items(data, planes=planes, keys=keys)
        super().__init__(data=items, transform=transform, **kwargs)


# --------------------------------------------------------------------------------------
# MONAI ImageReader
# --------------------------------------------------------------------------------------
class _EMHandle:
    """What :meth:`EMReader.read` returns: a checked path; pixels are read in ``get_data``."""

    def __init__(self, path: str, key: str | None, role: str) -> None:
        self.path, self.key, self.role = path, key, role

    def __repr__(self) -> str:
        return f"_EMHandle({self.path!r}, key={self.key!r})"


def _nifti_affine_zyx(path: str, ndim: int) -> np.ndarray | None:
    """Affine of a NIfTI file re-expressed for our reversed (z, y, x) / (y, x) array axes."""
    try:
        aff = np.asarray(_nifti_image(path).affine, dtype=np.float64)
    except Exception:
        return None
    order = [2, 1, 0, 3] if ndim == 3 else [1, 0, 2, 3]
    return aff[:, order]


class EMReader(ImageReader):
    """MONAI ``ImageReader`` for every EM format of this module (TIFF stacks, PNG/JPEG,
    folders of slices, HDF5, NIfTI, NRRD, MRC), for ``LoadImage(d)(reader=EMReader())``.

    The loaded array is ``(Y, X)`` or ``(Z, Y, X)`` in the file's dtype (as :func:`read_em`);
    meta data hold ``spatial_shape``, ``filename_or_obj``, ``original_channel_dim`` =
    ``"no_channel"`` (so ``EnsureChannelFirst`` adds the channel), ``em_format`` and, for NIfTI,
    ``affine``/``original_affine`` re-ordered to the (z, y, x) axes. Several files are stacked on
    a new first (channel) axis, as MONAI's readers do. Read problems raise :class:`DatasetError`
    from ``get_data`` (``read`` only checks that each path exists and has a supported type).

    Args:
        key: HDF5 dataset name (default: see the module docstring).
        role: ``"image"`` or ``"label"`` (chooses the default HDF5 dataset).
    """

    def __init__(self, key: str | None = None, role: str = "image", **kwargs) -> None:
        super().__init__()
        self.key = key
        self.role = role
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True when every name is a supported EM file type or a folder."""
        return all(em_format(f) is not None for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs):
        handles = []
        for f in ensure_tuple(data):
            path = os.fspath(f)
            if not os.path.exists(path):
                raise _error(path, "no such file or folder")
            if em_format(path) is None:
                raise _error(path, f"unsupported file type (supported: {', '.join(sorted(_SUFFIXES))} or a folder of slices)")
            handles.append(_EMHandle(path, kwargs.get("key", self.key), kwargs.get("role", self.role)))
        return handles if len(handles) > 1 else handles[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        handles = list(img) if isinstance(img, (list, tuple)) else [img]
        arrays, meta = [], {}
        for h in handles:
            arr = read_em(h.path, h.key, h.role)
            if arrays and arr.shape != arrays[0].shape:
                raise _error(h.path, f"shape {arr.shape} differs from {handles[0].path} {arrays[0].shape}; cannot stack")
            arrays.append(arr)
            if not meta:
                meta = {
                    "spatial_shape": np.asarray(arr.shape),
                    "original_channel_dim": "no_channel",
                    "filename_or_obj": h.path,
                    "em_format": em_format(h.path),
                    "em_dtype": str(arr.dtype),  # MONAI may convert it on loading (uint16 -> int32)
                }
                if meta["em_format"] == "nifti":
                    aff = _nifti_affine_zyx(h.path, arr.ndim)
                    if aff is not None:
                        meta["affine"] = aff
                        meta["original_affine"] = aff.copy()
                        meta["space"] = "RAS"
        if len(arrays) == 1:
            return arrays[0], meta
        meta["original_channel_dim"] = 0
        return np.stack(arrays, axis=0), meta


# --------------------------------------------------------------------------------------
# pairing and validation
# --------------------------------------------------------------------------------------
_LABEL_TAIL = re.compile(r"[_\-. ]?(labels?|masks?|seg(mentation)?|gt|groundtruth|annotations?)$", re.IGNORECASE)
_IMAGE_TAIL = re.compile(r"[_\-. ]?(images?|img|raw|em)$", re.IGNORECASE)


def _rel_stem(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return os.path.join(os.path.dirname(rel), _stem(rel))


def _names(paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" ... (+{len(paths) - limit} more)" if len(paths) > limit else "")


def pair_images_labels(
    image_dir: PathLike, label_dir: PathLike, image_h5_key: str | None = None, label_h5_key: str | None = None
) -> list[dict]:
    """Match images and labels by file stem (path relative to each folder, suffix dropped).

    ``a/vol1.tif`` pairs with ``a/vol1.tif``, ``a/vol1.h5`` or ``a/vol1.nii.gz``; when exact
    stems leave files unmatched, a trailing ``_label``/``_mask``/``_seg``/``_gt`` (labels) and
    ``_image``/``_img``/``_raw`` (images) is ignored.

    Args:
        image_dir, label_dir: the two folders (searched recursively).
        image_h5_key, label_h5_key: the HDF5 dataset of every HDF5 image / label (the bundle
            settings ``h5_image_key`` / ``h5_label_key``), added to their items as ``"image_key"``
            / ``"label_key"``; None: the default choice of the module docstring.

    Returns:
        ``[{"image": path, "label": path}, ...]`` in the images' order (plus ``"image_key"`` /
        ``"label_key"`` for HDF5 files when the keys are given).

    Raises:
        DatasetError: a folder is missing or empty, names are ambiguous, or some files have no
            partner (the message lists them).
    """
    image_dir, label_dir = os.fspath(image_dir), os.fspath(label_dir)
    images, labels = find_em_files(image_dir), find_em_files(label_dir)

    def index(paths: list[str], root: str, strip: re.Pattern | None) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in paths:
            s = _rel_stem(p, root)
            if strip is not None:
                s = os.path.join(os.path.dirname(s), strip.sub("", os.path.basename(s)) or os.path.basename(s))
            if s in out:
                raise _error(root, f"two files share the name '{s}': {out[s]} and {p}")
            out[s] = p
        return out

    img_idx, lab_idx = index(images, image_dir, None), index(labels, label_dir, None)
    if set(img_idx) != set(lab_idx):
        img_idx, lab_idx = index(images, image_dir, _IMAGE_TAIL), index(labels, label_dir, _LABEL_TAIL)
        if set(img_idx) != set(lab_idx):
            lonely_i = [os.path.relpath(p, image_dir) for s, p in img_idx.items() if s not in lab_idx]
            lonely_l = [os.path.relpath(p, label_dir) for s, p in lab_idx.items() if s not in img_idx]
            parts = []
            if lonely_i:
                parts.append(f"{len(lonely_i)} image(s) without a label in {label_dir}: {_names(lonely_i)}")
            if lonely_l:
                parts.append(f"{len(lonely_l)} label(s) without an image in {image_dir}: {_names(lonely_l)}")
            raise DatasetError(f"{image_dir}: images and labels do not match by name; " + "; ".join(parts))
    items = [{"image": img_idx[s], "label": lab_idx[s]} for s in img_idx]
    for item in items:
        for k, h5key in (("image", image_h5_key), ("label", label_h5_key)):
            if h5key and em_format(item[k]) == "hdf5":
                item[f"{k}_key"] = str(h5key)
    return items


def _check_image_values(path: str, arr: np.ndarray) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise _error(path, f"image holds {n} non-finite values (NaN or inf)")
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise _error(path, f"unsupported pixel type {arr.dtype}")


def _check_label_values(path: str, arr: np.ndarray, num_classes: int | None) -> None:
    if arr.dtype == bool:
        vmin, vmax = int(arr.min()), int(arr.max())
    elif np.issubdtype(arr.dtype, np.integer):
        vmin, vmax = int(arr.min()), int(arr.max())
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise _error(path, "label holds non-finite values (NaN or inf)")
        if not np.array_equal(arr, np.round(arr)):
            bad = arr[arr != np.round(arr)]
            raise _error(path, f"label holds non-integer values (e.g. {float(bad.flat[0]):g}); expected class indices 0, 1, 2, ...")
        vmin, vmax = int(arr.min()), int(arr.max())
    else:
        raise _error(path, f"label dtype {arr.dtype} is not numeric")
    if vmin < 0:
        raise _error(path, f"label holds negative values (min {vmin}); expected class indices 0, 1, 2, ...")
    if num_classes is not None and vmax >= int(num_classes):
        raise _error(
            path, f"label values up to {vmax} but num_classes is {int(num_classes)} (expected 0..{int(num_classes) - 1})"
        )


def validate_items(
    items: Iterable[Mapping | PathLike],
    num_classes: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    check_data: bool = True,
    h5_keys: Mapping[str, str] | None = None,
) -> None:
    """Check a dataset list once, before training, so a bad file costs seconds, not a run.

    Each distinct file is opened once (items from :func:`slice_items` that repeat a path are
    checked once). Headers give the shape checks; with ``check_data`` the pixels are read to
    find truncated files, non-finite image values and bad label values. Images smaller than a
    training crop are fine (the pipeline pads).

    Args:
        items: dicts with ``image_key`` (and optional ``label_key``, ``"<key>_key"`` HDF5 names)
            or bare image paths.
        num_classes: when given, label values must be ``< num_classes``.
        check_data: False checks headers only (for very large corpora).
        h5_keys: default HDF5 dataset per entry, e.g. ``{"image": "volume"}`` (as
            ``LoadEMSliced(h5_keys=...)``); an item's ``"<key>_key"`` wins.

    Raises:
        DatasetError: ``"<path>: <problem>"`` for the first unreadable/truncated file,
            image/label shape mismatch, label values ``>= num_classes``, negative or
            non-integer labels, 1D or 4D+ arrays, non-finite values, or an HDF5 file whose
            dataset is ambiguous (several, none with a known name: the message lists them).
    """
    seen: set[tuple] = set()
    h5_keys = dict(h5_keys or {})
    for n, item in enumerate(items):
        d = _as_item(item, image_key)
        if image_key not in d:
            raise DatasetError(f"item {n}: no '{image_key}' entry ({d})")
        img, lab = os.fspath(d[image_key]), d.get(label_key)
        img_key = d.get(f"{image_key}_key", h5_keys.get(image_key))
        lab_key = d.get(f"{label_key}_key", h5_keys.get(label_key))
        tag = (img, img_key, None if lab is None else os.fspath(lab), lab_key)
        if tag in seen:
            continue
        seen.add(tag)
        img_shape = em_shape(img, img_key, "image")
        if (img, img_key, "image") not in seen:
            seen.add((img, img_key, "image"))
            if check_data:
                _check_image_values(img, read_em(img, img_key, "image"))
        if lab is None:
            continue
        lab = os.fspath(lab)
        lab_shape = em_shape(lab, lab_key, "label")
        if tuple(lab_shape) != tuple(img_shape):
            raise _error(lab, f"label shape {tuple(lab_shape)} differs from image shape {tuple(img_shape)} of {img}")
        if (lab, lab_key, "label") not in seen:
            seen.add((lab, lab_key, "label"))
            if check_data:
                _check_label_values(lab, read_em(lab, lab_key, "label"), num_classes)


def no_foreground_error(where: PathLike, n_pixels: int, n_files: int | None = None, hint: str | None = None) -> DatasetError:
    """The one-line refusal of training labels without any foreground pixel (every value 0).

    Nothing to learn: the run would end with a model that predicts background everywhere. Usually
    a mask convention (foreground stored as a value the preparation did not map to a class) or
    empty annotation files. Shared by :func:`check_foreground` (bundles) and
    ``custom.prepare`` (dataset preparation).
    """
    files = f" of {n_files} file(s)" if n_files is not None else ""
    hint = hint or "label the foreground as class 1, 2, ... (0 is background)"
    return _error(where, f"no training label holds a foreground class (all {int(n_pixels)} pixels{files} are 0); {hint}")


def check_foreground(
    items: Iterable[Mapping | PathLike], label_key: str = "label", h5_keys: Mapping[str, str] | None = None
) -> int:
    """Refuse a training set whose labels hold no foreground class at all, before training.

    Each distinct label file is read once, in order, until one holds a non-zero value (so a normal
    dataset costs one label file). Items without a label are skipped.

    Args:
        items: the training items (dicts with ``label_key``, optional ``"<label_key>_key"`` HDF5
            names), as ``train#dataset#data``; or bare label paths.
        label_key: the items' label entry.
        h5_keys: default HDF5 dataset per entry (an item's ``"<label_key>_key"`` wins).

    Returns:
        the number of foreground pixels found in the first label that has any.

    Raises:
        DatasetError: ``"<label folder>: no training label holds a foreground class (all N pixels
            of K file(s) are 0); ..."``, naming the folder that holds the labels (the file when
            there is one).
    """
    h5_keys = dict(h5_keys or {})
    seen: set[tuple] = set()
    paths: list[str] = []
    n_pixels = 0
    for item in items:
        d = _as_item(item, label_key)
        if d.get(label_key) is None:
            continue
        path = os.fspath(d[label_key])
        key = d.get(f"{label_key}_key", h5_keys.get(label_key))
        if (path, key) in seen:
            continue
        seen.add((path, key))
        arr = read_em(path, key, "label")
        found = int(np.count_nonzero(arr))
        if found:
            return found
        n_pixels += int(arr.size)
        paths.append(path)
    if not paths:
        return 0
    where = paths[0] if len(paths) == 1 else os.path.commonpath([os.path.abspath(p) for p in paths])
    raise no_foreground_error(where, n_pixels, len(paths))
