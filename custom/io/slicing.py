"""2D slices of EM images and volumes: one slice read on its own (:func:`read_em_slice`), dataset
items expanded into one item per slice (:func:`slice_items`), the MONAI transform reading such an
item (:class:`LoadEMSliced`) and the ``CacheDataset`` over the slices of whole items
(:class:`SliceDataset`)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

from ..utils import PLANE_AXIS, PLANES, plane_list
from .errors import DatasetError, PathLike, dataset_error
from .formats import FORMATS, em_format, em_shape, native, read_em, to_unit_range, wrap_errors

__all__ = ["LoadEMSliced", "SliceDataset", "read_em_slice", "slice_items"]


def as_item(item: Any, key: str) -> dict:
    """A dataset item as a dict: a bare path becomes ``{key: path}``."""
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, (str, os.PathLike)):
        return {key: os.fspath(item)}
    raise TypeError(f"a dataset item is a path or a dict, got {type(item).__name__}")


def _check_plane(path: PathLike, shape: Sequence[int], plane: str, index: int) -> None:
    if plane not in PLANE_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    if len(shape) == 2:
        if plane != "xy" or index not in (-1, 0):
            raise dataset_error(path, f"2D image of shape {tuple(shape)} has no {plane} slice {index}")
        return
    n = shape[PLANE_AXIS[plane]]
    if not 0 <= index < n:
        raise dataset_error(path, f"{plane} slice index {index} out of range for a volume of shape {tuple(shape)}")


def _take(vol: np.ndarray, plane: str, index: int) -> np.ndarray:
    if vol.ndim == 2:
        return vol
    return np.take(vol, index, axis=PLANE_AXIS[plane])


def read_em_slice(
    path: PathLike, plane: str = "xy", index: int = -1, key: str | None = None, role: str = "image"
) -> np.ndarray:
    """Read one 2D slice, touching only that slice where the format allows.

    Args:
        path, key, role: as :func:`custom.io.read_em`.
        plane: ``"xy"`` gives ``vol[index]`` (Y, X); ``"xz"`` gives ``vol[:, index]`` (Z, X);
            ``"yz"`` gives ``vol[:, :, index]`` (Z, Y).
        index: slice number along that plane's normal; ``-1`` (or 0) for a 2D image.

    Returns:
        the 2D slice, same dtype and gray conversion as :func:`custom.io.read_em`. Partial reads
        where the format's ``read_slice`` allows: TIFF stack pages (xy), HDF5 and MRC (all planes),
        NIfTI (all planes), folders (xy); other cases read the whole volume.
    """
    path = os.fspath(path)
    shape = em_shape(path, key, role)
    _check_plane(path, shape, plane, index)
    if len(shape) == 2:
        return read_em(path, key, role)
    fmt = FORMATS[em_format(path)]
    out = None
    if fmt.read_slice is not None:
        with wrap_errors(path):
            out = fmt.read_slice(path, key, role, plane, index, shape)
    if out is None:
        return _take(read_em(path, key, role), plane, index)
    return native(out)


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
    wanted = plane_list(planes)
    out: list[dict] = []
    for item in items:
        d = as_item(item, main)
        if main not in d:
            raise DatasetError(f"item {d}: no '{main}' entry")
        if "plane" in d and "index" in d:  # already one slice
            out.append(d)
            continue
        path = d[main]
        fmt = em_format(path)
        if fmt is not None and FORMATS[fmt].always_2d:
            shape: tuple[int, ...] = (0, 0)
        else:
            shape = em_shape(path, d.get(f"{main}_key"), "image")
        if len(shape) == 2:
            out.append({**d, "plane": "xy", "index": -1})
            continue
        for plane in wanted:
            out.extend({**d, "plane": plane, "index": i} for i in range(shape[PLANE_AXIS[plane]]))
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
            raise dataset_error(path, "label holds non-finite values (NaN or inf)")
        if not np.array_equal(arr, np.round(arr)):
            raise dataset_error(path, "label holds non-integer values; expected class indices 0, 1, 2, ...")
        return arr.astype(dtype)
    raise dataset_error(path, f"label dtype {arr.dtype} is not an integer type")


class LoadEMSliced(MapTransform):
    """Read the 2D slice named by a :func:`slice_items` item, channel-first.

    For each key the item's ``"plane"`` and ``"index"`` (defaults ``"xy"``, ``-1``) select
    the slice (see :func:`read_em_slice`); an optional ``"<key>_key"`` entry names the HDF5
    dataset. Output per key: ``(1, H, W)`` float32 in [0, 1] (:func:`custom.io.to_unit_range`) for
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
        scale: images as float32 in [0, 1] by their dtype (:func:`custom.io.to_unit_range`, the
            default), or False: their raw values as float32, for ``custom.intensity.MapIntensityd``
            to map as the dataset's intensity record says (what the bundles do).
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
        with wrap_errors(path):
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
