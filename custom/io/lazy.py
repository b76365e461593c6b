"""A volume opened without reading its pixels (:class:`Volume`), and the voxel-size vocabulary.

Every format back-end that can read part of a file (zarr / OME-Zarr, HDF5, uncompressed or
tiled TIFF) returns a :class:`Volume` from its ``open`` slot of :class:`custom.io.formats.Format`;
formats that cannot (NIfTI, NRRD, MRC, PNG, folders) return one around the whole array, read
once (``lazy`` is False). Slicing a :class:`Volume` reads only the region asked for, in the
axes of :func:`custom.io.read_em` (length-1 channel/time axes dropped by the same rule).

Voxel size is ``spacing`` (one float per axis, (z, y, x)) with ``units`` (one NGFF unit name per
axis: ``"micrometer"``, ``"nanometer"``...), or None where a file does not say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

__all__ = ["Volume", "ngff_unit", "short_unit", "kept_axes", "to_unit"]

#: spellings of length units in HDF5 / ImageJ / NIfTI / NGFF metadata -> the NGFF name
_UNITS = {
    "nm": "nanometer", "nanometer": "nanometer", "nanometers": "nanometer", "nanometre": "nanometer",
    "um": "micrometer", "µm": "micrometer", "micron": "micrometer", "microns": "micrometer",
    "micrometer": "micrometer", "micrometers": "micrometer", "micrometre": "micrometer", "\\u00B5m": "micrometer",
    "mm": "millimeter", "millimeter": "millimeter", "meter": "meter", "m": "meter", "angstrom": "angstrom",
    "pixel": None, "pixels": None, "": None, "unknown": None,
}
_SHORT = {"nanometer": "nm", "micrometer": "um", "millimeter": "mm", "meter": "m", "angstrom": "A"}
#: size of one unit in micrometers (for HDF5's element_size_um)
_MICRONS = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "meter": 1e6, "angstrom": 1e-4}


def ngff_unit(unit: Any) -> Optional[str]:
    """The NGFF name of a length unit spelt ``unit`` (``"um"``, ``"micron"``, ``b"nm"``...); None if unknown."""
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", "replace")
    if unit is None:
        return None
    return _UNITS.get(str(unit).strip().lower(), _UNITS.get(str(unit).strip()))


def short_unit(unit: Optional[str]) -> str:
    """``"micrometer"`` -> ``"um"`` (ImageJ's spelling); unknown -> ``"pixel"``."""
    return _SHORT.get(unit or "", "pixel")


def to_unit(values: Sequence[float], units: Sequence[Optional[str]], target: str) -> Optional[tuple]:
    """``values`` in ``units`` converted to ``target`` (an NGFF name); None when a unit is unknown."""
    if any(u not in _MICRONS for u in units):
        return None
    return tuple(float(v) * _MICRONS[u] / _MICRONS[target] for v, u in zip(values, units))


def kept_axes(shape: Sequence[int]) -> tuple[int, ...]:
    """Indices of the stored axes that :func:`custom.io.formats.squeeze_extra` keeps, in order."""
    idx = list(range(len(shape)))
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
        idx.pop()
    while len(dims) > 3 and 1 in dims:
        k = dims.index(1)
        del dims[k], idx[k]
    return tuple(idx)


@dataclass
class Volume:
    """An image or volume whose pixels are read on slicing.

    Attributes:
        path: the file (or store folder).
        array: what holds the pixels as stored: a ``zarr.Array``, ``h5py.Dataset``, ``numpy.memmap``
            or ``numpy.ndarray``; sliced with numpy indexing.
        spacing: voxel size per kept axis ((z, y, x) or (y, x)), or None.
        units: NGFF unit name per kept axis (None entries: unknown), or None.
        attrs: metadata a writer of the same format copies (HDF5 dataset attributes).
        lazy: False when the whole array is in memory.
        fmt: the format's registry name.
        close: releases the file handle (HDF5, TIFF); :meth:`close` calls it.
    """

    path: str
    array: Any
    spacing: Optional[tuple] = None
    units: Optional[tuple] = None
    attrs: dict = field(default_factory=dict)
    lazy: bool = True
    fmt: str = ""
    closer: Optional[Callable[[], None]] = None

    def __post_init__(self) -> None:
        self.stored_shape = tuple(int(s) for s in self.array.shape)
        self._keep = kept_axes(self.stored_shape)
        self.shape = tuple(self.stored_shape[i] for i in self._keep)
        self.dtype = np.dtype(self.array.dtype).newbyteorder("=")
        for name in ("spacing", "units"):
            value = getattr(self, name)
            if value is not None and len(value) == len(self.stored_shape) != len(self.shape):
                setattr(self, name, tuple(value[i] for i in self._keep))
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
            if len(self.spacing) != len(self.shape):
                self.spacing = None  # metadata for other axes than the pixels: not trusted
        if self.units is not None and len(self.units) != len(self.shape):
            self.units = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, sel: Any) -> np.ndarray:
        """``sel``: slices / integers over the kept axes -> a native-order numpy array."""
        sel = sel if isinstance(sel, tuple) else (sel,)
        full: list[Any] = [0] * len(self.stored_shape)
        for axis in range(len(self.stored_shape)):
            full[axis] = slice(None) if axis in self._keep else 0
        for k, s in zip(self._keep, sel):
            full[k] = s
        out = np.asarray(self.array[tuple(full)])
        return out.astype(self.dtype, copy=False) if out.dtype != self.dtype else out

    def read(self) -> np.ndarray:
        """The whole array in memory."""
        return self[tuple(slice(None) for _ in self.shape)]

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
