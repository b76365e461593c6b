"""Dataset item lists: the EM files of a folder (:func:`find_em_files`), images paired with labels
(:func:`pair_images_labels`), the training/validation split of an unlabelled folder for pretraining
(:func:`pretraining_datalist`, the synthetic demo set when no folder is given) and the items of a
folder to run inference on with unreadable files set aside (:func:`inference_items`,
:func:`raise_failed_inputs`)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..utils import file_stem, natural_key
from .errors import DatasetError, PathLike, dataset_error, short_list
from .formats import em_format, is_hidden, name_format, supported
from .slicing import slice_items
from .validation import validate_items

__all__ = ["find_em_files", "inference_items", "pair_images_labels", "pretraining_datalist", "raise_failed_inputs"]

logger = logging.getLogger(__name__)


def find_em_files(root: PathLike) -> list[str]:
    """List the EM files under ``root``, recursively, in natural sort order.

    Args:
        root: a folder (searched recursively, hidden files and folders skipped) or one file.

    Returns:
        paths (str) of 2D images (tif/tiff/png/jpg/jpeg) and 3D stacks (multi-page tif,
        h5/hdf5, nii/nii.gz, nrrd, mrc, mha/mhd/gipl) and zarr stores (folders named ``*.zarr``, not
        searched inside). Only names are looked at: nothing is opened.

    Raises:
        DatasetError: ``root`` is missing, or holds no file of a supported format.
    """
    root = os.fspath(root)
    if not root or not os.path.exists(root):
        raise dataset_error(root, "no such file or folder")
    if os.path.isfile(root) or em_format(root) not in (None, "dir"):  # a file, or a store folder (.zarr)
        if em_format(root) is None:
            raise dataset_error(root, f"unsupported file type (supported: {supported()})")
        return [root]
    found: list[str] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink cycle, or a folder linked twice
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted((d for d in dirnames if not is_hidden(d)), key=natural_key)
        stores = [d for d in dirnames if name_format(d) is not None]  # zarr stores are volumes, not folders
        found.extend(os.path.join(dirpath, d) for d in stores)
        dirnames[:] = [d for d in dirnames if d not in stores]
        found.extend(
            os.path.join(dirpath, name) for name in filenames if not is_hidden(name) and name_format(name) is not None
        )
    if not found:
        raise dataset_error(root, f"folder holds no readable EM images (looked for {supported()})")
    return sorted(found, key=lambda p: natural_key(os.path.relpath(p, root)))


_LABEL_TAIL = re.compile(r"[_\-. ]?(labels?|masks?|seg(mentation)?|gt|groundtruth|annotations?)$", re.IGNORECASE)
_IMAGE_TAIL = re.compile(r"[_\-. ]?(images?|img|raw|em)$", re.IGNORECASE)


def _rel_stem(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return os.path.join(os.path.dirname(rel), file_stem(rel))


def pair_images_labels(
    image_dir: PathLike, label_dir: PathLike, image_h5_key: str | None = None, label_h5_key: str | None = None
) -> list[dict]:
    """Match images and labels by file stem (path relative to each folder, suffix dropped).

    ``a/vol1.tif`` pairs with ``a/vol1.tif``, ``a/vol1.h5`` or ``a/vol1.nii.gz``; when exact
    stems leave files unmatched, a trailing ``_label``/``_mask``/``_seg``/``_gt`` (labels) and
    ``_image``/``_img``/``_raw`` (images) is ignored.

    Args:
        image_dir, label_dir: the two folders (searched recursively).
        image_h5_key, label_h5_key: the HDF5 dataset of every HDF5 image / label (the bundle
            settings ``h5_image_key`` / ``h5_label_key``), added to their items as ``"image_key"``
            / ``"label_key"``; None: the default choice of the module docstring.

    Returns:
        ``[{"image": path, "label": path}, ...]`` in the images' order (plus ``"image_key"`` /
        ``"label_key"`` for HDF5 files when the keys are given).

    Raises:
        DatasetError: a folder is missing or empty, names are ambiguous, or some files have no
            partner (the message lists them).
    """
    image_dir, label_dir = os.fspath(image_dir), os.fspath(label_dir)
    images, labels = find_em_files(image_dir), find_em_files(label_dir)

    def index(paths: list[str], root: str, strip: re.Pattern | None) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in paths:
            s = _rel_stem(p, root)
            if strip is not None:
                s = os.path.join(os.path.dirname(s), strip.sub("", os.path.basename(s)) or os.path.basename(s))
            if s in out:
                raise dataset_error(root, f"two files share the name '{s}': {out[s]} and {p}")
            out[s] = p
        return out

    img_idx, lab_idx = index(images, image_dir, None), index(labels, label_dir, None)
    if set(img_idx) != set(lab_idx):
        img_idx, lab_idx = index(images, image_dir, _IMAGE_TAIL), index(labels, label_dir, _LABEL_TAIL)
        if set(img_idx) != set(lab_idx):
            lonely_i = [os.path.relpath(p, image_dir) for s, p in img_idx.items() if s not in lab_idx]
            lonely_l = [os.path.relpath(p, label_dir) for s, p in lab_idx.items() if s not in img_idx]
            parts = []
            if lonely_i:
                parts.append(f"{len(lonely_i)} image(s) without a label in {label_dir}: {short_list(lonely_i)}")
            if lonely_l:
                parts.append(f"{len(lonely_l)} label(s) without an image in {image_dir}: {short_list(lonely_l)}")
            raise DatasetError(f"{image_dir}: images and labels do not match by name; " + "; ".join(parts))
    items = [{"image": img_idx[s], "label": lab_idx[s]} for s in img_idx]
    for item in items:
        for k, h5key in (("image", image_h5_key), ("label", label_h5_key)):
            if h5key and em_format(item[k]) == "hdf5":
                item[f"{k}_key"] = str(h5key)
    return items


def pretraining_datalist(
    dataset_dir: str | os.PathLike | None,
    demo_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    max_val_files: int = 64,
    max_val_items: int = 256,
    planes: str = "xy",
    seed: int = 0,
    check_items: int = 8,
    demo_kwargs: Mapping[str, Any] | None = None,
    exit_on_error: bool = False,
) -> dict[str, list[dict]]:
    """Training and validation items of every 2D image and 3D-stack slice under ``dataset_dir``.

    Files are found recursively (``custom.io.find_em_files``); a seeded permutation holds out
    ``round(val_fraction * n_files)`` files (at least 1, at most ``max_val_files``) for validation,
    so no image contributes to both. 3D stacks are expanded into slice items
    (``custom.io.slice_items``); files are not read beyond the header. A single file is split
    by slices instead (its last ``val_fraction``). Validation is capped at ``max_val_items``
    slices, taken evenly. The first ``check_items`` items of each split (all of them when
    negative) are read once (``custom.io.validate_items``), and every file is checked for being
    empty (one ``stat`` each), so an unreadable dataset fails before training.

    When ``dataset_dir`` is empty or None, the synthetic demo set is written to ``demo_dir``
    (``custom.synthetic.write_unlabelled_demo``, skipped when present) and used.

    With ``exit_on_error`` (what the bundle config sets) a dataset problem ends the program with
    its one-line message (``SystemExit``, status 1) instead of a traceback through MONAI's
    config machinery.

    Returns:
        ``{"training": [...], "validation": [...]}`` with items ``{"image": path, "plane", "index"}``.

    Raises:
        custom.io.DatasetError: one line naming the folder or file when nothing usable is found.
    """
    try:
        return _split_datalist(
            dataset_dir or _demo_folder(demo_dir, demo_kwargs),
            val_fraction=val_fraction,
            max_val_files=max_val_files,
            max_val_items=max_val_items,
            planes=planes,
            seed=seed,
            check_items=check_items,
        )
    except DatasetError as e:
        if exit_on_error:
            raise SystemExit(f"retina_pretrain: dataset error: {e}") from None
        raise


def _demo_folder(demo_dir: str | os.PathLike, demo_kwargs: Mapping[str, Any] | None) -> str:
    from .. import synthetic

    synthetic.write_unlabelled_demo(str(demo_dir), **dict(demo_kwargs or {}))
    logger.info(f"no dataset_dir given: using the synthetic demo set in {demo_dir}")
    return str(demo_dir)


def _split_datalist(
    dataset_dir: str | os.PathLike,
    *,
    val_fraction: float,
    max_val_files: int,
    max_val_items: int,
    planes: str,
    seed: int,
    check_items: int,
) -> dict[str, list[dict]]:
    files = list(find_em_files(str(dataset_dir)))
    if not files:
        raise DatasetError(f"{dataset_dir}: no EM images found")
    if len(files) == 1:
        items = slice_items([{"image": files[0]}], planes=planes)
        n_val = min(max(1, int(round(val_fraction * len(items)))), len(items) - 1) if len(items) > 1 else 0
        train = items[: len(items) - n_val] if n_val else items
        val = items[len(items) - n_val :] if n_val else list(items)
        if not n_val:
            logger.warning(f"{dataset_dir}: a single 2D image; validating on the training image")
    else:
        order = np.random.RandomState(seed).permutation(len(files))
        n_val = min(max(1, int(round(val_fraction * len(files)))), max_val_files, len(files) - 1)
        val_files = sorted(files[i] for i in order[:n_val])
        train_files = sorted(files[i] for i in order[n_val:])
        train = slice_items([{"image": f} for f in train_files], planes=planes)
        val = slice_items([{"image": f} for f in val_files], planes=planes)
    if len(val) > max_val_items:
        keep = np.linspace(0, len(val) - 1, max_val_items).round().astype(int)
        val = [val[i] for i in keep]
    for f in files:
        if os.path.isfile(f) and os.path.getsize(f) == 0:
            raise DatasetError(f"{f}: empty file (0 bytes)")
    if check_items != 0:
        validate_items(train[:check_items] if check_items > 0 else train)
        validate_items(val[:check_items] if check_items > 0 else val)
    logger.info(f"{dataset_dir}: {len(files)} files, {len(train)} training and {len(val)} validation images")
    return {"training": train, "validation": val}


def inference_items(
    dataset_dir: str | os.PathLike, planes: str = "xy", path_key: str = "image_path", check_data: bool = True
) -> dict[str, Any]:
    """Slice items of every EM file under ``dataset_dir`` for inference, unreadable files set aside.

    Each file's header (and with ``check_data`` its pixels: ``custom.io.validate_items``) is read
    once; a file that fails is logged with its one-line problem and left out, so the others are
    still processed. Call :func:`raise_failed_inputs` after the run to end with a non-zero status.

    Returns:
        ``{"items": [{"image", path_key, "plane", "index"}, ...], "failed": ["<path>: <problem>", ...],
        "files": n, "dataset_dir": str}``.

    Raises:
        custom.io.DatasetError: ``dataset_dir`` holds no EM file, or none of them can be read.
    """
    files = find_em_files(str(dataset_dir))
    items: list[dict] = []
    failed: list[str] = []
    for f in files:
        try:
            found = slice_items([{"image": f, path_key: f}], planes=planes)
            if check_data:
                validate_items([{"image": f}])
        except DatasetError as e:
            failed.append(str(e))
            logger.error(f"skipped (unreadable): {e}")
            continue
        items.extend(found)
    if not items:
        raise DatasetError(f"{dataset_dir}: none of the {len(files)} input file(s) can be read: {'; '.join(failed[:5])}")
    return {"items": items, "failed": failed, "files": len(files), "dataset_dir": str(dataset_dir)}


def raise_failed_inputs(screened: Mapping[str, Any], output_dir: str | os.PathLike | None = None) -> None:
    """Raise ``custom.io.DatasetError`` listing the files :func:`inference_items` set aside (if any)."""
    failed = list(screened.get("failed", []))
    if not failed:
        return
    n = int(screened.get("files", len(failed)))
    where = f" into {output_dir}" if output_dir else ""
    raise DatasetError(
        f"{screened.get('dataset_dir', '')}: {len(failed)} of {n} input file(s) could not be read, "
        f"the other {n - len(failed)} were processed{where}: " + "; ".join(failed)
    )
