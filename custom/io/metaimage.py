"""Format back-end for MetaImage (``.mha``, ``.mhd`` + ``.raw``) and GIPL files, through ITK: pixels
are read with MONAI's public ``ITKReader``, shapes from the file header (ITK's ``ImageIO``, no
pixels), and ``.mha``/``.gipl`` written with ``itk.imwrite``, with the voxel spacing, origin and
direction of an ITK ``reference`` file. Arrays are (Z, Y, X) as everywhere in ``custom.io``: ITK's
(x, y, z) index order reversed. ``.mhd`` is read, not written (its pixels live in a second file,
which a single atomic rename cannot place): write ``.mha`` instead."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import dataset_error
from .images import rgb_to_gray

#: numpy dtypes ITK's Python wrapping cannot write -> the type written instead (when the values fit)
_WRITE_AS = {
    np.dtype(bool): np.uint8, np.dtype(np.int8): np.int16, np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32,
}


def _header(path: str):
    """ITK's ``ImageIO`` for ``path`` with the header read (dimensions, components, spacing)."""
    import itk

    io = itk.ImageIOFactory.CreateImageIO(os.fspath(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError("ITK has no reader for this file")
    io.SetFileName(os.fspath(path))
    io.ReadImageInformation()
    return io


def read_itk(path: str, key: str | None = None, role: str = "image") -> np.ndarray:
    from monai.data import ITKReader

    reader = ITKReader(reverse_indexing=True)
    image = reader.read(path)
    arr, meta = reader.get_data(image)
    arr = np.array(arr, copy=True)  # own the pixels: the array may be a view of ITK's buffer
    del image
    if meta.get("original_channel_dim") == -1 and arr.shape[-1] in (2, 3, 4):  # RGB(A) pixels
        arr = rgb_to_gray(arr, -1, path)
    return arr


def itk_shape(path: str, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    io = _header(path)
    shape = tuple(int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions()))[::-1]
    components = int(io.GetNumberOfComponents())
    return shape if components in (1, 2, 3, 4) else (*shape, components)  # 2-4: read as gray


def write_itk(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None) -> None:
    """The array as a scalar ITK image; spacing, origin and direction copied from an ITK ``reference``."""
    import itk

    if dest.lower().endswith(".mhd"):
        raise dataset_error(dest, "MetaImage .mhd keeps its pixels in a second file; write .mha (one file) instead")
    data = arr
    cast = _WRITE_AS.get(arr.dtype)
    if cast is not None:
        info = np.iinfo(cast)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise dataset_error(dest, f"{arr.dtype} values beyond {np.dtype(cast).name}; ITK cannot write them")
        data = arr.astype(cast)
    image = itk.image_from_array(np.ascontiguousarray(data))
    if reference is not None:
        ref = _header(os.fspath(reference))
        n = min(ref.GetNumberOfDimensions(), data.ndim)
        if n == data.ndim:
            image.SetSpacing([float(ref.GetSpacing(i)) for i in range(n)])
            image.SetOrigin([float(ref.GetOrigin(i)) for i in range(n)])
            direction = np.array([[ref.GetDirection(j)[i] for j in range(n)] for i in range(n)], dtype=np.float64)
            image.SetDirection(itk.matrix_from_array(direction))
    itk.imwrite(image, os.fspath(tmp), compression=compression is not None)
