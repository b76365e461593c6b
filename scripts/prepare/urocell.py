"""Prepare UroCell (isotropic FIB-SEM, lysosomes and mitochondria) for the retina_finetune bundle.

    python scripts/prepare.py urocell SRC DST [--test_volumes fib1-0-0-0] [--val_fraction 0.1]
        [--val_by sections|volumes] [--crop_missing True] [--ext .tif] [--overwrite] [--quiet]

SRC is the UroCell repository (github.com/MancaZerovnikMekuc/UroCell): data/<name>.nii.gz images
with binary label volumes lyso/<name>.nii.gz and mito/<name>.nii.gz (combined to 0 background,
1 lysosome, 2 mitochondrion; an already combined masks/<name>.nii.gz works too). Volumes without
labels are skipped; fib1-0-0-0 is the test volume. --crop_missing drops the rows of missing data
of fib1-0-0-0 (12) and fib1-1-0-3 (54) at the start of the y axis. DST receives
{train,val,test}/{images,labels}/<name>.tif (uint8) and dataset.json (planes "orthoplane",
class weights 0.1, 1, 1; 1000 iterations), also a config overlay for the bundle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.io import DatasetError, read_em
from custom.utils import file_stem

from .common import (Reporter, as_names, binary_mask, check_fraction, check_val_by, class_indices, command,
                     image_to_uint8, listing, source_files)
from .recipes import RECIPES
from .writer import DatasetWriter, write_training_volumes

#: UroCell volumes with a region of missing data: rows dropped from the start of the y axis
#: (the CEM500K benchmark preparation crops these two volumes the same way)
UROCELL_MISSING_DATA_ROWS = {"fib1-0-0-0": 12, "fib1-1-0-3": 54}
UROCELL_TEST_VOLUMES = ("fib1-0-0-0",)


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
    root, files = source_files(src, _URO_EXPECTED)
    vols: dict[str, dict[str, str]] = {}
    for p in files:
        role = _URO_ROLES.get(os.path.basename(os.path.dirname(p)).lower())
        if role is None:
            continue
        slot = vols.setdefault(file_stem(p), {})
        if role in slot:
            raise DatasetError(f"{root}: two {role} files for volume {file_stem(p)}: {slot[role]} and {p}; keep one")
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

    Args:
        src: the UroCell folder (data/, lyso/, mito/; searched recursively).
        dst: output folder (new, or pass ``--overwrite``).
        test_volumes: comma-separated volume names for test/.
        val_fraction: fraction held out for validation (0 for none).
        val_by: ``sections`` (the last z sections of each training volume) or ``volumes``.
        crop_missing: drop the known rows of missing data (fib1-0-0-0, fib1-1-0-3).
        ext: 3D output suffix: .tif (default), .nii.gz, .h5 or .nrrd.
        overwrite: replace an earlier preparation in ``dst``.
        reporter: progress output (on the command line ``--quiet``: none).
    """
    rep = reporter or Reporter("prepare_urocell")
    check_fraction(val_fraction)
    check_val_by(val_by)
    vols = find_urocell_volumes(src)
    labelled = {n: s for n, s in vols.items() if _urocell_labelled(s)}
    unlabelled = sorted(n for n, s in vols.items() if "image" in s and n not in labelled)
    orphans = sorted(n for n, s in vols.items() if "image" not in s)
    if not labelled:
        raise DatasetError(f"{os.fspath(src)}: no labelled volume; expected {_URO_EXPECTED}; found {listing(Path(src))}")
    if orphans:
        rep.warn(f"label volume(s) without an image, ignored: {', '.join(orphans)}")
    if unlabelled:
        rep.say(f"unlabelled volume(s), skipped: {', '.join(unlabelled)}")
    test = [n for n in as_names(test_volumes)]
    for n in test:
        if n not in labelled:
            rep.warn(f"test volume {n} not found among the labelled volumes ({', '.join(sorted(labelled))})")
    train = sorted(n for n in labelled if n not in test)
    if not train:
        raise DatasetError(f"{os.fspath(src)}: every labelled volume is a test volume ({', '.join(sorted(labelled))}); nothing to train on")
    writer = DatasetWriter(dst, RECIPES["urocell"], src, rep, overwrite=overwrite, ext=ext)
    volumes = [(n, (lambda n=n: _read_urocell(n, labelled[n], crop_missing, rep))) for n in train]
    write_training_volumes(writer, volumes, val_fraction, val_by)
    for n in test:
        if n in labelled:
            image, label, path, info = _read_urocell(n, labelled[n], crop_missing, rep)
            rep.say(f"test: {n} {tuple(image.shape)}")
            writer.add("test", n, image, label, path, **info)
    return writer.finish({"train_volumes": train, "test_volumes": [n for n in test if n in labelled],
                          "val_fraction": val_fraction, "val_by": val_by, "crop_missing": bool(crop_missing)})


cli = command("prepare_urocell", prepare_urocell)
