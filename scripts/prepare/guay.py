"""Prepare the Guay et al. platelet volumes (SBF-SEM, 7 classes) for the retina_finetune bundle.

    python scripts/prepare.py guay SRC DST [--val_fraction 0.1] [--use_published_val True]
        [--ext .tif] [--overwrite] [--quiet]

SRC holds the TIFF stacks of platelet_data_1219.zip: train-images.tif, train-labels.tif,
eval-images.tif, eval-labels.tif, test-images.tif, test-labels.tif (16-bit images; labels 0-6:
background, cell, mitochondrion, canalicular channel, alpha granule, dense granule, dense granule
core). Images are rescaled to uint8 by each volume's min and max. The eval volume becomes val/
(without it, the last val_fraction of the training sections). DST receives
{train,val,test}/{images,labels}/guay_{train,eval,test}.tif and dataset.json (class weights 0.1, 0.1, 1, 1, 0.1, 3, 3;
evaluated classes 2-6; 2500 iterations), also a config overlay for the bundle.
"""

from __future__ import annotations

import os
import re

import numpy as np

from custom.io import DatasetError, read_em
from custom.utils import file_stem

from .common import Reporter, check_fraction, class_indices, command, image_to_uint8, listing, source_files
from .recipes import RECIPES
from .writer import DatasetWriter, write_training_volumes

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
    root, files = source_files(src, _GUAY_EXPECTED)
    found: dict[str, dict[str, str]] = {}
    for p in files:
        m = _GUAY_NAME.match(file_stem(p))
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
        raise DatasetError(f"{root}: expected {_GUAY_EXPECTED}; found {listing(root)}")
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

    Args:
        src: folder with {train,eval,test}-{images,labels}.tif (searched recursively).
        dst: output folder (new, or pass ``--overwrite``).
        val_fraction: sections held out when the eval volume is absent or not used.
        use_published_val: use eval-images.tif/eval-labels.tif as the validation set.
        ext: 3D output suffix: .tif (default), .nii.gz, .h5 or .nrrd.
        overwrite: replace an earlier preparation in ``dst``.
        reporter: progress output (on the command line ``--quiet``: none).
    """
    rep = reporter or Reporter("prepare_guay")
    check_fraction(val_fraction)
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
        write_training_volumes(writer, [(found["train"]["name"], lambda: _read_guay(found["train"], rep))], val_fraction)
        how_val = f"last {val_fraction} of the training sections"
    if "test" in found:
        image, label, path, info = _read_guay(found["test"], rep)
        rep.say(f"test: {found['test']['name']} {tuple(image.shape)}")
        writer.add("test", found["test"]["name"], image, label, path, **info)
    else:
        rep.warn("no test-images.tif/test-labels.tif found: no test split")
    return writer.finish({"validation": how_val})


cli = command("prepare_guay", prepare_guay)
