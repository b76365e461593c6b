"""Writing an output region by region (:func:`open_sink`), so peak memory does not grow with its size.

A sink is created with the output's shape and dtype, written block by block in any order
(``sink[region] = block``) and then :meth:`Sink.commit`\\ ted: everything goes to a hidden
temporary next to the output (:func:`custom.utils.temp_name`) that is renamed onto it only
when complete, so a killed run never leaves a partial file under the output's name.

- OME-Zarr (``.zarr``, ``.ome.zarr``): NGFF metadata through ``ome-zarr`` with the input's voxel size,
  units and axes; chunks of whole sections (or the blocks given); a *resumable* sink keeps its
  temporary under a fixed name (``.partial-<name>``) so a rerun continues it.
- HDF5: a chunked gzip dataset with the input's dataset attributes (``element_size_um``...).
- TIFF: an uncompressed stack allocated by tifffile (ImageJ hyperstack metadata and resolution tags
  for the voxel size), written through a memory map opened per block (unmapped after each, so no
  pages stay resident).
- any other format (NIfTI, NRRD, MRC, MetaImage, PNG, folders): held in memory and written by
  :func:`custom.io.write_em` at commit (NIfTI gets the voxel size as its zooms).
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..utils import atomic_path, temp_name
from .errors import PathLike, dataset_error
from .formats import FORMATS, em_format
from .writer import replace_folder, store_problem, write_em

__all__ = ["Sink", "open_sink", "partial_name"]


def partial_name(path: PathLike) -> Path:
    """The fixed hidden name a resumable zarr output is built under: ``<dir>/.partial-<name>``."""
    path = Path(path)
    return path.with_name(f".partial-{path.name}")


class Sink:
    """An output being written: ``sink[region] = block`` (numpy regions of the full array), then :meth:`commit`.

    Attributes:
        path: the final output; shape, dtype: of the whole array; resumable: its temporary survives
            a killed run (zarr with ``resume``).
    """

    resumable = False

    def __init__(self, path: PathLike, shape: tuple, dtype: Any, overwrite: bool) -> None:
        self.path, self.shape, self.dtype, self.overwrite = Path(path), tuple(shape), np.dtype(dtype), overwrite
        if self.dtype == bool:
            self.dtype = np.dtype(np.uint8)

    def __setitem__(self, region: tuple, block: np.ndarray) -> None:
        raise NotImplementedError

    def commit(self) -> str:
        """Move the finished output into place (never over an existing file unless ``overwrite``)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Remove the temporary (a resumable sink keeps it for the next run)."""


class ZarrSink(Sink):
    """OME-Zarr written chunk by chunk."""

    def __init__(self, path, shape, dtype, overwrite, chunks, spacing=None, units=None, resume=False) -> None:
        from .zarrs import create_ngff

        super().__init__(path, shape, dtype, overwrite)
        if os.path.lexists(self.path) and not overwrite:
            raise dataset_error(self.path, "already exists; not replaced (overwrite is off)")
        self.resumable = bool(resume)
        self.tmp = partial_name(self.path) if resume else temp_name(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and os.path.isdir(self.tmp):
            import zarr

            self.array = zarr.open_array(os.fspath(self.tmp), path="0", mode="r+")
            if tuple(self.array.shape) != self.shape or self.array.dtype != self.dtype:
                raise dataset_error(self.tmp, f"unfinished output of shape {self.array.shape} ({self.array.dtype}), "
                                              f"this run writes {self.shape} ({self.dtype}); delete it to start again")
        else:
            self.array = create_ngff(self.tmp, self.shape, self.dtype, chunks, spacing, units)

    def __setitem__(self, region, block):
        self.array[region] = block

    def commit(self) -> str:
        if os.path.lexists(self.path) and store_problem(self.path) is not None:
            raise dataset_error(self.path, f"{store_problem(self.path)}; not replaced")
        replace_folder(self.tmp, self.path, self.overwrite)
        return os.fspath(self.path)

    def abort(self) -> None:
        if not self.resumable:
            shutil.rmtree(self.tmp, ignore_errors=True)


class _AtomicFileSink(Sink):
    """A single file written under :func:`custom.utils.atomic_path`'s temporary name."""

    def __init__(self, path, shape, dtype, overwrite) -> None:
        super().__init__(path, shape, dtype, overwrite)
        self._stack = ExitStack()
        self.tmp = self._stack.enter_context(atomic_path(self.path, replace=overwrite))

    def _close(self) -> None:
        """Close the file handle before the rename."""

    def commit(self) -> str:
        self._close()
        self._stack.close()  # atomic_path renames the temporary onto the output
        return os.fspath(self.path)

    def abort(self) -> None:
        self._close()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)  # no rename; the temporary is removed


class H5Sink(_AtomicFileSink):
    """An HDF5 dataset written chunk by chunk, with the input's attributes."""

    def __init__(self, path, shape, dtype, overwrite, key=None, chunks=None, spacing=None, units=None, attrs=None):
        import h5py

        from .volumes import h5_attrs, h5_chunks

        super().__init__(path, shape, dtype, overwrite)
        self.file = h5py.File(self.tmp, "w")
        self.ds = self.file.create_dataset(key or "label", shape=self.shape, dtype=self.dtype, compression="gzip",
                                           compression_opts=4,
                                           chunks=tuple(chunks) if chunks else h5_chunks(self.shape, self.dtype.itemsize))
        h5_attrs(self.ds, spacing, units, attrs)

    def __setitem__(self, region, block):
        self.ds[region] = block

    def _close(self) -> None:
        if self.file.id.valid:
            self.file.close()


class TiffSink(_AtomicFileSink):
    """An uncompressed TIFF stack allocated up front, written through a short-lived memory map per block."""

    def __init__(self, path, shape, dtype, overwrite, spacing=None, units=None) -> None:
        import tifffile

        from .images import tiff_voxel_args

        super().__init__(path, shape, dtype, overwrite)
        big = int(np.prod(self.shape)) * self.dtype.itemsize > 2**31
        tifffile.imwrite(self.tmp, shape=self.shape, dtype=self.dtype, photometric="minisblack", bigtiff=big,
                         **tiff_voxel_args(self.dtype, len(self.shape), spacing, units))

    def __setitem__(self, region, block):
        import tifffile

        mm = tifffile.memmap(self.tmp, mode="r+")
        mm[region] = block
        mm.flush()
        del mm  # unmapped: the written pages are the page cache's, not this process's


class MemorySink(Sink):
    """Formats without partial writes: the array is kept and written whole by :func:`write_em`."""

    def __init__(self, path, shape, dtype, overwrite, reference=None, key=None, **voxel) -> None:
        super().__init__(path, shape, dtype, overwrite)
        self.array = np.zeros(self.shape, self.dtype)
        self.reference, self.key, self.voxel = reference, key, voxel

    def __setitem__(self, region, block):
        self.array[region] = block

    def commit(self) -> str:
        return write_em(self.path, self.array, reference=self.reference, key=self.key, overwrite=self.overwrite,
                        **self.voxel)


def open_sink(
    path: PathLike,
    shape: tuple,
    dtype: Any,
    overwrite: bool = False,
    reference: Optional[PathLike] = None,
    key: Optional[str] = None,
    chunks: Optional[tuple] = None,
    spacing: Optional[tuple] = None,
    units: Optional[tuple] = None,
    attrs: Optional[dict] = None,
    resume: bool = False,
) -> Sink:
    """A :class:`Sink` for ``path`` (format from its suffix, as :func:`custom.io.write_em`).

    Args:
        shape, dtype: of the whole output ((Z, Y, X) or (Y, X)).
        overwrite: replace an existing output at commit (default: refuse it).
        reference: the input (NIfTI header, NRRD space fields of in-memory formats).
        key: HDF5 dataset name (default ``"label"``).
        chunks: zarr / HDF5 chunks (default: one section).
        spacing, units, attrs: the voxel size and (HDF5) dataset attributes to record.
        resume: zarr only: build under :func:`partial_name` and continue an unfinished one.
    """
    fmt = FORMATS.get(em_format(path) or "")
    shape = tuple(int(s) for s in shape)
    chunks = tuple(chunks) if chunks else ((1, *shape[1:]) if len(shape) == 3 else shape)
    if fmt is not None and fmt.name == "zarr":
        return ZarrSink(path, shape, dtype, overwrite, chunks, spacing, units, resume)
    if fmt is not None and fmt.name == "hdf5":
        return H5Sink(path, shape, dtype, overwrite, key, chunks, spacing, units, attrs)
    if fmt is not None and fmt.name == "tiff":
        return TiffSink(path, shape, dtype, overwrite, spacing, units)
    return MemorySink(path, shape, dtype, overwrite, reference, key, spacing=spacing, units=units, attrs=attrs)
