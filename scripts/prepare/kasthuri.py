"""Prepare Kasthuri++ or Lucchi++ (mitochondria, per-slice images) for the retina_finetune bundle.

    python scripts/prepare.py kasthuri SRC DST [--dataset kasthuri_pp|lucchi_pp] [--val_fraction 0.1]
        [--stack True] [--ext .tif] [--ext2d .png] [--overwrite] [--quiet]

SRC is the folder of kasthuri_pp.zip or lucchi_pp.zip (Casser et al.): Train_In/, Train_Out/,
Test_In/, Test_Out/ with one PNG per slice (masks 0/255, Kasthuri++ masks RGB with padding
values), or a train/{images,masks}/ + test/{images,masks}/ copy. Masks 255 -> 1, everything
else -> 0. Images and masks pair by name, else by the slice number in the names (Lucchi++).
By default each split is written as one uint8 TIFF stack ({train,val,test}/{images,labels}/
kasthuri_pp_<split>.tif; val = the last val_fraction of the training slices); --stack=False
writes one 2D file per slice. dataset.json (Kasthuri++: 10000 iterations) doubles as a config
overlay for the bundle. --dataset defaults to lucchi_pp when SRC's path names Lucchi.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from custom.io import DatasetError
from custom.utils import file_stem

from .common import (OptionError, Reporter, check_fraction, command, existing_folder, holdout_indices, listing,
                     pair_slices, read_pairs_2d, split_folders, subdirs, warn_intermediate)
from .recipes import RECIPES
from .writer import DatasetWriter

_SLICES_EXPECTED = (
    "the Kasthuri++/Lucchi++ folders Train_In/, Train_Out/, Test_In/, Test_Out/ (per-slice images "
    "and masks, as in kasthuri_pp.zip or lucchi_pp.zip) or train/{images,masks}/ and test/{images,masks}/"
)



def find_slice_layout(src: str | os.PathLike, expected: str = _SLICES_EXPECTED) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """Find a per-slice image/mask layout at ``src`` or one folder below it.

    Recognises ``Train_In``/``Train_Out``/``Test_In``/``Test_Out`` (as published by Casser et al.)
    and ``{train,val,test}/{images,masks}``. Returns ``(base folder, {split: (image_dir, label_dir)})``.
    """
    root = existing_folder(src, expected)
    candidates = [root] + [p for _, p in sorted(subdirs(root).items())]
    for base in candidates:
        kids = subdirs(base)
        if "train_in" in kids and "train_out" in kids:
            layout = {"train": (kids["train_in"], kids["train_out"])}
            if "test_in" in kids and "test_out" in kids:
                layout["test"] = (kids["test_in"], kids["test_out"])
            return base, layout
        layout = split_folders(base)
        if "train" in layout:
            return base, layout
    raise DatasetError(f"{root}: expected {expected}; found {listing(root)}")


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

    Masks: 255 -> 1, 0 and other values (padding) -> 0; masks holding only 0/1 are kept.

    Args:
        src: the extracted dataset folder (Train_In/... at SRC or one folder below).
        dst: output folder (new, or pass ``--overwrite``).
        dataset: ``"kasthuri_pp"`` or ``"lucchi_pp"``; default: ``lucchi_pp`` when the source
            path names Lucchi, else ``kasthuri_pp`` (sets dataset.json's recipe and file names).
        val_fraction: the last fraction of the training slices becomes ``val/`` (0 for none).
        stack: write each split's slices as one TIFF stack (the benchmark evaluates whole
            volumes; slices must share a shape), else one 2D file per slice.
        ext: 3D output suffix (.tif, .nii.gz, .h5, .nrrd).
        ext2d: 2D output suffix (.png, .tif).
        overwrite: replace an earlier preparation in ``dst``.
        reporter: progress output (on the command line ``--quiet``: none).
    """
    rep = reporter or Reporter("prepare_kasthuri")
    check_fraction(val_fraction)
    key = (dataset or ("lucchi_pp" if "lucchi" in os.path.abspath(os.fspath(src)).lower() else "kasthuri_pp")).lower()
    key = {"kasthuri": "kasthuri_pp", "kasthuri++": "kasthuri_pp", "lucchi": "lucchi_pp", "lucchi++": "lucchi_pp"}.get(key, key)
    if key not in ("kasthuri_pp", "lucchi_pp"):
        raise OptionError(f"dataset must be 'kasthuri_pp' or 'lucchi_pp', got {dataset!r}")
    base, layout = find_slice_layout(src)
    rep.say(f"{RECIPES[key].title}: {base}")
    writer = DatasetWriter(dst, RECIPES[key], src, rep, overwrite=overwrite, ext=ext, ext2d=ext2d)
    odd = 0
    for split, (img_dir, lab_dir) in layout.items():
        pairs = pair_slices(img_dir, lab_dir)
        held = set(holdout_indices(len(pairs), val_fraction, "tail")) if split == "train" and "val" not in layout else set()
        if stack:
            vol = lab = None
            for i, (name, image, mask, info, n_odd) in enumerate(read_pairs_2d(pairs, rep, f"{split} slices")):
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
            first, last = file_stem(pairs[0]["image"]), file_stem(pairs[-1]["image"])
            info = {"slices": f"{first} .. {last}", "image_dir": os.fspath(img_dir), "label_dir": os.fspath(lab_dir)}
            writer.add(split, name, vol[:cut], lab[:cut], img_dir, sections=[0, cut], **info)
            if held:
                writer.add("val", name, vol[cut:], lab[cut:], img_dir, sections=[cut, len(pairs)], **info)
        else:
            for i, (name, image, mask, info, n_odd) in enumerate(read_pairs_2d(pairs, rep, f"{split} slices")):
                odd += n_odd
                writer.add("val" if i in held else split, name, image, mask, pairs[i]["image"], **info)
    if "test" not in layout:
        rep.warn("no test slices found (Test_In/Test_Out): no test split")
    warn_intermediate(rep, odd)
    return writer.finish({"validation": "published" if "val" in layout else f"last {val_fraction} of the training slices",
                          "stacked": bool(stack)})


cli = command("prepare_kasthuri", prepare_kasthuri)
