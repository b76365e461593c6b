"""Writing a prepared dataset: image/label pairs into ``DST/{train,val,test}/{images,labels}/`` and
``DST/dataset.json`` (:class:`DatasetWriter`), and the training volumes with their validation
sections held out (:func:`write_training_volumes`)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.io import DatasetError, no_foreground_error, write_em
from custom.overlays import check_plain_config
from custom.utils import atomic_path, is_within

from .common import (
    OptionError,
    Reporter,
    check_fraction,
    check_val_by,
    holdout_count,
    holdout_indices,
)
from .recipes import Recipe

SPLITS = ("train", "val", "test")
#: present in an output folder while a preparation writes it (an interrupted run can be replaced)
_INCOMPLETE = ".prepare-incomplete"
_EXT_3D = (".tif", ".tiff", ".nii.gz", ".nii", ".h5", ".hdf5", ".nrrd")
_EXT_2D = (".png", ".tif", ".tiff")


# --------------------------------------------------------------------------------------
# writing the output layout
# --------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _safe_name(name: str) -> str:
    """A file-name stem made of ``[A-Za-z0-9._+-]`` (no leading dot, '$', '@' or '%', so the
    names are inert in a bundle config too)."""
    out = _SAFE.sub("_", str(name)).strip("._")
    return out or "image"


def _bincount(arr: np.ndarray, minlength: int) -> np.ndarray:
    """``np.bincount`` of a small-integer array, in chunks (bincount casts its input to intp:
    eight times the memory of a whole uint8 volume at once)."""
    flat = arr.reshape(-1)
    out = np.zeros(minlength, np.int64)
    step = 1 << 22
    for i in range(0, flat.size, step):
        c = np.bincount(flat[i : i + step], minlength=minlength)
        if len(c) > len(out):
            out = np.pad(out, (0, len(c) - len(out)))
        out[: len(c)] += c
    return out


class _Moments:
    """Running mean and standard deviation of images scaled to [0, 1] by dtype (uint8 / 255)."""

    def __init__(self) -> None:
        self.hist = np.zeros(256, np.int64)

    def add(self, image: np.ndarray) -> None:
        if image.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image, got {image.dtype}")
        self.hist += _bincount(image, 256)

    @property
    def count(self) -> int:
        return int(self.hist.sum())

    def result(self) -> tuple[float, float]:
        n = self.count
        if n == 0:
            return float("nan"), float("nan")
        v = np.arange(256, dtype=np.float64) / 255.0
        mean = float((self.hist * v).sum() / n)
        var = float((self.hist * (v - mean) ** 2).sum() / n)
        return mean, math.sqrt(max(var, 0.0))


class DatasetWriter:
    """Writes image/label pairs into ``DST/{train,val,test}/{images,labels}/`` and, at the end,
    ``DST/dataset.json`` (see the module docstring).

    Args:
        dst: output folder; created. It must not lie inside ``source`` nor contain it.
        recipe: the dataset's :class:`Recipe`.
        source: the published dataset folder (recorded, and checked against ``dst``).
        reporter: progress output.
        overwrite: replace an earlier preparation in ``dst`` (only ``train/``, ``val/``,
            ``test/`` and ``dataset.json`` are removed); without it such a folder is an error.
        ext: suffix of 3D outputs (``.tif`` stacks by default; ``.nii.gz``, ``.h5``, ``.nrrd``).
        ext2d: suffix of 2D outputs (``.png`` default, or ``.tif``).
    """

    def __init__(
        self,
        dst: str | os.PathLike,
        recipe: Recipe,
        source: str | os.PathLike,
        reporter: Reporter | None = None,
        overwrite: bool = False,
        ext: str = ".tif",
        ext2d: str = ".png",
    ) -> None:
        self.dst = Path(os.path.abspath(os.fspath(dst)))
        self.recipe = recipe
        self.source = os.path.abspath(os.fspath(source))
        self.reporter = reporter or Reporter()
        self.ext3d = _check_ext(ext, _EXT_3D, "ext")
        self.ext2d = _check_ext(ext2d, _EXT_2D, "ext2d")
        self.records: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.counts = {s: np.zeros(recipe.label_classes, np.int64) for s in SPLITS}
        self.moments = _Moments()
        self._prepare_folder(bool(overwrite))

    def _prepare_folder(self, overwrite: bool) -> None:
        dst, src = os.fspath(self.dst), self.source
        if is_within(dst, src) or is_within(src, dst):
            raise DatasetError(f"{dst}: the output folder must lie outside the source folder {src} and not contain it")
        if self.dst.exists() and not self.dst.is_dir():
            raise DatasetError(f"{dst}: exists and is not a folder")
        marker = self.dst / _INCOMPLETE
        managed = [self.dst / s for s in SPLITS] + [self.dst / "dataset.json"]
        present = [p for p in managed if p.exists()]
        if present and marker.exists():
            self.reporter.say(f"replacing the output of an interrupted earlier run in {dst}")
        elif present and not overwrite:
            names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in present)
            raise DatasetError(f"{dst}: already holds a prepared dataset ({names}); pass --overwrite to replace it")
        for p in present:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.dst.mkdir(parents=True, exist_ok=True)
        marker.write_text("a preparation is writing this folder; removed when it completes\n")

    def add(
        self,
        split: str,
        name: str,
        image: np.ndarray,
        label: np.ndarray,
        source: str | os.PathLike,
        **info: Any,
    ) -> dict:
        """Write one image and its label as ``DST/<split>/{images,labels}/<name><ext>``.

        ``image`` and ``label`` are uint8 arrays of one shape, 2D or 3D; label values must be
        below the recipe's number of classes. Training images feed the intensity statistics.
        ``info`` is stored with the file's record in ``dataset.json``. Returns the record.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        src = os.fspath(source)
        image, label = np.asarray(image), np.asarray(label)
        if image.dtype != np.uint8 or label.dtype != np.uint8:
            raise TypeError(f"image and label must be uint8, got {image.dtype} and {label.dtype}")
        if image.shape != label.shape:
            raise DatasetError(f"{src}: label shape {label.shape} differs from image shape {image.shape}")
        if image.ndim not in (2, 3) or image.size == 0:
            raise DatasetError(f"{src}: expected a 2D image or 3D volume, got shape {image.shape}")
        counts = _bincount(label, self.recipe.label_classes)
        if len(counts) > self.recipe.label_classes:
            raise DatasetError(f"{src}: label value {len(counts) - 1} >= {self.recipe.label_classes} classes")
        name = _safe_name(name)
        if any(r["name"] == name for r in self.records[split]):
            raise DatasetError(f"{src}: a second input would be written as {split}/images/{name} (names must be unique)")
        ext = self.ext3d if image.ndim == 3 else self.ext2d
        rel_img, rel_lab = f"{split}/images/{name}{ext}", f"{split}/labels/{name}{ext}"
        write_em(self.dst / rel_img, image, key="image")
        write_em(self.dst / rel_lab, label, key="label", compression="zlib" if ext in (".tif", ".tiff") else None)
        self.counts[split] += counts
        if split == "train":
            self.moments.add(image)
        record = {
            "name": name,
            "image": rel_img,
            "label": rel_lab,
            "shape": [int(s) for s in image.shape],
            "source": src,
            **info,
        }
        self.records[split].append(record)
        return record

    def finish(self, info: dict | None = None) -> dict:
        """Write ``DST/dataset.json`` and return its content.

        Raises:
            DatasetError: nothing was written to ``train/``, or no training label holds any
                foreground class (a wrong mask convention would otherwise train on nothing).
        """
        rec = self.recipe
        if not self.records["train"]:
            raise DatasetError(f"{self.source}: no training data found")
        if self.counts["train"][1:].sum() == 0:
            raise no_foreground_error(
                self.source, int(self.counts["train"][0]), len(self.records["train"]),
                hint="check that the masks follow the published convention",
            )
        if not self.records["val"]:
            self.reporter.warn(f"no validation split written ({self.dst}/val is missing; the bundle expects one)")
        for c in range(1, rec.label_classes):
            if self.counts["train"][c] == 0:
                self.reporter.warn(f"class {c} ({rec.label_names[c]}) never occurs in the training labels")
        mean, std = self.moments.result()
        config = {"dataset_dir": os.fspath(self.dst), **rec.config()}
        config["intensity_mean"] = round(mean, 8)
        config["intensity_std"] = round(std, 8)
        config["dataset_info"] = {
            "dataset": rec.key,
            "title": rec.title,
            "source": self.source,
            "prepared_by": f"scripts/prepare ({self.reporter.prog})",
            "format_version": 1,
            "intensity_pixels": self.moments.count,
            "label_counts": {s: [int(v) for v in self.counts[s]] for s in SPLITS if self.records[s]},
            **(info or {}),
            "files": {s: self.records[s] for s in SPLITS if self.records[s]},
            "notes": list(rec.notes),
            "warnings": list(self.reporter.warnings),
        }
        path = self.dst / "dataset.json"
        try:  # an overlay from a dataset folder may hold plain values only (custom.overlays): never write code
            check_plain_config(config, os.fspath(path))
        except ValueError as e:
            raise DatasetError(" ".join(str(e).split())) from None
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
        (self.dst / _INCOMPLETE).unlink(missing_ok=True)
        n = {s: len(self.records[s]) for s in SPLITS}
        self.reporter.say(
            f"wrote {path}: {n['train']} train, {n['val']} val, {n['test']} test file(s); "
            f"mean {config['intensity_mean']}, std {config['intensity_std']}"
        )
        return config


def _check_ext(ext: str, allowed: Sequence[str], what: str) -> str:
    e = str(ext).lower()
    e = e if e.startswith(".") else "." + e
    if e not in allowed:
        raise OptionError(f"{what} must be one of {', '.join(allowed)}, got {ext!r}")
    return e



# --------------------------------------------------------------------------------------
# shared steps
# --------------------------------------------------------------------------------------
Loader = Callable[[], "tuple[np.ndarray, np.ndarray, str, dict]"]


def write_training_volumes(
    writer: DatasetWriter,
    volumes: Sequence[tuple[str, Loader]],
    val_fraction: float,
    val_by: str = "sections",
) -> None:
    """Write training volumes, holding out validation data deterministically.

    ``volumes``: ``(name, load)`` pairs; ``load()`` returns ``(image, label, source, info)``
    (uint8 arrays; called once, one volume in memory at a time). ``val_by="sections"``: the last
    ``holdout_count(Z, val_fraction)`` sections of every volume go to ``val/`` (same name);
    ``"volumes"``: the last whole volumes in the given order go to ``val/``.
    """
    rep = writer.reporter
    if val_by == "volumes":
        held = set(holdout_indices(len(volumes), val_fraction, "tail"))
        if check_fraction(val_fraction) > 0 and not held:
            rep.warn(f"val_by=volumes needs at least 2 training volumes, found {len(volumes)}: no validation split")
        for i, (name, load) in enumerate(volumes):
            image, label, src, info = load()
            split = "val" if i in held else "train"
            rep.say(f"{split}: {name} {tuple(image.shape)}")
            writer.add(split, name, image, label, src, **info)
        return
    check_val_by(val_by)
    for name, load in volumes:
        image, label, src, info = load()
        if image.ndim != 3:
            raise DatasetError(f"{src}: expected a 3D volume, got shape {image.shape}")
        z = image.shape[0]
        k = holdout_count(z, val_fraction)
        if check_fraction(val_fraction) > 0 and k == 0:
            rep.warn(f"{src}: {z} section(s), too few to hold out validation sections")
        cut = z - k
        rep.say(f"train: {name} sections 0-{cut - 1}" + (f", val: sections {cut}-{z - 1}" if k else ""))
        writer.add("train", name, image[:cut], label[:cut], src, sections=[0, cut], **info)
        if k:
            writer.add("val", name, image[cut:], label[cut:], src, sections=[cut, z], **info)
