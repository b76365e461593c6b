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
from .lazy import Volume, ngff_unit

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


def h5_spacing(attrs) -> tuple[tuple | None, tuple | None]:
    """(spacing, units) from HDF5 attributes: ``element_size_um`` (ilastik, Fiji; micrometers) or
    ``resolution`` (CREMI; nanometers), one value per axis."""
    for name, unit in (("element_size_um", "micrometer"), ("resolution", "nanometer")):
        if name in attrs:
            values = np.atleast_1d(np.asarray(attrs[name], dtype=np.float64))
            return tuple(float(v) for v in values), (unit,) * len(values)
    return None, None


def open_h5(path: str, key: str | None = None, role: str = "image") -> Volume:
    """The dataset, read where sliced; its attributes (copied by writers) and voxel size."""
    import h5py

    f = h5py.File(path, "r")
    try:
        ds = _h5_dataset(f, path, key, role)
        attrs = dict(ds.attrs)
        spacing, units = h5_spacing(attrs)
    except BaseException:
        f.close()
        raise
    return Volume(path, ds, spacing=spacing, units=units, attrs=attrs, fmt="hdf5", closer=f.close)


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


def h5_chunks(shape: tuple, itemsize: int) -> tuple | bool:
    """One section per chunk when a section is at most 4 MiB, else h5py's choice."""
    return (1, *shape[1:]) if len(shape) == 3 and int(np.prod(shape[1:])) * itemsize <= 2**22 else True


def h5_attrs(ds, spacing=None, units=None, attrs=None) -> None:
    """Copy ``attrs`` (an HDF5 input's dataset attributes) onto ``ds``; add ``element_size_um`` from
    ``spacing`` when they hold no voxel size."""
    from .lazy import to_unit

    for k, v in (attrs or {}).items():
        ds.attrs[k] = v
    if spacing is not None and "element_size_um" not in ds.attrs and "resolution" not in ds.attrs:
        um = to_unit(spacing, units or (None,) * len(spacing), "micrometer")
        if um is not None:
            ds.attrs["element_size_um"] = np.asarray(um, dtype=np.float64)


def _h5_put(f, arr: np.ndarray, key: str, **voxel) -> None:
    if key in f:
        del f[key]
    ds = f.create_dataset(key, data=arr, compression="gzip", compression_opts=4,
                          chunks=h5_chunks(arr.shape, arr.dtype.itemsize))
    h5_attrs(ds, **voxel)


def write_h5(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None, **voxel) -> None:
    """A new file holding dataset ``key`` (default ``"label"``), gzip, chunked by slice; ``voxel``:
    ``spacing``, ``units``, ``attrs`` (see :func:`h5_attrs`)."""
    import h5py

    with h5py.File(tmp, "w") as f:
        _h5_put(f, arr, key or "label", **voxel)


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


class _Reversed:
    """A NIfTI array proxy (x, y, z) seen as (z, y, x): slicing reads only the region (nibabel's proxy)."""

    def __init__(self, proxy) -> None:
        self.proxy, self.shape, self.dtype = proxy, tuple(proxy.shape[::-1]), proxy.dtype

    def __getitem__(self, sel):
        sel = sel if isinstance(sel, tuple) else (sel,)
        sel = tuple(sel) + (slice(None),) * (len(self.shape) - len(sel))
        return np.asanyarray(self.proxy[sel[::-1]]).T


def open_nifti(path: str, key: str | None = None, role: str = "image") -> Volume:
    """The image through nibabel's array proxy (an uncompressed file is read where sliced; .nii.gz is
    decompressed up to the region) with its voxel size: the header's zooms and units, as (z, y, x)."""
    img = _nifti_image(path)
    arr = _Reversed(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: len(arr.shape)])[::-1]
    unit = ngff_unit(img.header.get_xyzt_units()[0])
    return Volume(path, arr, spacing=zooms, units=(unit,) * len(zooms), lazy=False, fmt="nifti")


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


def write_nifti(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None,
                spacing=None, units=None, attrs=None) -> None:
    """Stored (x, y, z) so that reading gives the array back; affine and header from a NIfTI ``reference``,
    else zooms (and the spatial unit, micrometers or millimeters) from ``spacing`` / ``units``."""
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
    unit = None
    if header is None and spacing is not None and units is not None and all(units):
        from .lazy import to_unit

        um = to_unit(spacing, units, "micrometer")  # NIfTI knows meter, mm and micron only
        spacing, unit = (um, "micron") if um is not None else (spacing, None)
    if header is None and spacing is not None and len(spacing) == arr.ndim:
        affine = np.diag([*[float(v) for v in spacing[::-1]], 1.0] if arr.ndim == 3 else [*spacing[::-1], 1.0, 1.0])
    img = nib.Nifti1Image(data, affine, header=header, dtype=data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if unit:
        img.header.set_xyzt_units(xyz=unit)
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
