"""Format back-ends for volume files: HDF5 (h5py), NIfTI (nibabel), NRRD (pynrrd) and MRC (mrcfile).
Each function has the signature its slot in :class:`custom.io.formats.Format` asks for.

HDF5 files hold several datasets; ``key`` names one. Without a key, images use the first of
:data:`IMAGE_H5_KEYS`, labels the first of :data:`LABEL_H5_KEYS`; a file with a single dataset uses
it. A file with several datasets and none of those names is refused with the list of its datasets
(never guessed: a file with ``volume`` and ``label`` would otherwise train on the label as the image).
NIfTI stores (x, y, z): arrays are returned as (z, y, x), and written back as the reverse.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import PLANE_AXIS
from .errors import DatasetError, dataset_error, short_list

IMAGE_H5_KEYS = ("raw", "volumes/raw", "data", "image", "images", "em")
LABEL_H5_KEYS = ("label", "labels", "volumes/labels", "seg", "segmentation", "mask")


# --------------------------------------------------------------------------------------
# HDF5
# --------------------------------------------------------------------------------------
def _h5_names(f) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _h5_ambiguous(path: str, names: list[str], role: str) -> DatasetError:
    """Several datasets, none with a known name for ``role``: which one is meant is the user's call."""
    other = LABEL_H5_KEYS if role == "image" else IMAGE_H5_KEYS
    example = next((n for n in names if n.lower() not in other and n.rsplit("/", 1)[-1].lower() not in other), names[0])
    known = IMAGE_H5_KEYS if role == "image" else LABEL_H5_KEYS
    problem = (
        f"HDF5 file holds {len(names)} datasets ({short_list(names)}) and none has a known {role} name "
        f"({', '.join(known)}); choose the {role} dataset: --h5_{role}_key {example} (retina_finetune), "
        f"or \"{role}_key\": \"{example}\" in the dataset item"
    )
    return dataset_error(path, problem, 480)


def _h5_dataset(f, path: str, key: str | None, role: str):
    import h5py

    if key:
        obj = f.get(key)
        if not isinstance(obj, h5py.Dataset):
            raise dataset_error(path, f"has no dataset '{key}' (datasets: {', '.join(_h5_names(f)) or 'none'})")
        return obj
    known = IMAGE_H5_KEYS if role == "image" else LABEL_H5_KEYS
    for name in known:
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            return obj
    names = _h5_names(f)
    if not names:
        raise dataset_error(path, "HDF5 file holds no dataset")
    if len(names) == 1:
        return f[names[0]]
    raise _h5_ambiguous(path, names, role)


def read_h5(path: str, key: str | None = None, role: str = "image", index: tuple | None = None) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        ds = _h5_dataset(f, path, key, role)
        return ds[()] if index is None else ds[index]


def h5_shape(path: str, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    import h5py

    with h5py.File(path, "r") as f:
        return tuple(_h5_dataset(f, path, key, role).shape)


def h5_slice(path: str, key: str | None, role: str, plane: str, index: int, shape: tuple) -> np.ndarray | None:
    """One slice of a (Z, Y, X) or (Z, Y, X, 1) dataset (the trailing channel dropped), else None."""
    raw_shape = h5_shape(path, key, role)
    if tuple(raw_shape[:3]) != tuple(shape) or not all(s == 1 for s in raw_shape[3:]):
        return None
    sel = [slice(None)] * 3
    sel[PLANE_AXIS[plane]] = index
    raw = read_h5(path, key, role, tuple(sel))
    raw = raw.reshape(raw.shape[:2]) if raw.ndim > 2 and all(s == 1 for s in raw.shape[2:]) else raw
    return raw if raw.ndim == 2 else None


def _h5_put(f, arr: np.ndarray, key: str) -> None:
    if key in f:
        del f[key]
    chunks = (1, *arr.shape[1:]) if arr.ndim == 3 and arr[0].nbytes <= 2**22 else True
    f.create_dataset(key, data=arr, compression="gzip", compression_opts=4, chunks=chunks)


def write_h5(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None) -> None:
    """A new file holding dataset ``key`` (default ``"label"``), gzip, chunked by slice."""
    import h5py

    with h5py.File(tmp, "w") as f:
        _h5_put(f, arr, key or "label")


def update_h5(path: Path, arr: np.ndarray, key: str | None = None) -> None:
    """Replace (or add) dataset ``key`` in an existing file, keeping its other datasets."""
    import h5py

    with h5py.File(path, "a") as f:
        _h5_put(f, arr, key or "label")


# --------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------
def _nifti_image(path: str):
    import nibabel as nib

    return nib.load(path)


def read_nifti(path: str, key: str | None = None, role: str = "image") -> np.ndarray:
    # NIfTI stores (x, y, z); reversing all axes gives (z, y, x), and writing .T back restores it.
    return np.asanyarray(_nifti_image(path).dataobj).T


def nifti_shape(path: str, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    return tuple(int(s) for s in _nifti_image(path).shape[::-1])


def nifti_slice(path: str, key: str | None, role: str, plane: str, index: int, shape: tuple) -> np.ndarray | None:
    proxy = _nifti_image(path).dataobj
    if len(proxy.shape) != 3:
        return None
    sel = [slice(None)] * 3
    sel[2 - PLANE_AXIS[plane]] = index  # NIfTI axes are reversed
    return np.asanyarray(proxy[tuple(sel)]).T


def nifti_meta(path: str, ndim: int) -> dict[str, Any]:
    """``affine``/``original_affine`` re-expressed for the reversed (z, y, x) / (y, x) array axes."""
    try:
        aff = np.asarray(_nifti_image(path).affine, dtype=np.float64)
    except Exception:
        return {}
    aff = aff[:, [2, 1, 0, 3] if ndim == 3 else [1, 0, 2, 3]]
    return {"affine": aff, "original_affine": aff.copy(), "space": "RAS"}


def write_nifti(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None) -> None:
    """Stored (x, y, z) so that reading gives the array back; affine and header from a NIfTI ``reference``."""
    import nibabel as nib

    data = arr.T
    if data.dtype == bool:
        data = data.astype(np.uint8)
    elif data.dtype in (np.int64, np.uint64):
        data = data.astype(np.int32 if data.size == 0 or (data.min() >= -(2**31) and data.max() < 2**31) else np.float64)
    affine, header = np.eye(4), None
    if reference is not None:
        ref = nib.load(os.fspath(reference))
        affine, header = ref.affine, ref.header.copy()
    img = nib.Nifti1Image(data, affine, header=header, dtype=data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, tmp)


# --------------------------------------------------------------------------------------
# NRRD
# --------------------------------------------------------------------------------------
def read_nrrd(path: str, key: str | None = None, role: str = "image") -> np.ndarray:
    import nrrd

    data, _ = nrrd.read(path, index_order="C")
    return data


def nrrd_shape(path: str, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    import nrrd

    header = nrrd.read_header(path)
    return tuple(int(s) for s in header["sizes"][::-1])


def write_nrrd(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None) -> None:
    """C-order data; the space fields of a NRRD ``reference`` are copied."""
    import nrrd

    header: dict[str, Any] = {}
    if reference is not None:
        ref = nrrd.read_header(os.fspath(reference))
        header = {k: ref[k] for k in ("space", "space directions", "space origin", "space units") if k in ref}
    data = arr.astype(np.uint8) if arr.dtype == bool else arr
    nrrd.write(os.fspath(tmp), data, header=header, index_order="C")


# --------------------------------------------------------------------------------------
# MRC
# --------------------------------------------------------------------------------------
@contextmanager
def _mrc(path: str):
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.mmap(path, mode="r", permissive=False) as m:
            yield m


def read_mrc(path: str, key: str | None = None, role: str = "image") -> np.ndarray:
    with _mrc(path) as m:
        return np.array(m.data)


def mrc_shape(path: str, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    with _mrc(path) as m:
        return tuple(m.data.shape)


def mrc_slice(path: str, key: str | None, role: str, plane: str, index: int, shape: tuple) -> np.ndarray | None:
    with _mrc(path) as m:
        if m.data.ndim != 3:
            return None
        return np.array(np.take(m.data, index, axis=PLANE_AXIS[plane]))


def write_mrc(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None) -> None:
    import mrcfile

    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(arr.astype(np.uint8) if arr.dtype == bool else arr)
