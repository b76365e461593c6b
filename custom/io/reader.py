"""MONAI ``ImageReader`` for every format of the :mod:`custom.io.formats` registry."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

from .errors import PathLike, dataset_error
from .formats import FORMATS, em_format, format_of, read_em

__all__ = ["EMReader"]


class _EMHandle:
    """What :meth:`EMReader.read` returns: a checked path; pixels are read in ``get_data``."""

    def __init__(self, path: str, key: str | None, role: str) -> None:
        self.path, self.key, self.role = path, key, role

    def __repr__(self) -> str:
        return f"_EMHandle({self.path!r}, key={self.key!r})"


class EMReader(ImageReader):
    """MONAI ``ImageReader`` for every EM format of ``custom.io`` (TIFF stacks, PNG/JPEG,
    folders of slices, HDF5, NIfTI, NRRD, MRC, MetaImage), for ``LoadImage(d)(reader=EMReader())``.

    The loaded array is ``(Y, X)`` or ``(Z, Y, X)`` in the file's dtype (as :func:`custom.io.read_em`);
    meta data hold ``spatial_shape``, ``filename_or_obj``, ``original_channel_dim`` =
    ``"no_channel"`` (so ``EnsureChannelFirst`` adds the channel), ``em_format``, ``em_dtype`` and
    what the format adds (NIfTI: ``affine``/``original_affine`` re-ordered to the (z, y, x) axes).
    Several files are stacked on a new first (channel) axis, as MONAI's readers do. Read problems
    raise :class:`custom.io.DatasetError` from ``get_data`` (``read`` only checks that each path
    exists and has a supported type).

    Args:
        key: HDF5 dataset name (default: see :mod:`custom.io.volumes`).
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
                raise dataset_error(path, "no such file or folder")
            format_of(path)  # refuses an unsupported type
            handles.append(_EMHandle(path, kwargs.get("key", self.key), kwargs.get("role", self.role)))
        return handles if len(handles) > 1 else handles[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        handles = list(img) if isinstance(img, (list, tuple)) else [img]
        arrays, meta = [], {}
        for h in handles:
            arr = read_em(h.path, h.key, h.role)
            if arrays and arr.shape != arrays[0].shape:
                raise dataset_error(h.path, f"shape {arr.shape} differs from {handles[0].path} {arrays[0].shape}; cannot stack")
            arrays.append(arr)
            if not meta:
                fmt = FORMATS[em_format(h.path)]
                meta = {
                    "spatial_shape": np.asarray(arr.shape),
                    "original_channel_dim": "no_channel",
                    "filename_or_obj": h.path,
                    "em_format": fmt.name,
                    "em_dtype": str(arr.dtype),  # MONAI may convert it on loading (uint16 -> int32)
                    **(fmt.meta(h.path, arr.ndim) if fmt.meta is not None else {}),
                }
        if len(arrays) == 1:
            return arrays[0], meta
        meta["original_channel_dim"] = 0
        return np.stack(arrays, axis=0), meta
