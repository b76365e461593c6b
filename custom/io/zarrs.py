"""Format back-end for zarr stores (zarr v2 and v3, OME-Zarr / NGFF 0.4 and 0.5) through ``zarr``
and ``ome-zarr``; each function has the signature its slot in :class:`custom.io.formats.Format` asks for.

Which array of a store is the image: an OME-Zarr group's first (full-resolution) multiscales
dataset; a store that is one array; ``key`` (a path inside the group, e.g. ``"raw"``); else a
group's only array or its array with a known image/label name (as for HDF5). Voxel size, units
and axes come from the NGFF ``multiscales`` metadata (the dataset's scale times the multiscale's
own); a plain array has none. N5: zarr 3 has no N5 store (zarr 2's ``N5Store`` is gone), so an
``.n5`` folder is refused with a one-line hint to convert it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import dataset_error
from .lazy import Volume, ngff_unit
from .volumes import IMAGE_H5_KEYS, LABEL_H5_KEYS

__all__ = ["open_zarr", "read_zarr", "zarr_shape", "zarr_slice", "write_zarr", "ngff_metadata", "write_ngff"]


def _open(path: str):
    import zarr

    if path.lower().rstrip("/").endswith(".n5") or os.path.isfile(os.path.join(path, "attributes.json")):
        raise dataset_error(path, "N5 cannot be read with zarr 3 (no N5 store); convert it to zarr first, e.g. with "
                                  "tensorstore or zarr 2's N5Store")
    return zarr.open(path, mode="r")


def multiscales(attrs: Any) -> Optional[dict]:
    """The first NGFF ``multiscales`` entry of a group's attributes (0.4: top level; 0.5: under ``ome``)."""
    attrs = dict(attrs)
    ms = attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")
    return dict(ms[0]) if ms else None


def _scale(transforms: Any) -> Optional[list]:
    for t in transforms or []:
        if t.get("type") == "scale":
            return [float(s) for s in t["scale"]]
    return None


def ngff_metadata(ms: dict) -> tuple[str, Optional[tuple], Optional[tuple], tuple]:
    """(dataset path, spacing, units, axis names) of the full-resolution level of a multiscales entry."""
    level = ms["datasets"][0]
    axes = ms.get("axes") or []
    names = tuple(a["name"] if isinstance(a, dict) else str(a) for a in axes)
    units = tuple(ngff_unit(a.get("unit")) if isinstance(a, dict) else None for a in axes) or None
    scale = _scale(level.get("coordinateTransformations"))
    outer = _scale(ms.get("coordinateTransformations"))
    if scale is not None and outer is not None and len(outer) == len(scale):
        scale = [a * b for a, b in zip(scale, outer)]
    return str(level["path"]), (tuple(scale) if scale else None), units, names


def _pick_array(path: str, group: Any, key: Optional[str], role: str):
    import zarr

    if key:
        try:
            obj = group[key]
        except KeyError:
            obj = None
        if not isinstance(obj, zarr.Array):
            names = sorted(n for n, _ in group.arrays())
            raise dataset_error(path, f"has no array '{key}' (arrays: {', '.join(names) or 'none'})")
        return obj
    arrays = dict(group.arrays())
    for name in IMAGE_H5_KEYS if role == "image" else LABEL_H5_KEYS:
        if name in arrays:
            return arrays[name]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    if not arrays:
        raise dataset_error(path, "zarr group holds no array (and no OME-Zarr multiscales metadata)")
    raise dataset_error(path, f"zarr group holds {len(arrays)} arrays ({', '.join(sorted(arrays))}); choose one: "
                              f"--h5_{role}_key NAME (retina_finetune)")


def open_zarr(path: str, key: Optional[str] = None, role: str = "image") -> Volume:
    """The image array of a zarr store, lazily, with its NGFF voxel size (see the module docstring)."""
    import zarr

    node = _open(path)
    spacing = units = None
    axes: tuple = ()
    if isinstance(node, zarr.Array):
        arr = node
    else:
        ms = multiscales(node.attrs)
        if ms is not None and not key:
            level, spacing, units, axes = ngff_metadata(ms)
            arr = node[level]
        else:
            arr = _pick_array(path, node, key, role)
    attrs = {"axes": axes} if axes else {}
    return Volume(os.fspath(path), arr, spacing=spacing, units=units, attrs=attrs, fmt="zarr")


def read_zarr(path: str, key: Optional[str] = None, role: str = "image") -> np.ndarray:
    return np.asarray(open_zarr(path, key, role).array[...])


def zarr_shape(path: str, key: Optional[str] = None, role: str = "image") -> tuple[int, ...]:
    return tuple(open_zarr(path, key, role).array.shape)


def zarr_slice(path: str, key: Optional[str], role: str, plane: str, index: int, shape: tuple) -> np.ndarray | None:
    from ..utils import PLANE_AXIS

    vol = open_zarr(path, key, role)
    if vol.shape != tuple(shape) or vol.ndim != 3:
        return None
    sel: list[Any] = [slice(None)] * 3
    sel[PLANE_AXIS[plane]] = index
    return vol[tuple(sel)]


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _axes(ndim: int, units: Optional[tuple]) -> list[dict]:
    names = ("z", "y", "x")[-ndim:]
    out = []
    for k, name in enumerate(names):
        axis = {"name": name, "type": "space"}
        if units is not None and units[k]:
            axis["unit"] = units[k]
        out.append(axis)
    return out


def write_ngff(group: Any, ndim: int, spacing: Optional[tuple], units: Optional[tuple], array_path: str = "0") -> None:
    """OME-Zarr multiscales metadata (one level, ``array_path``) through ``ome-zarr``: NGFF 0.5 for a zarr
    v3 group, 0.4 for v2; scale = ``spacing`` (1 per axis when unknown), axis units where known."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    fmt = FormatV05() if group.metadata.zarr_format == 3 else FormatV04()
    scale = [float(s) for s in spacing] if spacing is not None else [1.0] * ndim
    datasets = [{"path": array_path, "coordinateTransformations": [{"type": "scale", "scale": scale}]}]
    write_multiscales_metadata(group, datasets, fmt=fmt, axes=_axes(ndim, units))


def create_ngff(path: Path | str, shape: tuple, dtype: Any, chunks: tuple, spacing: Optional[tuple] = None,
                units: Optional[tuple] = None, zarr_format: int = 3) -> Any:
    """A new OME-Zarr group at ``path`` with an empty array ``0`` of ``shape`` / ``chunks`` (zstd through
    zarr's default codecs) and its NGFF metadata; returns the array to write into."""
    import zarr

    group = zarr.open_group(os.fspath(path), mode="w-", zarr_format=zarr_format)
    arr = group.create_array("0", shape=tuple(int(s) for s in shape), chunks=tuple(int(c) for c in chunks),
                             dtype=np.dtype(dtype), fill_value=0)
    write_ngff(group, len(shape), spacing, units)
    return arr


def write_zarr(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None,
               spacing=None, units=None, attrs=None) -> None:
    """A whole array as OME-Zarr (NGFF 0.5), chunked by section, with ``spacing`` / ``units``."""
    data = arr.astype(np.uint8) if arr.dtype == bool else arr
    chunks = (1, *data.shape[1:]) if data.ndim == 3 else data.shape
    out = create_ngff(tmp, data.shape, data.dtype, chunks, spacing, units)
    out[...] = data
