"""Turning the RETINA benchmark datasets, as their owners publish them, into the layout the
``retina_finetune`` bundle trains on.

Output (``DST``)::

    DST/train/images/<name>.<ext>    DST/train/labels/<name>.<ext>
    DST/val/images/...               DST/val/labels/...
    DST/test/images/...              DST/test/labels/...
    DST/dataset.json

Images are uint8 (2D ``(Y, X)`` PNGs or 3D ``(Z, Y, X)`` TIFF stacks by default); each label file
has the image's shape and holds uint8 class indices (0 = background). An image and its label
share the file name.

``dataset.json`` doubles as a bundle config overlay of plain values only (no ``$`` expressions,
``_target_`` keys or file macros: :func:`custom.overlays.check_plain_config` checks it before it is
written, and the bundles refuse an overlay from outside their ``configs/`` folder that holds code,
so a shared dataset cannot run code): its top-level keys are the
``retina_finetune`` config entries of the dataset (``dataset_dir``, ``num_classes``,
``label_names``, ``eval_classes``, ``class_weights``, ``planes``, ``iterations``,
``intensity_mean``/``intensity_std`` of the training images in [0, 1], and augmentation switches),
so training is::

    cd bundles/retina_finetune
    python -m monai.bundle run --config_file "['configs/train.json','DST/dataset.json']"

Everything else about the preparation (sources, splits and section ranges, label counts, notes)
is under the key ``dataset_info``. ``num_classes`` follows the bundle's convention: 1 for a
binary task (one sigmoid channel), else the number of classes including background.

Validation: the published training data are split deterministically, never at random: by
default the last ``val_fraction`` of the sections of each training volume (anisotropic stacks,
adjacent sections stay on one side), or of the training slices / images (2D datasets), or whole
volumes (``val_by="volumes"``). A published validation set (Guay's ``eval`` volume) is used as is.

Each ``prepare_<dataset>`` function takes the source folder as published and the output folder;
problems a user can fix raise :class:`custom.data.DatasetError` with one line naming the path
and what was expected there, option problems raise :class:`OptionError`. The
``scripts/prepare_*.py`` command-line tools are thin wrappers (see :func:`run_cli`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from custom.data import DatasetError, em_shape, find_em_files, no_foreground_error, pair_images_labels, read_em, write_em
from custom.overlays import check_plain_config

__all__ = [
    "CREMI_BACKGROUND_ID",
    "OptionError",
    "PEREZ_TASKS",
    "RECIPES",
    "Recipe",
    "DatasetWriter",
    "Reporter",
    "UROCELL_MISSING_DATA_ROWS",
    "binary_mask",
    "bundle_hint",
    "check_cem500k",
    "class_indices",
    "cremi_cleft_mask",
    "find_cremi_samples",
    "find_guay_volumes",
    "find_perez_layout",
    "find_slice_layout",
    "find_urocell_volumes",
    "holdout_count",
    "holdout_indices",
    "image_to_uint8",
    "prepare_cremi",
    "prepare_guay",
    "prepare_kasthuri",
    "prepare_perez",
    "prepare_urocell",
    "run_cli",
]

#: cleft id of background voxels in CREMI's ``volumes/labels/clefts`` (uint64)
CREMI_BACKGROUND_ID = 0xFFFFFFFFFFFFFFFF
CREMI_RAW_KEY = "volumes/raw"
CREMI_CLEFT_KEY = "volumes/labels/clefts"

#: Perez et al. organelle tasks: canonical name -> (singular label name, other folder names)
PEREZ_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lysosomes": ("lysosome", ("lyso", "lysosome")),
    "mitochondria": ("mitochondrion", ("mito", "mitochondrion")),
    "nuclei": ("nucleus", ("nucleus",)),
    "nucleoli": ("nucleolus", ("nucleolus",)),
}

#: UroCell volumes with a region of missing data: rows dropped from the start of the y axis
#: (the CEM500K benchmark preparation crops these two volumes the same way)
UROCELL_MISSING_DATA_ROWS = {"fib1-0-0-0": 12, "fib1-1-0-3": 54}
UROCELL_TEST_VOLUMES = ("fib1-0-0-0",)

SPLITS = ("train", "val", "test")
#: present in an output folder while a preparation writes it (an interrupted run can be replaced)
_INCOMPLETE = ".prepare-incomplete"
_EXT_3D = (".tif", ".tiff", ".nii.gz", ".nii", ".h5", ".hdf5", ".nrrd")
_EXT_2D = (".png", ".tif", ".tiff")


class OptionError(ValueError):
    """A command-line option has a value that cannot work (message: one line)."""


# --------------------------------------------------------------------------------------
# dataset recipes: what the paper trains on each benchmark
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """The fine-tuning set-up of one benchmark (RETINA paper, Table 1 and methods).

    Attributes:
        key: short name, used in output file names.
        title: human-readable name.
        label_names: one name per class index, background first.
        class_weights: cross-entropy class weights (multi-class tasks), or None.
        eval_classes: class indices whose IoU is averaged.
        planes: ``"xy"`` (anisotropic data, 2D images) or ``"orthoplane"`` (isotropic volumes).
        iterations: the paper's number of fine-tuning iterations, None where it gives none.
        extra: further bundle config entries (augmentation switches).
        notes: remarks recorded in ``dataset_info``.
    """

    key: str
    title: str
    label_names: tuple[str, ...]
    class_weights: tuple[float, ...] | None = None
    eval_classes: tuple[int, ...] | None = None
    planes: str = "xy"
    iterations: int | None = None
    extra: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def label_classes(self) -> int:
        """Number of class indices a label may hold (at least 2)."""
        return len(self.label_names)

    @property
    def num_classes(self) -> int:
        """Network output channels in the bundle's convention (1 for a binary task)."""
        return 1 if self.label_classes == 2 else self.label_classes

    def config(self) -> dict:
        """The bundle config entries this recipe sets (without dataset-dependent ones)."""
        out: dict[str, Any] = {
            "num_classes": self.num_classes,
            "label_names": {str(i): n for i, n in enumerate(self.label_names)},
            "eval_classes": list(self.eval_classes or range(1, self.label_classes)),
            "class_weights": None if self.class_weights is None else [float(w) for w in self.class_weights],
            "planes": self.planes,
        }
        if self.iterations:
            out["iterations"] = int(self.iterations)
        out.update(self.extra)
        return out


def _perez_recipe(task: str) -> Recipe:
    singular = PEREZ_TASKS[task][0]
    return Recipe(
        key=f"perez_{task}",
        title=f"Perez et al. {task} (2D, binary)",
        label_names=("background", singular),
        iterations=2500,
        notes=(
            "Perez labels are partial: the reference scores only predicted connected components "
            "that touch a ground-truth component.",
        ),
    )


RECIPES: dict[str, Recipe] = {
    "cremi": Recipe(
        key="cremi",
        title="CREMI synaptic clefts (3D, binary)",
        label_names=("background", "synaptic cleft"),
        iterations=2000,
        notes=("cleft id 0xffffffffffffffff is background, every other id a cleft voxel",),
    ),
    "guay": Recipe(
        key="guay",
        title="Guay et al. platelets (3D, 7 classes)",
        label_names=(
            "background",
            "cell",
            "mitochondrion",
            "canalicular channel",
            "alpha granule",
            "dense granule",
            "dense granule core",
        ),
        class_weights=(0.1, 0.1, 1.0, 1.0, 0.1, 3.0, 3.0),
        eval_classes=(2, 3, 4, 5, 6),
        iterations=2500,
        extra={"noise_prob": 0.5, "blur_prob": 0.5},
        notes=(
            "images rescaled to uint8 by each volume's min and max",
            "Guay only: Gaussian noise (var 400-1200) and blur (kernel 3-7) augmentation; the "
            "probability 0.5 is this project's choice (the paper gives none)",
        ),
    ),
    "kasthuri_pp": Recipe(
        key="kasthuri_pp",
        title="Kasthuri++ mitochondria (3D anisotropic, binary)",
        label_names=("background", "mitochondrion"),
        iterations=10000,
        notes=("masks 255 -> 1; other non-zero mask values (padding) -> 0",),
    ),
    "lucchi_pp": Recipe(
        key="lucchi_pp",
        title="Lucchi++ mitochondria (3D anisotropic, binary)",
        label_names=("background", "mitochondrion"),
        notes=("not a RETINA benchmark: iterations left at the bundle default",
               "masks 255 -> 1; other non-zero mask values (padding) -> 0"),
    ),
    "urocell": Recipe(
        key="urocell",
        title="UroCell lysosomes and mitochondria (3D isotropic, 3 classes)",
        label_names=("background", "lysosome", "mitochondrion"),
        class_weights=(0.1, 1.0, 1.0),
        eval_classes=(1, 2),
        planes="orthoplane",
        iterations=1000,
        notes=("isotropic FIB-SEM: trained on xy, xz and yz slices",),
    ),
    **{f"perez_{t}": _perez_recipe(t) for t in PEREZ_TASKS},
}


# --------------------------------------------------------------------------------------
# messages and progress
# --------------------------------------------------------------------------------------
class Reporter:
    """Progress and warning output of a preparation run.

    Messages go to stdout as ``[prog] message`` (suppressed by ``quiet``); warnings always go to
    stderr and are kept in :attr:`warnings` (recorded in ``dataset_info``). :meth:`progress`
    returns a counter that prints ``label: i/n`` at most every ``interval`` seconds and at the end.
    """

    def __init__(self, prog: str = "prepare", quiet: bool = False, interval: float = 2.0) -> None:
        self.prog = prog
        self.quiet = bool(quiet)
        self.interval = float(interval)
        self.warnings: list[str] = []

    def say(self, message: str) -> None:
        """Print one progress line (unless quiet)."""
        if not self.quiet:
            print(f"[{self.prog}] {message}", flush=True)

    def warn(self, message: str) -> None:
        """Print a warning to stderr and remember it."""
        self.warnings.append(message)
        print(f"[{self.prog}] warning: {message}", file=sys.stderr, flush=True)

    def progress(self, label: str, total: int) -> "_Progress":
        """A counter for ``total`` steps of ``label``."""
        return _Progress(self, label, int(total))


class _Progress:
    def __init__(self, reporter: Reporter, label: str, total: int) -> None:
        self.reporter, self.label, self.total = reporter, label, total
        self.done = 0
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.reporter.interval:
            self._last = now
            self.reporter.say(f"{self.label}: {self.done}/{self.total}")


@contextmanager
def _quiet_reader_warnings():
    """Silence ``custom.data``'s per-file notices (e.g. 'identical colour channels' for every
    RGB mask of Kasthuri++) while masks are read."""
    log = logging.getLogger("custom.data")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --------------------------------------------------------------------------------------
# pixel conversions
# --------------------------------------------------------------------------------------
def image_to_uint8(image: np.ndarray, source: str | os.PathLike = "") -> tuple[np.ndarray, str]:
    """Convert an EM image or volume to uint8, by its dtype and range.

    - uint8: unchanged; bool: 0/255.
    - float within [0, 1]: times 255, rounded; float within [0, 255]: rounded.
    - anything else (uint16, int16, other floats): linear min-max rescale of this array to
      [0, 255] (how the Guay volumes are published for benchmarks: uint16 -> uint8).

    Returns:
        ``(uint8 array, description of the conversion)``.

    Raises:
        DatasetError: non-finite values or a non-numeric dtype.
    """
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a, "uint8 as stored"
    if a.dtype == bool:
        return a.astype(np.uint8) * np.uint8(255), "bool -> 0/255"
    if not np.issubdtype(a.dtype, np.number):
        raise DatasetError(f"{os.fspath(source)}: image dtype {a.dtype} is not numeric")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DatasetError(f"{os.fspath(source)}: image holds non-finite values (NaN or inf)")
    lo, hi = float(a.min()), float(a.max())
    if np.issubdtype(a.dtype, np.floating) and lo >= 0.0 and hi <= 255.0:
        scale, how = (255.0, "float [0, 1] x 255") if hi <= 1.0 else (1.0, "float [0, 255] rounded")
        return _scaled(a, 0.0, scale), how
    if hi == lo:
        return np.zeros(a.shape, np.uint8), f"constant {lo:g} -> 0"
    return _scaled(a, lo, 255.0 / (hi - lo)), f"{a.dtype} min-max [{lo:g}, {hi:g}] -> [0, 255]"


def _scaled(a: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """``rint((a - offset) * scale)`` clipped to uint8, one section at a time (bounded memory)."""
    out = np.empty(a.shape, np.uint8)
    parts = range(a.shape[0]) if a.ndim == 3 else [slice(None)]
    for i in parts:
        v = (a[i].astype(np.float32) - np.float32(offset)) * np.float32(scale)
        np.clip(np.rint(v), 0, 255, out=v)
        out[i] = v
    return out


def binary_mask(mask: np.ndarray, source: str | os.PathLike = "") -> tuple[np.ndarray, int]:
    """Binary uint8 label from a published mask.

    Masks already holding only 0 and 1 are kept. Otherwise foreground is every value >= 255
    (the 0/255 masks of Kasthuri++, Lucchi++ and Perez); other non-zero values, such as the
    padding of Kasthuri++ masks, become background, and are counted.

    Returns:
        ``(uint8 mask of 0/1, number of pixels with values strictly between 0 and 255)``.

    Raises:
        DatasetError: negative, non-finite or non-numeric values.
    """
    m = np.asarray(mask)
    if m.dtype == bool:
        return m.astype(np.uint8), 0
    if not np.issubdtype(m.dtype, np.number):
        raise DatasetError(f"{os.fspath(source)}: mask dtype {m.dtype} is not numeric")
    if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
        raise DatasetError(f"{os.fspath(source)}: mask holds non-finite values (NaN or inf)")
    lo, hi = m.min(), m.max()
    if lo < 0:
        raise DatasetError(f"{os.fspath(source)}: mask holds negative values (min {lo})")
    if hi <= 1:
        if np.issubdtype(m.dtype, np.floating):
            return (m >= 0.5).astype(np.uint8), int(((m > 0) & (m < 1)).sum())
        return m.astype(np.uint8), 0
    fg = m >= 255
    return fg.astype(np.uint8), int(((m > 0) & ~fg).sum())


def class_indices(label: np.ndarray, label_classes: int, source: str | os.PathLike = "") -> np.ndarray:
    """A label map of class indices ``0 .. label_classes - 1`` as uint8.

    Raises:
        DatasetError: non-integer, negative or too large values.
    """
    a = np.asarray(label)
    src = os.fspath(source)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.number):
        raise DatasetError(f"{src}: label dtype {a.dtype} is not numeric")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise DatasetError(f"{src}: label holds non-integer values; expected class indices 0..{label_classes - 1}")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi >= label_classes:
        raise DatasetError(
            f"{src}: label values {lo:g}..{hi:g}; expected class indices 0..{label_classes - 1} "
            f"({label_classes} classes)"
        )
    return a.astype(np.uint8)


def cremi_cleft_mask(clefts: np.ndarray, source: str | os.PathLike = "volumes/labels/clefts") -> np.ndarray:
    """Binary uint8 cleft mask from CREMI cleft ids (``0xffffffffffffffff`` = background).

    Signed 64-bit ids (the background id reads as -1) are handled too.

    Raises:
        DatasetError: ids that are not 64-bit integers (narrower types cannot hold the
            background id, so every voxel would become a cleft).
    """
    ids = np.asarray(clefts)
    if not np.issubdtype(ids.dtype, np.integer) or ids.dtype.itemsize != 8:
        raise DatasetError(
            f"{os.fspath(source)}: CREMI cleft labels must be 64-bit integer ids (background 0xffffffffffffffff), "
            f"got dtype {ids.dtype}"
        )
    return (ids.astype(np.uint64, copy=False) != np.uint64(CREMI_BACKGROUND_ID)).astype(np.uint8)


# --------------------------------------------------------------------------------------
# deterministic validation split
# --------------------------------------------------------------------------------------
def _check_fraction(fraction: float) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise OptionError(f"val_fraction must be a number in [0, 1), got {fraction!r}") from None
    if not 0.0 <= f < 1.0:
        raise OptionError(f"val_fraction must be in [0, 1), got {fraction!r}")
    return f


def _check_val_by(val_by: str) -> str:
    if val_by not in ("sections", "volumes"):
        raise OptionError(f"val_by must be 'sections' or 'volumes', got {val_by!r}")
    return val_by


def holdout_count(n: int, fraction: float) -> int:
    """How many of ``n`` items (sections, images, volumes) go to validation.

    ``round(n * fraction)``, at least 1 when ``fraction > 0`` and at most ``n - 1`` so that
    training keeps at least one; 0 when ``fraction == 0`` or ``n < 2``.
    """
    f = _check_fraction(fraction)
    if f == 0.0 or n < 2:
        return 0
    return min(n - 1, max(1, int(math.floor(n * f + 0.5))))


def holdout_indices(n: int, fraction: float, how: str = "tail") -> list[int]:
    """Indices of the ``holdout_count(n, fraction)`` validation items among ``n``.

    ``how="tail"``: the last ones (slices of one volume: neighbours stay together);
    ``how="spread"``: evenly spaced over the list (independent 2D images).
    """
    k = holdout_count(n, fraction)
    if k == 0:
        return []
    if how == "tail":
        return list(range(n - k, n))
    if how == "spread":
        return [int((i + 0.5) * n / k) for i in range(k)]
    raise OptionError(f"how must be 'tail' or 'spread', got {how!r}")


# --------------------------------------------------------------------------------------
# writing the output layout
# --------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _safe_name(name: str) -> str:
    """A file-name stem made of ``[A-Za-z0-9._+-]`` (no leading dot, '$', '@' or '%', so the
    names are inert in a bundle config too)."""
    out = _SAFE.sub("_", str(name)).strip("._")
    return out or "image"


def _is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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
        if _is_within(dst, src) or _is_within(src, dst):
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
            "prepared_by": f"custom.prepare ({self.reporter.prog})",
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
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-dataset.json")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, path)
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


def _write_training_volumes(
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
        if _check_fraction(val_fraction) > 0 and not held:
            rep.warn(f"val_by=volumes needs at least 2 training volumes, found {len(volumes)}: no validation split")
        for i, (name, load) in enumerate(volumes):
            image, label, src, info = load()
            split = "val" if i in held else "train"
            rep.say(f"{split}: {name} {tuple(image.shape)}")
            writer.add(split, name, image, label, src, **info)
        return
    _check_val_by(val_by)
    for name, load in volumes:
        image, label, src, info = load()
        if image.ndim != 3:
            raise DatasetError(f"{src}: expected a 3D volume, got shape {image.shape}")
        z = image.shape[0]
        k = holdout_count(z, val_fraction)
        if _check_fraction(val_fraction) > 0 and k == 0:
            rep.warn(f"{src}: {z} section(s), too few to hold out validation sections")
        cut = z - k
        rep.say(f"train: {name} sections 0-{cut - 1}" + (f", val: sections {cut}-{z - 1}" if k else ""))
        writer.add("train", name, image[:cut], label[:cut], src, sections=[0, cut], **info)
        if k:
            writer.add("val", name, image[cut:], label[cut:], src, sections=[cut, z], **info)


def _existing_folder(src: str | os.PathLike, expected: str) -> Path:
    """``src`` as an absolute path, checked to be a folder."""
    p = Path(os.path.abspath(os.fspath(src)))
    if not p.exists():
        raise DatasetError(f"{p}: no such folder; expected {expected}")
    if not p.is_dir():
        raise DatasetError(f"{p}: is a file; expected a folder holding {expected}")
    return p


def _listing(folder: Path, limit: int = 8) -> str:
    try:
        names = sorted(n + ("/" if (folder / n).is_dir() else "") for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return "nothing readable"
    if not names:
        return "an empty folder"
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _subdirs(folder: Path) -> dict[str, Path]:
    """Child folders by lower-case name (hidden ones skipped)."""
    try:
        return {e.name.lower(): Path(e.path) for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
    except OSError:
        return {}


def _stem(path: str | os.PathLike) -> str:
    name = os.path.basename(os.fspath(path))
    if name.lower().endswith(".nii.gz"):
        return name[:-7]
    return os.path.splitext(name)[0]


_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


def _pair_slices(image_dir: Path, label_dir: Path) -> list[dict]:
    """Pair per-slice images with masks: by file name (``custom.data.pair_images_labels``), else
    by the last number in the names (Lucchi++ names masks ``0.png`` for image ``mask0000.png``;
    Perez names ``<prefix>.<n>.png`` with different prefixes)."""

    def by_number(paths: list[str]) -> dict[int, str] | None:
        out: dict[int, str] = {}
        for p in paths:
            m = _LAST_INT.search(_stem(p))
            if m is None or int(m.group(1)) in out:
                return None
            out[int(m.group(1))] = p
        return out

    try:
        return pair_images_labels(image_dir, label_dir)
    except DatasetError as by_name:
        first_error = str(by_name)
    try:
        ni, nl = by_number(find_em_files(image_dir)), by_number(find_em_files(label_dir))
    except DatasetError:
        ni = nl = None
    if ni is None or nl is None or set(ni) != set(nl):
        raise DatasetError(f"{first_error} (pairing by the number in the names failed too)")
    return [{"image": ni[k], "label": nl[k]} for k in sorted(ni)]


def _read_pairs_2d(
    pairs: Sequence[dict], reporter: Reporter, label: str
) -> Iterable[tuple[str, np.ndarray, np.ndarray, dict, int]]:
    """Yield ``(name, image uint8, binary mask, info, intermediate-pixel count)`` per pair."""
    prog = reporter.progress(label, len(pairs))
    for pair in pairs:
        image, how = image_to_uint8(read_em(pair["image"]), pair["image"])
        with _quiet_reader_warnings():
            raw_mask = read_em(pair["label"], role="label")
        mask, odd = binary_mask(raw_mask, pair["label"])
        if mask.shape != image.shape:
            raise DatasetError(f"{pair['label']}: mask shape {mask.shape} differs from image shape {image.shape} of {pair['image']}")
        info = {"label_source": pair["label"]}
        if how != "uint8 as stored":
            info["intensity_conversion"] = how
        yield _stem(pair["image"]), image, mask, info, odd
        prog.update()


def _warn_intermediate(reporter: Reporter, n: int) -> None:
    if n:
        reporter.warn(f"{n} mask pixel(s) with values between 1 and 254 (e.g. padding) were set to background (masks: 255 -> 1)")


def _as_names(value: str | Sequence[str] | None) -> list[str]:
    """A list of names from ``"A,B"``, ``["A", "B"]`` or ``("A", "B")`` (fire passes either)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


# --------------------------------------------------------------------------------------
# CREMI
# --------------------------------------------------------------------------------------
_CREMI_NAME = re.compile(r"^sample_?([abc])(?:_\d{8})?$", re.IGNORECASE)
_CREMI_EXPECTED = (
    "the CREMI HDF5 files sample_A_20160501.hdf, sample_B_20160501.hdf and sample_C_20160501.hdf "
    "(cremi.org; datasets volumes/raw and volumes/labels/clefts)"
)


def find_cremi_samples(src: str | os.PathLike) -> dict[str, Path]:
    """CREMI sample files under ``src`` (recursive) by letter ``"A"``, ``"B"``, ``"C"``.

    Names ``sample_A_20160501.hdf``, ``sample_A.h5`` etc. (``.hdf``, ``.h5``, ``.hdf5``); the
    padded test samples (``sample_A+_...``, no labels) and other files are ignored.
    """
    root = _existing_folder(src, _CREMI_EXPECTED)
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            stem, suffix = os.path.splitext(fn)
            if suffix.lower() not in (".hdf", ".h5", ".hdf5"):
                continue
            m = _CREMI_NAME.match(stem)
            if not m:
                continue
            letter = m.group(1).upper()
            path = Path(dirpath) / fn
            if letter in found:
                raise DatasetError(f"{root}: two files for CREMI sample {letter}: {found[letter]} and {path}; keep one")
            found[letter] = path
    return found


def _read_cremi(path: Path, reporter: Reporter, chunk: int = 8) -> tuple[np.ndarray, np.ndarray, str, dict]:
    import h5py

    reporter.say(f"reading {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read HDF5 ({e})") from None
    with f:
        raw_ds, lab_ds = f.get(CREMI_RAW_KEY), f.get(CREMI_CLEFT_KEY)
        if not isinstance(raw_ds, h5py.Dataset):
            raise DatasetError(f"{path}: no dataset '{CREMI_RAW_KEY}'; expected a CREMI sample file")
        if not isinstance(lab_ds, h5py.Dataset):
            raise DatasetError(
                f"{path}: no dataset '{CREMI_CLEFT_KEY}' (only the training samples A, B, C carry cleft labels; "
                "the padded test samples A+, B+, C+ do not)"
            )
        if raw_ds.ndim != 3 or raw_ds.shape != lab_ds.shape:
            raise DatasetError(f"{path}: {CREMI_RAW_KEY} {raw_ds.shape} and {CREMI_CLEFT_KEY} {lab_ds.shape} must be equal 3D shapes")
        try:
            raw = raw_ds[()]
            image, how = image_to_uint8(raw, path)
            del raw
            label = np.empty(lab_ds.shape, np.uint8)
            z = lab_ds.shape[0]
            prog = reporter.progress(f"{path.name}: clefts", z)
            for z0 in range(0, z, chunk):
                z1 = min(z, z0 + chunk)
                label[z0:z1] = cremi_cleft_mask(lab_ds[z0:z1], path)
                prog.update(z1 - z0)
        except DatasetError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {' '.join(str(e).split())})") from None
        info: dict[str, Any] = {}
        res = raw_ds.attrs.get("resolution")
        if res is not None:
            info["resolution_nm"] = [float(r) for r in np.ravel(res)]
        if how != "uint8 as stored":
            info["intensity_conversion"] = how
    return image, label, os.fspath(path), info


def prepare_cremi(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    train_samples: str | Sequence[str] = ("A", "B"),
    test_samples: str | Sequence[str] = ("C",),
    val_fraction: float = 0.1,
    val_by: str = "sections",
    ext: str = ".tif",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """CREMI (synaptic clefts) -> binary cleft labels.

    ``src`` holds ``sample_{A,B,C}_20160501.hdf`` (any sub-folder). Training samples (A, B) give
    ``train/`` and ``val/`` (the last ``val_fraction`` of their sections), test samples (C)
    ``test/``. Labels: 1 where ``volumes/labels/clefts`` is not ``0xffffffffffffffff``.
    Returns the ``dataset.json`` content.
    """
    rep = reporter or Reporter("prepare_cremi")
    train, test = [s.upper() for s in _as_names(train_samples)], [s.upper() for s in _as_names(test_samples)]
    bad = [s for s in train + test if s not in ("A", "B", "C")]
    if bad or not train:
        raise OptionError(f"CREMI samples are A, B, C; got train {train}, test {test}")
    if set(train) & set(test):
        raise OptionError(f"a CREMI sample cannot be both train and test: {sorted(set(train) & set(test))}")
    _check_fraction(val_fraction)
    _check_val_by(val_by)
    files = find_cremi_samples(src)
    missing = [s for s in train + test if s not in files]
    if missing:
        raise DatasetError(
            f"{os.fspath(src)}: no file for CREMI sample(s) {', '.join(missing)}; expected {_CREMI_EXPECTED}; "
            f"found {_listing(Path(src))}"
        )
    writer = DatasetWriter(dst, RECIPES["cremi"], src, rep, overwrite=overwrite, ext=ext)
    volumes = [(f"sample_{s}", (lambda p=files[s]: _read_cremi(p, rep))) for s in train]
    _write_training_volumes(writer, volumes, val_fraction, val_by)
    for s in test:
        image, label, path, info = _read_cremi(files[s], rep)
        rep.say(f"test: sample_{s} {tuple(image.shape)}")
        writer.add("test", f"sample_{s}", image, label, path, **info)
    return writer.finish({"train_samples": train, "test_samples": test, "val_fraction": val_fraction, "val_by": val_by})


# --------------------------------------------------------------------------------------
# Guay
# --------------------------------------------------------------------------------------
_GUAY_NAME = re.compile(r"^(train|training|eval|valid|validation|val|test)[-_](images?|labels?)$", re.IGNORECASE)
_GUAY_EXPECTED = (
    "the Guay platelet TIFF stacks train-images.tif, train-labels.tif (and eval-images.tif, "
    "eval-labels.tif, test-images.tif, test-labels.tif) from platelet_data_1219.zip"
)
_GUAY_SPLIT = {"train": "train", "training": "train", "test": "test"}


def find_guay_volumes(src: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Guay stacks under ``src`` (recursive):
    ``{"train"|"val"|"test": {"image": path, "label": path, "name": output name}}``.

    ``eval``/``valid``/``validation`` name the published validation volume. Raises
    DatasetError when the training pair is incomplete or a name occurs twice.
    """
    root = _existing_folder(src, _GUAY_EXPECTED)
    try:
        files = find_em_files(root)
    except DatasetError:
        raise DatasetError(f"{root}: expected {_GUAY_EXPECTED}; found {_listing(root)}") from None
    found: dict[str, dict[str, str]] = {}
    for p in files:
        m = _GUAY_NAME.match(_stem(p))
        if not m:
            continue
        split = _GUAY_SPLIT.get(m.group(1).lower(), "val")
        role = "image" if m.group(2).lower().startswith("image") else "label"
        slot = found.setdefault(split, {"name": f"guay_{m.group(1).lower()}"})
        if role in slot:
            raise DatasetError(f"{root}: two {split} {role} volumes: {slot[role]} and {p}; keep one")
        slot[role] = p
    for split, slot in list(found.items()):
        if "image" not in slot or "label" not in slot:
            have = slot.get("image") or slot.get("label")
            if split == "train":
                raise DatasetError(f"{have}: its {'labels' if 'image' in slot else 'images'} partner is missing; expected {_GUAY_EXPECTED}")
            del found[split]
    if "train" not in found:
        raise DatasetError(f"{root}: expected {_GUAY_EXPECTED}; found {_listing(root)}")
    return found


def _read_guay(pair: dict[str, str], reporter: Reporter) -> tuple[np.ndarray, np.ndarray, str, dict]:
    reporter.say(f"reading {pair['image']}")
    image, how = image_to_uint8(read_em(pair["image"]), pair["image"])
    label = class_indices(read_em(pair["label"], role="label"), RECIPES["guay"].label_classes, pair["label"])
    if image.ndim != 3:
        raise DatasetError(f"{pair['image']}: expected a 3D TIFF stack, got shape {image.shape}")
    if label.shape != image.shape:
        raise DatasetError(f"{pair['label']}: label shape {label.shape} differs from image shape {image.shape}")
    return image, label, pair["image"], {"label_source": pair["label"], "intensity_conversion": how}


def prepare_guay(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    val_fraction: float = 0.1,
    use_published_val: bool = True,
    ext: str = ".tif",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Guay et al. platelets (SBF-SEM, 7 classes) -> uint8 stacks with labels 0-6.

    ``src`` holds ``{train,eval,test}-{images,labels}.tif``. Images (16-bit) are rescaled to
    uint8 by each volume's min and max; labels are checked to hold 0..6. The published ``eval``
    volume becomes ``val/``; without it, or with ``use_published_val=False`` (the eval volume is
    then left out), the last ``val_fraction`` of the training sections are held out instead.
    """
    rep = reporter or Reporter("prepare_guay")
    _check_fraction(val_fraction)
    found = find_guay_volumes(src)
    writer = DatasetWriter(dst, RECIPES["guay"], src, rep, overwrite=overwrite, ext=ext)
    if "val" in found and use_published_val:
        for split in ("train", "val"):
            image, label, path, info = _read_guay(found[split], rep)
            rep.say(f"{split}: {found[split]['name']} {tuple(image.shape)}")
            writer.add(split, found[split]["name"], image, label, path, **info)
        how_val = "published eval volume"
    else:
        if "val" in found:
            rep.warn("the published eval volume is not used (use_published_val=False)")
        _write_training_volumes(writer, [(found["train"]["name"], lambda: _read_guay(found["train"], rep))], val_fraction)
        how_val = f"last {val_fraction} of the training sections"
    if "test" in found:
        image, label, path, info = _read_guay(found["test"], rep)
        rep.say(f"test: {found['test']['name']} {tuple(image.shape)}")
        writer.add("test", found["test"]["name"], image, label, path, **info)
    else:
        rep.warn("no test-images.tif/test-labels.tif found: no test split")
    return writer.finish({"validation": how_val})


# --------------------------------------------------------------------------------------
# Kasthuri++ / Lucchi++
# --------------------------------------------------------------------------------------
_SLICES_EXPECTED = (
    "the Kasthuri++/Lucchi++ folders Train_In/, Train_Out/, Test_In/, Test_Out/ (per-slice images "
    "and masks, as in kasthuri_pp.zip or lucchi_pp.zip) or train/{images,masks}/ and test/{images,masks}/"
)


def _split_folders(base: Path) -> dict[str, tuple[Path, Path]]:
    """``{split: (image_dir, label_dir)}`` of a ``train/{images,masks|labels}`` layout under ``base``."""
    kids = _subdirs(base)
    out: dict[str, tuple[Path, Path]] = {}
    for names, split in ((("train", "training"), "train"), (("valid", "val", "validation", "eval"), "val"), (("test",), "test")):
        for n in names:
            if n in kids:
                sub = _subdirs(kids[n])
                lab = sub.get("masks") or sub.get("labels") or sub.get("mask") or sub.get("label")
                if "images" in sub and lab is not None:
                    out[split] = (sub["images"], lab)
                    break
    return out


def find_slice_layout(src: str | os.PathLike, expected: str = _SLICES_EXPECTED) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """Find a per-slice image/mask layout at ``src`` or one folder below it.

    Recognises ``Train_In``/``Train_Out``/``Test_In``/``Test_Out`` (as published by Casser et al.)
    and ``{train,val,test}/{images,masks}``. Returns ``(base folder, {split: (image_dir, label_dir)})``.
    """
    root = _existing_folder(src, expected)
    candidates = [root] + [p for _, p in sorted(_subdirs(root).items())]
    for base in candidates:
        kids = _subdirs(base)
        if "train_in" in kids and "train_out" in kids:
            layout = {"train": (kids["train_in"], kids["train_out"])}
            if "test_in" in kids and "test_out" in kids:
                layout["test"] = (kids["test_in"], kids["test_out"])
            return base, layout
        layout = _split_folders(base)
        if "train" in layout:
            return base, layout
    raise DatasetError(f"{root}: expected {expected}; found {_listing(root)}")


def prepare_kasthuri(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dataset: str = "",
    val_fraction: float = 0.1,
    stack: bool = True,
    ext: str = ".tif",
    ext2d: str = ".png",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Kasthuri++ or Lucchi++ (mitochondria, per-slice images with 0/255 masks) -> binary labels.

    Args:
        dataset: ``"kasthuri_pp"`` or ``"lucchi_pp"``; default: ``lucchi_pp`` when the source
            path names Lucchi, else ``kasthuri_pp`` (sets dataset.json's recipe and file names).
        stack: write each split's slices as one TIFF stack (the benchmark evaluates whole
            volumes; slices must share a shape), else one 2D file per slice.
        val_fraction: the last fraction of the training slices becomes ``val/``.

    Masks: 255 -> 1, 0 and other values (padding) -> 0; masks holding only 0/1 are kept.
    """
    rep = reporter or Reporter("prepare_kasthuri")
    _check_fraction(val_fraction)
    key = (dataset or ("lucchi_pp" if "lucchi" in os.path.abspath(os.fspath(src)).lower() else "kasthuri_pp")).lower()
    key = {"kasthuri": "kasthuri_pp", "kasthuri++": "kasthuri_pp", "lucchi": "lucchi_pp", "lucchi++": "lucchi_pp"}.get(key, key)
    if key not in ("kasthuri_pp", "lucchi_pp"):
        raise OptionError(f"dataset must be 'kasthuri_pp' or 'lucchi_pp', got {dataset!r}")
    base, layout = find_slice_layout(src)
    rep.say(f"{RECIPES[key].title}: {base}")
    writer = DatasetWriter(dst, RECIPES[key], src, rep, overwrite=overwrite, ext=ext, ext2d=ext2d)
    odd = 0
    for split, (img_dir, lab_dir) in layout.items():
        pairs = _pair_slices(img_dir, lab_dir)
        held = set(holdout_indices(len(pairs), val_fraction, "tail")) if split == "train" and "val" not in layout else set()
        if stack:
            vol = lab = None
            for i, (name, image, mask, info, n_odd) in enumerate(_read_pairs_2d(pairs, rep, f"{split} slices")):
                if vol is None:
                    vol = np.empty((len(pairs), *image.shape), np.uint8)
                    lab = np.empty_like(vol)
                elif image.shape != vol.shape[1:]:
                    raise DatasetError(
                        f"{pairs[i]['image']}: slice shape {image.shape} differs from {vol.shape[1:]}; "
                        "pass --stack=False to write one file per slice"
                    )
                vol[i], lab[i] = image, mask
                odd += n_odd
            cut = len(pairs) - len(held)
            name = f"{key}_{split}"
            first, last = _stem(pairs[0]["image"]), _stem(pairs[-1]["image"])
            info = {"slices": f"{first} .. {last}", "image_dir": os.fspath(img_dir), "label_dir": os.fspath(lab_dir)}
            writer.add(split, name, vol[:cut], lab[:cut], img_dir, sections=[0, cut], **info)
            if held:
                writer.add("val", name, vol[cut:], lab[cut:], img_dir, sections=[cut, len(pairs)], **info)
        else:
            for i, (name, image, mask, info, n_odd) in enumerate(_read_pairs_2d(pairs, rep, f"{split} slices")):
                odd += n_odd
                writer.add("val" if i in held else split, name, image, mask, pairs[i]["image"], **info)
    if "test" not in layout:
        rep.warn("no test slices found (Test_In/Test_Out): no test split")
    _warn_intermediate(rep, odd)
    return writer.finish({"validation": "published" if "val" in layout else f"last {val_fraction} of the training slices",
                          "stacked": bool(stack)})


# --------------------------------------------------------------------------------------
# Perez
# --------------------------------------------------------------------------------------
_PEREZ_EXPECTED = (
    "the Perez et al. folders training_images/, training_labels/, test_images/, ground_truth/ with one "
    "sub-folder per organelle (lysosomes, mitochondria, nuclei, nucleoli), as in chm-supplemental_data.zip"
)


def _perez_task(name: str) -> str:
    n = str(name).strip().lower()
    for task, (singular, aliases) in PEREZ_TASKS.items():
        if n == task or n == singular or n in aliases:
            return task
    raise OptionError(f"unknown Perez task {name!r}; choose from {', '.join(PEREZ_TASKS)}")


def find_perez_layout(src: str | os.PathLike, tasks: Sequence[str]) -> dict[str, dict[str, tuple[Path, Path]]]:
    """Per task ``{split: (image_dir, label_dir)}`` of the published Perez layout (at ``src`` or
    one folder below, e.g. ``supplemental_data/``), or of the CEM500K benchmark layout
    ``{mito,lyso,nuclei,nucleoli}/{train,test}/{images,masks}``."""
    root = _existing_folder(src, _PEREZ_EXPECTED)
    for base in [root] + [p for _, p in sorted(_subdirs(root).items())]:
        kids = _subdirs(base)
        if "training_images" in kids and "training_labels" in kids:
            out: dict[str, dict[str, tuple[Path, Path]]] = {}
            for task in tasks:
                tr_i, tr_l = _subdirs(kids["training_images"]).get(task), _subdirs(kids["training_labels"]).get(task)
                if tr_i is None or tr_l is None:
                    raise DatasetError(
                        f"{base}: no training_images/{task}/ and training_labels/{task}/ folders; expected {_PEREZ_EXPECTED}"
                    )
                out[task] = {"train": (tr_i, tr_l)}
                te_i = _subdirs(kids["test_images"]).get(task) if "test_images" in kids else None
                te_l = _subdirs(kids["ground_truth"]).get(task) if "ground_truth" in kids else None
                if te_i is not None and te_l is not None:
                    out[task]["test"] = (te_i, te_l)
            return out
        by_alias = {}
        for task in tasks:
            for n in (task, *PEREZ_TASKS[task][1]):
                if n in kids and "train" in _split_folders(kids[n]):
                    by_alias[task] = _split_folders(kids[n])
                    break
        if by_alias:
            missing = [t for t in tasks if t not in by_alias]
            if missing:
                raise DatasetError(f"{base}: no train/{{images,masks}} folders for {', '.join(missing)}")
            return by_alias
    raise DatasetError(f"{root}: expected {_PEREZ_EXPECTED}; found {_listing(root)}")


def prepare_perez(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    tasks: str | Sequence[str] = tuple(PEREZ_TASKS),
    val_fraction: float = 0.1,
    ext2d: str = ".png",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, dict]:
    """Perez et al. (2D SBEM images, four separate binary tasks) -> one dataset per task.

    Each task is written to ``DST/<task>/`` (``lysosomes``, ``mitochondria``, ``nuclei``,
    ``nucleoli``), a complete dataset folder with its own ``dataset.json``. Images are paired
    with masks by the number in their names; masks 255 -> 1. Validation: ``val_fraction`` of the
    training images, evenly spread over the (name-sorted) list. Returns ``{task: dataset.json}``.
    """
    rep = reporter or Reporter("prepare_perez")
    _check_fraction(val_fraction)
    chosen = list(dict.fromkeys(_perez_task(t) for t in _as_names(tasks)))
    if not chosen:
        raise OptionError(f"no Perez task chosen; choose from {', '.join(PEREZ_TASKS)}")
    layout = find_perez_layout(src, chosen)
    out: dict[str, dict] = {}
    for task in chosen:
        rec = RECIPES[f"perez_{task}"]
        writer = DatasetWriter(Path(os.fspath(dst)) / task, rec, src, rep, overwrite=overwrite, ext2d=ext2d)
        odd = 0
        for split, (img_dir, lab_dir) in layout[task].items():
            pairs = _pair_slices(img_dir, lab_dir)
            held = set(holdout_indices(len(pairs), val_fraction, "spread")) if split == "train" and "val" not in layout[task] else set()
            for i, (name, image, mask, info, n_odd) in enumerate(_read_pairs_2d(pairs, rep, f"{task} {split}")):
                odd += n_odd
                writer.add("val" if i in held else split, name, image, mask, pairs[i]["image"], **info)
        if "test" not in layout[task]:
            rep.warn(f"{task}: no test images found (test_images/{task}, ground_truth/{task}): no test split")
        _warn_intermediate(rep, odd)
        out[task] = writer.finish({"task": task, "validation": f"{val_fraction} of the training images, evenly spread"})
        rep.warnings.clear()
    return out


# --------------------------------------------------------------------------------------
# UroCell
# --------------------------------------------------------------------------------------
_URO_ROLES = {
    "data": "image", "images": "image", "image": "image", "raw": "image", "volumes": "image",
    "lyso": "lyso", "lysosome": "lyso", "lysosomes": "lyso",
    "mito": "mito", "mitochondria": "mito", "mitochondrion": "mito",
    "masks": "label", "labels": "label", "label": "label",
}
_URO_EXPECTED = (
    "the UroCell NIfTI volumes data/<name>.nii.gz with labels lyso/<name>.nii.gz and mito/<name>.nii.gz "
    "(github.com/MancaZerovnikMekuc/UroCell)"
)


def find_urocell_volumes(src: str | os.PathLike) -> dict[str, dict[str, str]]:
    """UroCell volumes under ``src`` (recursive), grouped by name:
    ``{name: {"image": path, "lyso": path, "mito": path}}`` (or ``"label"`` for an already
    combined 0/1/2 label map). Roles come from the parent folder (``data``/``images``,
    ``lyso``, ``mito``, ``masks``/``labels``); other folders are ignored."""
    root = _existing_folder(src, _URO_EXPECTED)
    try:
        files = find_em_files(root)
    except DatasetError:
        raise DatasetError(f"{root}: expected {_URO_EXPECTED}; found {_listing(root)}") from None
    vols: dict[str, dict[str, str]] = {}
    for p in files:
        role = _URO_ROLES.get(os.path.basename(os.path.dirname(p)).lower())
        if role is None:
            continue
        slot = vols.setdefault(_stem(p), {})
        if role in slot:
            raise DatasetError(f"{root}: two {role} files for volume {_stem(p)}: {slot[role]} and {p}; keep one")
        slot[role] = p
    return vols


def _urocell_labelled(slot: dict[str, str]) -> bool:
    return "image" in slot and ("label" in slot or ("lyso" in slot and "mito" in slot))


def _read_urocell(name: str, slot: dict[str, str], crop_missing: bool, reporter: Reporter) -> tuple[np.ndarray, np.ndarray, str, dict]:
    reporter.say(f"reading {slot['image']}")
    image, how = image_to_uint8(read_em(slot["image"]), slot["image"])
    if image.ndim != 3:
        raise DatasetError(f"{slot['image']}: expected a 3D volume, got shape {image.shape}")
    info: dict[str, Any] = {"intensity_conversion": how}
    if "label" in slot:
        label = class_indices(read_em(slot["label"], role="label"), 3, slot["label"])
        info["label_source"] = slot["label"]
    else:
        lyso, _ = binary_mask(read_em(slot["lyso"], role="label"), slot["lyso"])
        mito, _ = binary_mask(read_em(slot["mito"], role="label"), slot["mito"])
        for part, path in ((lyso, slot["lyso"]), (mito, slot["mito"])):
            if part.shape != image.shape:
                raise DatasetError(f"{path}: label shape {part.shape} differs from image shape {image.shape} of {slot['image']}")
        both = int((lyso & mito).sum())
        if both:
            reporter.warn(f"{name}: {both} voxel(s) labelled both lysosome and mitochondrion; kept as mitochondrion")
        label = np.where(mito > 0, np.uint8(2), lyso).astype(np.uint8)
        info["label_source"] = {"lysosome": slot["lyso"], "mitochondrion": slot["mito"]}
    if label.shape != image.shape:
        raise DatasetError(f"{slot.get('label')}: label shape {label.shape} differs from image shape {image.shape}")
    rows = UROCELL_MISSING_DATA_ROWS.get(name, 0) if crop_missing else 0
    if rows:
        if rows >= image.shape[1]:
            raise DatasetError(f"{slot['image']}: cannot drop {rows} rows of missing data from shape {image.shape}")
        image, label = image[:, rows:], label[:, rows:]
        info["cropped_missing_rows_y"] = rows
    return image, label, slot["image"], info


def prepare_urocell(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    test_volumes: str | Sequence[str] = UROCELL_TEST_VOLUMES,
    val_fraction: float = 0.1,
    val_by: str = "sections",
    crop_missing: bool = True,
    ext: str = ".tif",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """UroCell (isotropic FIB-SEM, NIfTI) -> labels 0 background, 1 lysosome, 2 mitochondrion.

    ``src`` is the UroCell repository (``data/``, ``lyso/``, ``mito/``). Volumes with both label
    maps are used; ``test_volumes`` (default ``fib1-0-0-0``, as in the CEM500K benchmark) go to
    ``test/``, the others to ``train/`` and ``val/``. ``crop_missing`` drops the rows of missing
    data of ``fib1-0-0-0`` (12) and ``fib1-1-0-3`` (54) at the start of the y axis. Images are
    converted to uint8 (float 0-255 values rounded).
    """
    rep = reporter or Reporter("prepare_urocell")
    _check_fraction(val_fraction)
    _check_val_by(val_by)
    vols = find_urocell_volumes(src)
    labelled = {n: s for n, s in vols.items() if _urocell_labelled(s)}
    unlabelled = sorted(n for n, s in vols.items() if "image" in s and n not in labelled)
    orphans = sorted(n for n, s in vols.items() if "image" not in s)
    if not labelled:
        raise DatasetError(f"{os.fspath(src)}: no labelled volume; expected {_URO_EXPECTED}; found {_listing(Path(src))}")
    if orphans:
        rep.warn(f"label volume(s) without an image, ignored: {', '.join(orphans)}")
    if unlabelled:
        rep.say(f"unlabelled volume(s), skipped: {', '.join(unlabelled)}")
    test = [n for n in _as_names(test_volumes)]
    for n in test:
        if n not in labelled:
            rep.warn(f"test volume {n} not found among the labelled volumes ({', '.join(sorted(labelled))})")
    train = sorted(n for n in labelled if n not in test)
    if not train:
        raise DatasetError(f"{os.fspath(src)}: every labelled volume is a test volume ({', '.join(sorted(labelled))}); nothing to train on")
    writer = DatasetWriter(dst, RECIPES["urocell"], src, rep, overwrite=overwrite, ext=ext)
    volumes = [(n, (lambda n=n: _read_urocell(n, labelled[n], crop_missing, rep))) for n in train]
    _write_training_volumes(writer, volumes, val_fraction, val_by)
    for n in test:
        if n in labelled:
            image, label, path, info = _read_urocell(n, labelled[n], crop_missing, rep)
            rep.say(f"test: {n} {tuple(image.shape)}")
            writer.add("test", n, image, label, path, **info)
    return writer.finish({"train_volumes": train, "test_volumes": [n for n in test if n in labelled],
                          "val_fraction": val_fraction, "val_by": val_by, "crop_missing": bool(crop_missing)})


# --------------------------------------------------------------------------------------
# CEM500K
# --------------------------------------------------------------------------------------
def _header_dtype(path: str) -> str:
    """Pixel type from a 2D file's header (PIL mode or TIFF sample type), without reading pixels."""
    low = path.lower()
    if low.endswith((".tif", ".tiff")):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return str(tif.series[0].dtype)
    from PIL import Image

    with Image.open(path) as im:
        return {"L": "uint8", "1": "bool", "I;16": "uint16", "I": "int32", "F": "float32"}.get(im.mode, im.mode)


def check_cem500k(
    src: str | os.PathLike,
    file_list: str | os.PathLike | None = None,
    size: int = 224,
    read: bool = False,
    relative: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Check a CEM500K folder (EMPIAR-10592: ~0.5 M 2D 224x224 uint8 patches) before pretraining.

    Lists every image under ``src`` (recursive), reads each header (with ``read``, all pixels,
    which finds truncated files) and counts shapes and pixel types. Nothing is converted: the
    ``retina_pretrain`` bundle reads the folder as it is (``--dataset_dir``).

    Args:
        file_list: write the readable 2D images to this text file, one path a line.
        size: expected patch side; other sizes are counted (they still train: the pipeline crops).
        relative: paths in ``file_list`` relative to ``src`` instead of absolute.

    Returns:
        ``{"folder", "files", "ok", "size_counts", "dtype_counts", "not_2d", "unreadable", "problems"}``
        (``ok``: 2D ``size`` x ``size`` uint8 images; ``problems``: the first 20 messages).

    Raises:
        DatasetError: ``src`` is missing or holds no image.
    """
    rep = reporter or Reporter("prepare_cem500k")
    root = _existing_folder(src, "the CEM500K image patches (EMPIAR-10592)")
    try:
        files = find_em_files(root)
    except DatasetError:
        raise DatasetError(
            f"{root}: holds no images; expected the CEM500K patches (2D {size}x{size} uint8 .tiff/.png); found {_listing(root)}"
        ) from None
    sizes: Counter = Counter()
    dtypes: Counter = Counter()
    problems: list[str] = []
    usable: list[str] = []
    not_2d = unreadable = ok = 0
    prog = rep.progress("checked", len(files))
    for p in files:
        try:
            if read:
                arr = read_em(p)
                shape, dtype = arr.shape, str(arr.dtype)
            else:
                shape, dtype = em_shape(p), _header_dtype(p)
        except DatasetError as e:
            unreadable += 1
            problems.append(str(e))
        except Exception as e:  # a header library failing on a damaged file
            unreadable += 1
            problems.append(f"{p}: cannot read ({type(e).__name__}: {' '.join(str(e).split())})")
        else:
            if len(shape) != 2:
                not_2d += 1
                problems.append(f"{p}: shape {tuple(shape)} is not a 2D image")
            else:
                sizes["x".join(str(s) for s in shape)] += 1
                dtypes[dtype] += 1
                usable.append(p)
                ok += tuple(shape) == (size, size) and dtype == "uint8"
        prog.update()
    expected = f"{size}x{size}"
    if len(sizes) > 1 or (sizes and expected not in sizes):
        n_other = len(usable) - sizes.get(expected, 0)
        rep.warn(f"{n_other} image(s) are not {expected} (sizes: {dict(sizes.most_common(5))})")
    if set(dtypes) - {"uint8"}:
        rep.warn(f"pixel types other than uint8: {dict(dtypes)}")
    if file_list:
        out = Path(os.fspath(file_list))
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = [os.path.relpath(p, root) if relative else os.path.abspath(p) for p in usable]
        tmp = out.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{out.name}")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, out)
        rep.say(f"wrote {out}: {len(lines)} path(s)")
    summary = {
        "folder": os.fspath(root),
        "files": len(files),
        "ok": ok,
        "size_counts": dict(sizes.most_common()),
        "dtype_counts": dict(dtypes.most_common()),
        "not_2d": not_2d,
        "unreadable": unreadable,
        "problems": problems[:20],
    }
    rep.say(f"{len(files)} file(s): {ok} {expected} uint8, {len(usable) - ok} other 2D, {not_2d} not 2D, {unreadable} unreadable")
    for msg in problems[:20]:
        print(f"[{rep.prog}] problem: {msg}", file=sys.stderr, flush=True)
    return summary


# --------------------------------------------------------------------------------------
# command-line helper
# --------------------------------------------------------------------------------------
def run_cli(prog: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, reporter=Reporter(prog, quiet), **kwargs)`` for a script; a
    :class:`DatasetError` or :class:`OptionError` ends the program with ``prog: error: <message>``
    on stderr and exit status 1 (no traceback). ``quiet`` is taken from ``kwargs``."""
    quiet = bool(kwargs.pop("quiet", False))
    reporter = Reporter(prog, quiet=quiet)
    try:
        return fn(*args, reporter=reporter, **kwargs)
    except (DatasetError, OptionError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def bundle_hint(dataset_json: str | os.PathLike) -> str:
    """The command that trains ``retina_finetune`` on a prepared dataset."""
    path = os.path.abspath(os.fspath(dataset_json))
    return (
        "train with: cd bundles/retina_finetune && python -m monai.bundle run "
        f"--config_file \"['configs/train.json','{path}']\""
    )
