"""Electron-microscopy files, one concept a module:

- :mod:`~custom.io.formats`: the format registry (one :class:`Format` record per format: suffixes,
  read / shape / read_slice / write) and whole-array reading (:func:`read_em`, :func:`em_shape`,
  :func:`em_format`, :func:`to_unit_range`); the back-ends are :mod:`~custom.io.images` (TIFF,
  PNG/JPEG), :mod:`~custom.io.volumes` (HDF5, NIfTI, NRRD, MRC) and :mod:`~custom.io.metaimage`
  (MetaImage, GIPL through ITK).
- :mod:`~custom.io.writer`: :func:`write_em` (atomic files and folders of slices).
- :mod:`~custom.io.slicing`: :func:`read_em_slice`, :func:`slice_items`, :class:`LoadEMSliced`,
  :class:`SliceDataset`.
- :mod:`~custom.io.reader`: :class:`EMReader`, the MONAI ``ImageReader``.
- :mod:`~custom.io.datalists`: :func:`find_em_files`, :func:`pair_images_labels`,
  :func:`pretraining_datalist`, :func:`inference_items`, :func:`raise_failed_inputs`.
- :mod:`~custom.io.validation`: :func:`validate_items`, :func:`check_foreground`.
- :mod:`~custom.io.errors`: :class:`DatasetError` (one line ``"<path>: <problem>"``).

The conventions (axes, layouts, HDF5 datasets) are in :mod:`custom.io.formats`.
"""

from ..utils import PLANES
from .datalists import find_em_files, inference_items, pair_images_labels, pretraining_datalist, raise_failed_inputs
from .errors import DatasetError
from .formats import FORMATS, Format, em_format, em_shape, read_em, to_unit_range
from .reader import EMReader
from .slicing import LoadEMSliced, SliceDataset, read_em_slice, slice_items
from .validation import check_foreground, no_foreground_error, validate_items
from .volumes import IMAGE_H5_KEYS, LABEL_H5_KEYS
from .writer import slice_folder_problem, write_em

__all__ = [
    "DatasetError",
    "EMReader",
    "FORMATS",
    "Format",
    "IMAGE_H5_KEYS",
    "LABEL_H5_KEYS",
    "LoadEMSliced",
    "PLANES",
    "SliceDataset",
    "check_foreground",
    "em_format",
    "em_shape",
    "find_em_files",
    "inference_items",
    "no_foreground_error",
    "pair_images_labels",
    "pretraining_datalist",
    "raise_failed_inputs",
    "read_em",
    "read_em_slice",
    "slice_folder_problem",
    "slice_items",
    "to_unit_range",
    "validate_items",
    "write_em",
]
