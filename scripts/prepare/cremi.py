"""Prepare CREMI (synaptic clefts, 3D) for the retina_finetune bundle.

    python scripts/prepare.py cremi SRC DST [--train_samples A,B] [--test_samples C]
        [--val_fraction 0.1] [--val_by sections|volumes] [--ext .tif] [--overwrite] [--quiet]

SRC holds the CREMI files as published on cremi.org: sample_A_20160501.hdf,
sample_B_20160501.hdf, sample_C_20160501.hdf (HDF5 datasets volumes/raw and
volumes/labels/clefts, cleft id 0xffffffffffffffff = background). A and B train, C tests.
DST receives {train,val,test}/{images,labels}/sample_X.tif (uint8 stacks; labels 0 = background,
1 = cleft; validation = the last 10% of the sections of each training sample) and dataset.json,
which is also a config overlay for the bundle (see scripts/prepare/writer.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.io import DatasetError

from .common import (OptionError, Reporter, as_names, check_fraction, check_val_by, command, existing_folder,
                     image_to_uint8, listing)
from .recipes import RECIPES
from .writer import DatasetWriter, write_training_volumes

#: cleft id of background voxels in CREMI's ``volumes/labels/clefts`` (uint64)
CREMI_BACKGROUND_ID = 0xFFFFFFFFFFFFFFFF
CREMI_RAW_KEY = "volumes/raw"
CREMI_CLEFT_KEY = "volumes/labels/clefts"


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
    root = existing_folder(src, _CREMI_EXPECTED)
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

    Args:
        src: folder with sample_{A,B,C}_20160501.hdf (searched recursively).
        dst: output folder (new, or pass ``--overwrite``).
        train_samples: samples for train/val, comma separated.
        test_samples: samples for test.
        val_fraction: fraction held out for validation (0 for none).
        val_by: ``sections`` (the last sections of each training sample) or ``volumes``.
        ext: 3D output suffix: .tif (default), .nii.gz, .h5 or .nrrd.
        overwrite: replace an earlier preparation in ``dst``.
        reporter: progress output (on the command line ``--quiet``: none).
    """
    rep = reporter or Reporter("prepare_cremi")
    train, test = [s.upper() for s in as_names(train_samples)], [s.upper() for s in as_names(test_samples)]
    bad = [s for s in train + test if s not in ("A", "B", "C")]
    if bad or not train:
        raise OptionError(f"CREMI samples are A, B, C; got train {train}, test {test}")
    if set(train) & set(test):
        raise OptionError(f"a CREMI sample cannot be both train and test: {sorted(set(train) & set(test))}")
    check_fraction(val_fraction)
    check_val_by(val_by)
    files = find_cremi_samples(src)
    missing = [s for s in train + test if s not in files]
    if missing:
        raise DatasetError(
            f"{os.fspath(src)}: no file for CREMI sample(s) {', '.join(missing)}; expected {_CREMI_EXPECTED}; "
            f"found {listing(Path(src))}"
        )
    writer = DatasetWriter(dst, RECIPES["cremi"], src, rep, overwrite=overwrite, ext=ext)
    volumes = [(f"sample_{s}", (lambda p=files[s]: _read_cremi(p, rep))) for s in train]
    write_training_volumes(writer, volumes, val_fraction, val_by)
    for s in test:
        image, label, path, info = _read_cremi(files[s], rep)
        rep.say(f"test: sample_{s} {tuple(image.shape)}")
        writer.add("test", f"sample_{s}", image, label, path, **info)
    return writer.finish({"train_samples": train, "test_samples": test, "val_fraction": val_fraction, "val_by": val_by})


cli = command("prepare_cremi", prepare_cremi)
