"""The format registry of ``custom.io``, and reading whole images and volumes through it.

Conventions of the whole package:

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
- HDF5 datasets: see :mod:`custom.io.volumes` (``key`` names one; dataset items may carry
  ``"<key>_key"``, e.g. ``"image_key": "volume"``).
- Every problem a user can cause with a file raises :class:`~custom.io.errors.DatasetError`
  with a one-line message ``"<path>: <problem>"``.
- Nothing reads pixel data unless asked: :func:`custom.io.find_em_files` lists names,
  :func:`em_shape` reads headers only, :class:`custom.io.LoadEMSliced` reads one slice.

Each format is one :class:`Format` record in :data:`FORMATS` (its suffixes and its read / shape /
read_slice / write functions, from :mod:`~custom.io.images`, :mod:`~custom.io.volumes`,
:mod:`~custom.io.metaimage`, and the folder of slices defined here); :func:`em_format` finds a
path's record by its suffix, and readers and writers call the record's functions (adding a format
is adding a record).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from monai.utils import convert_to_numpy

from ..utils import natural_key
from . import images, metaimage, volumes, zarrs
from .errors import DatasetError, PathLike, dataset_error, exc_text
from .lazy import Volume, kept_axes

__all__ = ["FORMATS", "Format", "em_format", "em_shape", "open_volume", "read_em", "to_unit_range", "voxel_of"]


@dataclass(frozen=True)
class Format:
    """One file format: what it is called, which suffixes it owns, and how it is read and written.

    Attributes:
        name: the registry key (``em_format``'s answer, ``meta["em_format"]`` of ``EMReader``).
        title: how messages name it (``"cannot read TIFF ..."``).
        suffixes: lower-case file suffixes (``.nii.gz`` counts as one).
        read: ``(path, key, role) -> array`` as stored (dropping length-1 axes is the caller's).
        shape: ``(path, key, role) -> shape`` from the header only.
        read_slice: ``(path, key, role, plane, index, shape) -> 2D array or None`` reading one
            slice only; None (or no function): the caller reads the volume and takes the slice.
        write: ``(tmp, array, *, dest, reference, key, compression)`` writes ``tmp`` (renamed onto
            ``dest`` by :func:`custom.io.write_em`); ``reference`` is a file of the same format or None.
        update: ``(path, array, key)`` writes into an existing file, keeping the rest (HDF5).
        meta: ``(path, ndim) -> dict`` of extra ``EMReader`` meta data (NIfTI's affine).
        out_ext: the suffix of outputs written in this format (inference keeps an input's format).
        always_2d: its files are 2D images (no header needed to know it).
        slice_file: may be a slice of a folder volume.
        open: ``(path, key, role) -> Volume`` (:class:`custom.io.lazy.Volume`) reading pixels only when
            sliced, with the voxel size the file records; None: :func:`open_volume` reads the whole array.
        store: its files are folders (zarr), written through a temporary folder.
        voxel: ``write`` takes ``spacing``, ``units`` and ``attrs`` keywords (the voxel size it records).
    """

    name: str
    title: str
    suffixes: tuple[str, ...]
    read: Callable[..., np.ndarray]
    shape: Callable[..., tuple]
    read_slice: Optional[Callable[..., Optional[np.ndarray]]] = None
    write: Optional[Callable[..., None]] = None
    update: Optional[Callable[..., None]] = None
    meta: Optional[Callable[[str, int], dict]] = None
    out_ext: str = ""
    always_2d: bool = False
    slice_file: bool = False
    open: Optional[Callable[..., Volume]] = None
    store: bool = False
    voxel: bool = False


# --------------------------------------------------------------------------------------
# a folder of per-slice 2D images
# --------------------------------------------------------------------------------------
def is_hidden(name: str) -> bool:
    return name.startswith(".")


def slice_files(folder: PathLike) -> list[str]:
    """The per-slice 2D image files of a folder volume, in natural order."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise dataset_error(folder, f"cannot list folder ({exc_text(exc)})") from None
    files = [os.path.join(folder, n) for n in names if not is_hidden(n) and is_slice_file(n)]
    if not files:
        raise dataset_error(folder, "folder holds no 2D image slices (png/jpg/tif)")
    return sorted(files, key=lambda p: natural_key(os.path.basename(p)))


def _slice_shape(path: str) -> tuple[int, ...]:
    shape = em_shape(path)
    if len(shape) != 2:
        raise dataset_error(path, f"a slice of a folder volume must be 2D, got shape {shape}")
    return shape


def _read_folder(folder: str, key: str | None = None, role: str = "image") -> np.ndarray:
    files = slice_files(folder)
    first = read_em(files[0])
    if first.ndim != 2:
        raise dataset_error(files[0], f"a slice of a folder volume must be 2D, got shape {first.shape}")
    out = np.empty((len(files), *first.shape), dtype=first.dtype)
    out[0] = first
    for i, f in enumerate(files[1:], start=1):
        sl = read_em(f)
        if sl.shape != first.shape:
            raise dataset_error(f, f"slice shape {sl.shape} differs from the folder's first slice {first.shape}")
        out[i] = sl
    return out


def _folder_shape(folder: str, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    files = slice_files(folder)
    return (len(files), *_slice_shape(files[0]))


def _folder_slice(folder: str, key: str | None, role: str, plane: str, index: int, shape: tuple) -> np.ndarray | None:
    return read_em(slice_files(folder)[index]) if plane == "xy" else None


# --------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("tiff", "TIFF", (".tif", ".tiff"), images.read_tiff, images.tiff_shape, images.tiff_slice,
               images.write_tiff, out_ext=".tif", slice_file=True, open=images.open_tiff, voxel=True),
        Format("pil", "image", (".png", ".jpg", ".jpeg"), images.read_pil, images.pil_shape, None, images.write_png,
               out_ext=".png", always_2d=True, slice_file=True),
        Format("hdf5", "HDF5", (".h5", ".hdf5"), volumes.read_h5, volumes.h5_shape, volumes.h5_slice, volumes.write_h5,
               update=volumes.update_h5, out_ext=".h5", open=volumes.open_h5, voxel=True),
        Format("nifti", "NIfTI", (".nii", ".nii.gz"), volumes.read_nifti, volumes.nifti_shape, volumes.nifti_slice,
               volumes.write_nifti, meta=volumes.nifti_meta, out_ext=".nii.gz", open=volumes.open_nifti,
               voxel=True),
        Format("zarr", "zarr", (".zarr", ".n5"), zarrs.read_zarr, zarrs.zarr_shape, zarrs.zarr_slice, zarrs.write_zarr,
               out_ext=".ome.zarr", open=zarrs.open_zarr, store=True, voxel=True),
        Format("nrrd", "NRRD", (".nrrd",), volumes.read_nrrd, volumes.nrrd_shape, None, volumes.write_nrrd,
               out_ext=".nrrd"),
        Format("mrc", "MRC", (".mrc", ".mrcs", ".rec"), volumes.read_mrc, volumes.mrc_shape, volumes.mrc_slice,
               volumes.write_mrc, out_ext=".mrc"),
        Format("itk", "MetaImage/GIPL", (".mha", ".mhd", ".gipl"), metaimage.read_itk, metaimage.itk_shape, None,
               metaimage.write_itk, out_ext=".mha"),
        Format("dir", "folder", (), _read_folder, _folder_shape, _folder_slice, None),
    )
}
#: suffix (lower case) -> format name
SUFFIXES: dict[str, str] = {s: f.name for f in FORMATS.values() for s in f.suffixes}


def name_format(name: str) -> str | None:
    """Format of a file name from its suffix alone (no file-system access)."""
    name = name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    return SUFFIXES.get(os.path.splitext(name)[1])


def is_slice_file(name: str) -> bool:
    """Whether a file of this name may be a slice of a folder volume (png/jpg/tif)."""
    fmt = name_format(name)
    return fmt is not None and FORMATS[fmt].slice_file


def em_format(path: PathLike) -> str | None:
    """Format name of ``path`` from its suffix (a key of :data:`FORMATS`: ``"tiff"``, ``"pil"``
    (png/jpg), ``"hdf5"``, ``"nifti"``, ``"nrrd"``, ``"mrc"``, ``"itk"`` (mha/mhd/gipl), ``"zarr"``
    (a ``.zarr`` store folder, OME-Zarr included)), ``"dir"`` for any other existing folder, else ``None``."""
    path = os.fspath(path)
    fmt = name_format(os.path.basename(path.rstrip("/\\")))
    if os.path.isdir(path):
        return fmt if fmt is not None and FORMATS[fmt].store else "dir"
    return fmt


def supported() -> str:
    """The supported suffixes, for messages."""
    return ", ".join(sorted(SUFFIXES))


def format_of(path: str) -> Format:
    """The :class:`Format` of ``path``; ``DatasetError`` for an unsupported type."""
    fmt = em_format(path)
    if fmt is None:
        raise dataset_error(path, f"unsupported file type (supported: {supported()} or a folder of slices)")
    return FORMATS[fmt]


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def native(arr: np.ndarray) -> np.ndarray:
    """``arr`` in native byte order."""
    arr = np.asarray(arr)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def squeeze_extra(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape a stored array is read as (see the module docstring).

    Trailing length-1 axes (a channel of one) are dropped down to two axes: ``(Y, X, 1) -> (Y, X)``,
    ``(Z, Y, X, 1) -> (Z, Y, X)``. Then, while more than three axes are left, other length-1 axes,
    first ones first: ``(1, Z, Y, X) -> (Z, Y, X)``, ``(Z, 1, Y, X) -> (Z, Y, X)``. Three axes with a
    leading 1 stay: ``(1, Y, X)`` is a one-slice volume.
    """
    return tuple(shape[i] for i in kept_axes(shape))


def _check_ndim(path: PathLike, shape: Sequence[int]) -> None:
    if len(shape) not in (2, 3):
        raise dataset_error(
            path, f"{len(shape)}D array of shape {tuple(shape)}; expected a 2D image (Y, X) or a 3D volume (Z, Y, X)"
        )
    if 0 in shape:
        raise dataset_error(path, f"empty array of shape {tuple(shape)}")


@contextmanager
def wrap_errors(path: PathLike, action: str = "cannot read"):
    """Turn any library exception into a one-line DatasetError naming ``path``."""
    if not os.path.exists(path):
        raise dataset_error(path, "no such file or folder")
    try:
        yield
    except (DatasetError, MemoryError):
        raise
    except Exception as exc:  # tifffile / PIL / h5py / nibabel / nrrd / mrcfile / ITK errors
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise dataset_error(path, f"{action}: empty file (0 bytes)") from None
        fmt = em_format(path)
        what = FORMATS[fmt].title if fmt not in (None, "dir") else "file"
        raise dataset_error(path, f"{action} {what} (corrupt or truncated? {exc_text(exc)})") from None


def _read_raw(path: str, key: str | None, role: str) -> np.ndarray:
    """The array as the format stores it (the one place :func:`read_em` touches pixels)."""
    return format_of(path).read(path, key, role)


def read_em(path: PathLike, key: str | None = None, role: str = "image") -> np.ndarray:
    """Read a whole EM image or volume.

    Args:
        path: a file of a supported format, or a folder of per-slice 2D images.
        key: HDF5 dataset name (see :mod:`custom.io.volumes` for the default).
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
    with wrap_errors(path):
        arr = native(_read_raw(path, key, role))
        shape = squeeze_extra(arr.shape)
        if shape != arr.shape:
            arr = arr.reshape(shape)
    _check_ndim(path, arr.shape)
    return arr


def em_shape(path: PathLike, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    """Shape that :func:`read_em` would return, from headers only (tifffile pages, HDF5
    dataset, NIfTI/NRRD/MRC/MetaImage headers, PIL size; a folder: slice count and first slice).

    Raises:
        DatasetError: as :func:`read_em`, for problems visible in the header.
    """
    path = os.fspath(path)
    with wrap_errors(path):
        shape = squeeze_extra(format_of(path).shape(path, key, role))
    _check_ndim(path, shape)
    return tuple(int(s) for s in shape)


def open_volume(path: PathLike, key: str | None = None, role: str = "image") -> Volume:
    """Open an image or volume without reading its pixels where the format allows it.

    zarr / OME-Zarr, HDF5 and TIFF (memory-mapped when uncompressed and contiguous, else through
    tifffile's zarr view) are read only where sliced; other formats are read whole (``lazy`` False).
    Voxel size: NGFF multiscales scale and units, HDF5 ``element_size_um`` / ``resolution``, ImageJ
    ``spacing`` and TIFF resolution tags, NIfTI zooms. Use it as a context manager (HDF5 and TIFF
    keep a file handle).

    Raises:
        DatasetError: as :func:`read_em`.
    """
    path = os.fspath(path)
    fmt = format_of(path)
    with wrap_errors(path):
        vol = fmt.open(path, key, role) if fmt.open is not None else None
        if vol is None:
            vol = Volume(path, read_em(path, key, role), lazy=False, fmt=fmt.name)
    try:
        _check_ndim(path, vol.shape)
    except DatasetError:
        vol.close()
        raise
    vol.fmt = fmt.name
    return vol


def voxel_of(path: PathLike, key: str | None = None, role: str = "image") -> dict:
    """``{"spacing", "units", "attrs", "format"}`` of a file whose format opens lazily (headers only); ``{}``
    for the others, or when the file cannot be opened (a writer then records no voxel size)."""
    path = os.fspath(path)
    fmt = FORMATS.get(em_format(path) or "")
    if fmt is None or fmt.open is None:
        return {}
    try:
        with open_volume(path, key, role) as vol:
            return {"spacing": vol.spacing, "units": vol.units, "attrs": dict(vol.attrs), "format": fmt.name}
    except DatasetError:
        return {}


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
