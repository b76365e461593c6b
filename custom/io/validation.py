"""Checking a dataset before training, so a bad file costs seconds, not a run: every file readable,
image and label shapes equal, label values class indices (:func:`validate_items`), and some
training label holding a foreground class (:func:`check_foreground`). With sparse labels the
``ignore_index`` value marks unlabelled voxels: it is accepted as not-a-class and never counts as
foreground."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np

from ..errors import ConfigError
from .errors import DatasetError, PathLike, dataset_error
from .formats import em_shape, read_em
from .slicing import as_item

__all__ = ["check_foreground", "check_ignore_index", "no_foreground_error", "validate_items"]


def check_ignore_index(ignore_index: int | None, num_classes: int | None) -> int | None:
    """The unlabelled value (sparse labels) as an int, or None; refused when it is one of the ``num_classes``
    classes (``0 .. num_classes - 1``, background included), which could then never be learned nor scored.

    Raises:
        ConfigError: ``"ignore_index: 1 is a class of a 2-class task; ..."``.
    """
    if ignore_index is None:
        return None
    if num_classes is not None and 0 <= int(ignore_index) < int(num_classes):
        raise ConfigError(
            f"ignore_index: {int(ignore_index)} is a class of a {int(num_classes)}-class task; "
            "unlabelled voxels need a value that is not a class (e.g. 255)"
        )
    return int(ignore_index)


def _check_image_values(path: str, arr: np.ndarray) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise dataset_error(path, f"image holds {n} non-finite values (NaN or inf)")
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise dataset_error(path, f"unsupported pixel type {arr.dtype}")


def _check_label_values(path: str, arr: np.ndarray, num_classes: int | None, ignore_index: int | None = None) -> None:
    if arr.dtype == bool:
        vmin, vmax = int(arr.min()), int(arr.max())
    elif np.issubdtype(arr.dtype, np.integer):
        vmin, vmax = int(arr.min()), int(arr.max())
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise dataset_error(path, "label holds non-finite values (NaN or inf)")
        if not np.array_equal(arr, np.round(arr)):
            bad = arr[arr != np.round(arr)]
            raise dataset_error(
                path, f"label holds non-integer values (e.g. {float(bad.flat[0]):g}); expected class indices 0, 1, 2, ..."
            )
        vmin, vmax = int(arr.min()), int(arr.max())
    else:
        raise dataset_error(path, f"label dtype {arr.dtype} is not numeric")
    if ignore_index is not None and vmax >= int(ignore_index) >= vmin:
        classes = arr[arr != ignore_index]  # the unlabelled value is not a class: check the others
        vmin, vmax = (int(classes.min()), int(classes.max())) if classes.size else (0, 0)
    if vmin < 0:
        raise dataset_error(path, f"label holds negative values (min {vmin}); expected class indices 0, 1, 2, ...")
    if num_classes is not None and vmax >= int(num_classes):
        unlabelled = "" if ignore_index is None else f" or {int(ignore_index)} (ignore_index: unlabelled)"
        raise dataset_error(
            path,
            f"label values up to {vmax} but num_classes is {int(num_classes)} (expected 0..{int(num_classes) - 1}{unlabelled})",
        )


def validate_items(
    items: Iterable[Mapping | PathLike],
    num_classes: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    check_data: bool = True,
    h5_keys: Mapping[str, str] | None = None,
    ignore_index: int | None = None,
) -> None:
    """Check a dataset list once, before training, so a bad file costs seconds, not a run.

    Each distinct file is opened once (items from :func:`slice_items` that repeat a path are
    checked once). Headers give the shape checks; with ``check_data`` the pixels are read to
    find truncated files, non-finite image values and bad label values. Images smaller than a
    training crop are fine (the pipeline pads).

    Args:
        items: dicts with ``image_key`` (and optional ``label_key``, ``"<key>_key"`` HDF5 names)
            or bare image paths.
        num_classes: when given, label values must be ``< num_classes``.
        check_data: False checks headers only (for very large corpora).
        h5_keys: default HDF5 dataset per entry, e.g. ``{"image": "volume"}`` (as
            ``LoadEMSliced(h5_keys=...)``); an item's ``"<key>_key"`` wins.
        ignore_index: the label value of unlabelled voxels (sparse labels), accepted besides the classes.

    Raises:
        DatasetError: ``"<path>: <problem>"`` for the first unreadable/truncated file,
            image/label shape mismatch, label values ``>= num_classes`` (other than ``ignore_index``), negative or
            non-integer labels, 1D or 4D+ arrays, non-finite values, or an HDF5 file whose
            dataset is ambiguous (several, none with a known name: the message lists them).
        ConfigError: ``ignore_index`` is one of the classes (:func:`check_ignore_index`).
    """
    ignore_index = check_ignore_index(ignore_index, num_classes)
    seen: set[tuple] = set()
    h5_keys = dict(h5_keys or {})
    for n, item in enumerate(items):
        d = as_item(item, image_key)
        if image_key not in d:
            raise DatasetError(f"item {n}: no '{image_key}' entry ({d})")
        img, lab = os.fspath(d[image_key]), d.get(label_key)
        img_key = d.get(f"{image_key}_key", h5_keys.get(image_key))
        lab_key = d.get(f"{label_key}_key", h5_keys.get(label_key))
        tag = (img, img_key, None if lab is None else os.fspath(lab), lab_key)
        if tag in seen:
            continue
        seen.add(tag)
        img_shape = em_shape(img, img_key, "image")
        if (img, img_key, "image") not in seen:
            seen.add((img, img_key, "image"))
            if check_data:
                _check_image_values(img, read_em(img, img_key, "image"))
        if lab is None:
            continue
        lab = os.fspath(lab)
        lab_shape = em_shape(lab, lab_key, "label")
        if tuple(lab_shape) != tuple(img_shape):
            raise dataset_error(lab, f"label shape {tuple(lab_shape)} differs from image shape {tuple(img_shape)} of {img}")
        if (lab, lab_key, "label") not in seen:
            seen.add((lab, lab_key, "label"))
            if check_data:
                _check_label_values(lab, read_em(lab, lab_key, "label"), num_classes, ignore_index)


def no_foreground_error(
    where: PathLike, n_pixels: int, n_files: int | None = None, hint: str | None = None, ignore_index: int | None = None
) -> DatasetError:
    """The one-line refusal of training labels without any foreground pixel (every value 0).

    Nothing to learn: the run would end with a model that predicts background everywhere. Usually
    a mask convention (foreground stored as a value the preparation did not map to a class) or
    empty annotation files. Shared by :func:`check_foreground` (bundles) and the dataset
    preparation (``scripts/prepare``). With ``ignore_index`` the pixels are 0 or that unlabelled value.
    """
    files = f" of {n_files} file(s)" if n_files is not None else ""
    hint = hint or "label the foreground as class 1, 2, ... (0 is background)"
    values = "0" if ignore_index is None else f"0 or {int(ignore_index)} (ignore_index: unlabelled)"
    return dataset_error(
        where, f"no training label holds a foreground class (all {int(n_pixels)} pixels{files} are {values}); {hint}"
    )


def check_foreground(
    items: Iterable[Mapping | PathLike],
    label_key: str = "label",
    h5_keys: Mapping[str, str] | None = None,
    ignore_index: int | None = None,
) -> int:
    """Refuse a training set whose labels hold no foreground class at all, before training.

    Each distinct label file is read once, in order, until one holds a non-zero value (so a normal
    dataset costs one label file). Items without a label are skipped.

    Args:
        items: the training items (dicts with ``label_key``, optional ``"<label_key>_key"`` HDF5
            names), as ``train#dataset#data``; or bare label paths.
        label_key: the items' label entry.
        h5_keys: default HDF5 dataset per entry (an item's ``"<label_key>_key"`` wins).
        ignore_index: the value of unlabelled voxels (sparse labels): not foreground.

    Returns:
        the number of (labelled) foreground pixels found in the first label that has any.

    Raises:
        DatasetError: ``"<label folder>: no training label holds a foreground class (all N pixels
            of K file(s) are 0); ..."``, naming the folder that holds the labels (the file when
            there is one).
    """
    h5_keys = dict(h5_keys or {})
    seen: set[tuple] = set()
    paths: list[str] = []
    n_pixels = 0
    for item in items:
        d = as_item(item, label_key)
        if d.get(label_key) is None:
            continue
        path = os.fspath(d[label_key])
        key = d.get(f"{label_key}_key", h5_keys.get(label_key))
        if (path, key) in seen:
            continue
        seen.add((path, key))
        arr = read_em(path, key, "label")
        found = int(np.count_nonzero(arr if ignore_index is None else (arr != 0) & (arr != ignore_index)))
        if found:
            return found
        n_pixels += int(arr.size)
        paths.append(path)
    if not paths:
        return 0
    where = paths[0] if len(paths) == 1 else os.path.commonpath([os.path.abspath(p) for p in paths])
    raise no_foreground_error(where, n_pixels, len(paths), ignore_index=ignore_index)
