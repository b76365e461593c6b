"""Format back-ends for image files: TIFF (2D images and multi-page stacks, through tifffile) and
PNG/JPEG (through PIL). Each function has the signature its slot in :class:`custom.io.formats.Format`
asks for; colour images are read as grayscale (:func:`rgb_to_gray`, one warning per file)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import PathLike, dataset_error, warn_once
from .lazy import Volume, ngff_unit


def rgb_to_gray(arr: np.ndarray, axis: int, path: PathLike) -> np.ndarray:
    """Collapse a samples axis of length 2 (gray+alpha), 3 (RGB) or 4 (RGBA) to gray.

    Identical R, G, B channels are taken as they are; otherwise ITU-R 601 luma, rounded back
    to the input dtype for integer images. Logs one warning naming the file.
    """
    arr = np.moveaxis(arr, axis, -1)
    n = arr.shape[-1]
    if n == 2:
        return arr[..., 0]
    rgb = arr[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        warn_once(path, f"stored with {n} colour channels that are identical; reading one as grayscale")
        return np.ascontiguousarray(rgb[..., 0])
    warn_once(path, f"{'RGBA' if n == 4 else 'RGB'} image converted to grayscale (luma 0.299 R + 0.587 G + 0.114 B)")
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(gray), info.min, info.max).astype(arr.dtype)
    return gray.astype(arr.dtype, copy=False)


# --------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------
def _tiff_samples_axis(series) -> int | None:
    """Index of a colour-samples axis (length 2-4) in a tifffile series, else None."""
    axes = series.axes
    if "S" in axes:
        axis = axes.index("S")
        if series.shape[axis] in (2, 3, 4):
            return axis
    return None


def _needs_codec(exc: BaseException) -> bool:
    return "imagecodecs" in str(exc)


def _pil_frames(path: str) -> np.ndarray:
    """All frames of an image file through PIL (fallback for TIFF compressions tifffile cannot
    decode without ``imagecodecs``, e.g. LZW)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        frames = [_pil_to_array(frame.copy(), path) for frame in ImageSequence.Iterator(im)]
    return frames[0] if len(frames) == 1 else np.stack(frames)


def read_tiff(path: str, key: str | None = None, role: str = "image") -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axis = _tiff_samples_axis(series)
        try:
            arr = series.asarray()
        except (KeyError, ValueError) as exc:
            if not _needs_codec(exc):
                raise
            return _pil_frames(path)
    if axis is not None:
        arr = rgb_to_gray(arr, axis, path)
    return arr


def tiff_shape(path: str, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape = list(series.shape)
        axis = _tiff_samples_axis(series)
    if axis is not None:
        del shape[axis]
    return tuple(shape)


def tiff_slice(path: str, key: str | None, role: str, plane: str, index: int, shape: tuple) -> np.ndarray | None:
    """xy page ``index`` of a plain (Z, Y, X) stack without reading the others; None if the file
    is not such a stack or the plane is another (then the caller reads the whole volume)."""
    import tifffile

    if plane != "xy":
        return None
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if len(series.shape) != 3 or _tiff_samples_axis(series) is not None or len(series.pages) != series.shape[0]:
            return None
        page = series.pages[index]
        if page is None:
            return None
        try:
            return page.asarray()
        except (KeyError, ValueError) as exc:
            if not _needs_codec(exc):
                raise
            return None


#: TIFF ResolutionUnit -> micrometers per unit (2: inch, 3: centimeter)
_RES_UNIT_UM = {2: 25400.0, 3: 10000.0}


def tiff_spacing(tif, ndim: int) -> tuple[tuple | None, tuple | None]:
    """(spacing, units) of a TIFF: x/y from the resolution tags (pixels per unit), z from ImageJ's
    ``spacing`` (1 when absent, as ImageJ assumes), the unit from ImageJ's ``unit`` or ResolutionUnit."""
    page = tif.pages[0]
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, None
    ppu = []
    for name in ("YResolution", "XResolution"):
        num, den = tags[name].value
        ppu.append(num / den if den else 0.0)
    if min(ppu) <= 0:
        return None, None
    ij = tif.imagej_metadata or {}
    res_unit = int(getattr(tags.get("ResolutionUnit"), "value", 1) or 1)
    unit = ngff_unit(ij.get("unit")) if ij.get("unit") else None
    yx = [1.0 / v for v in ppu]
    if unit is None and res_unit in _RES_UNIT_UM:
        yx, unit = [s * _RES_UNIT_UM[res_unit] for s in yx], "micrometer"
    if ndim == 2:
        return tuple(yx), (unit, unit)
    return (float(ij.get("spacing", 1.0)), *yx), (unit, unit, unit)


def open_tiff(path: str, key: str | None = None, role: str = "image") -> Volume | None:
    """A TIFF stack without reading it: ``tifffile.memmap`` when uncompressed and contiguous, else
    tifffile's zarr view (page by page). None for colour images (read whole and converted to gray)."""
    import tifffile
    import zarr

    tif = tifffile.TiffFile(path)
    try:
        series = tif.series[0]
        if _tiff_samples_axis(series) is not None:
            tif.close()
            return None
        spacing, units = tiff_spacing(tif, len(series.shape) - sum(1 for s in series.shape if s == 1))
        try:
            arr = tifffile.memmap(path, mode="r")
        except ValueError:  # compressed or not contiguous: decode the pages asked for
            arr = zarr.open(series.aszarr(), mode="r")
    except BaseException:
        tif.close()
        raise
    return Volume(path, arr, spacing=spacing, units=units, fmt="tiff", closer=tif.close)


#: dtypes ImageJ reads (its hyperstack metadata is written only for these)
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def tiff_voxel_args(dtype, ndim: int, spacing=None, units=None) -> dict:
    """tifffile ``write`` arguments recording a voxel size: resolution tags (pixels per unit) and, for
    ImageJ's dtypes, ImageJ ``spacing`` and ``unit``; nothing when ``spacing`` is None."""
    if spacing is None or len(spacing) != ndim:
        return {}
    from .lazy import short_unit

    out: dict = {"resolution": (1.0 / float(spacing[-1]), 1.0 / float(spacing[-2]))}
    if np.dtype(dtype) in [np.dtype(d) for d in IMAGEJ_DTYPES]:
        meta = {"unit": short_unit((units or [None])[-1]), "axes": "ZYX" if ndim == 3 else "YX"}
        if ndim == 3:
            meta["spacing"] = float(spacing[0])
        out.update(imagej=True, metadata=meta)
    return out


def write_tiff(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None,
               spacing=None, units=None, attrs=None) -> None:
    """One grayscale page per z slice (``compression`` e.g. ``"zlib"``); the voxel size as resolution
    tags and ImageJ metadata (:func:`tiff_voxel_args`)."""
    import tifffile

    data = arr.astype(np.uint8) if arr.dtype == bool else arr
    tifffile.imwrite(tmp, data, photometric="minisblack", compression=compression,
                     **tiff_voxel_args(data.dtype, data.ndim, spacing, units))


# --------------------------------------------------------------------------------------
# PNG / JPEG (PIL)
# --------------------------------------------------------------------------------------
def _pil_to_array(im, path: PathLike) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        src = np.asarray(im.convert("RGBA" if mode == "RGBA" else "RGB"))
        return rgb_to_gray(src, -1, path)
    if mode in ("LA", "La", "PA"):
        return np.asarray(im.convert("L"))
    if mode == "P":
        palette = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
        if len(palette) and (palette[:, 0] == palette[:, 1]).all() and (palette[:, 0] == palette[:, 2]).all():
            return np.asarray(im.convert("L"))
        warn_once(path, "palette image with colours: reading its palette indices (as for a label mask)")
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im).astype(bool)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    return np.asarray(im)


def read_pil(path: str, key: str | None = None, role: str = "image") -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        arr = _pil_to_array(im, path)
    # np.asarray of a PIL image is read-only; torch warns on every such tensor (and may not write to it)
    return arr if arr.flags.writeable else np.array(arr)


def pil_shape(path: str, key: str | None = None, role: str = "image") -> tuple[int, ...]:
    from PIL import Image

    with Image.open(path) as im:
        return (im.size[1], im.size[0])


def _png_ready(arr: np.ndarray, path: PathLike) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0:
        if arr.max() <= 255:
            return arr.astype(np.uint8)
        if arr.max() <= 65535:
            return arr.astype(np.uint16)
    raise dataset_error(path, f"PNG holds uint8 or uint16 values; got {arr.dtype} (use .tif, .nii.gz, .h5 or .nrrd)")


def write_png(tmp: Path, arr: np.ndarray, *, dest: str, reference=None, key=None, compression=None) -> None:
    """A 2D image of uint8/uint16 values (or integers that fit); JPEG (lossy) is refused."""
    from PIL import Image

    if os.path.splitext(dest)[1].lower() != ".png":
        raise dataset_error(dest, "lossy JPEG output is not supported; use .png or .tif")
    if arr.ndim != 2:
        raise dataset_error(dest, f"PNG is 2D; got shape {arr.shape} (write a folder of slices or a .tif stack)")
    Image.fromarray(_png_ready(arr, dest)).save(tmp, format="PNG")
