"""Prepare Kasthuri++ or Lucchi++ (mitochondria, per-slice images) for the retina_finetune bundle.

    python scripts/prepare_kasthuri.py SRC DST [--dataset kasthuri_pp|lucchi_pp] [--val_fraction 0.1]
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
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # find custom/ without an install

from custom.prepare import bundle_hint, prepare_kasthuri, run_cli  # noqa: E402


def main(
    src: str,
    dst: str,
    dataset: str = "",
    val_fraction: float = 0.1,
    stack: bool = True,
    ext: str = ".tif",
    ext2d: str = ".png",
    overwrite: bool = False,
    quiet: bool = False,
) -> None:
    """Convert Kasthuri++/Lucchi++ slices in ``src`` into the bundle layout in ``dst``.

    Args:
        src: the extracted dataset folder (Train_In/... at SRC or one folder below).
        dst: output folder (new, or pass ``--overwrite``).
        dataset: ``kasthuri_pp`` or ``lucchi_pp`` (default: from SRC's path).
        val_fraction: the last fraction of the training slices held out (0 for none).
        stack: one TIFF stack per split (default) or one 2D file per slice.
        ext: 3D output suffix (.tif, .nii.gz, .h5, .nrrd); ext2d: 2D suffix (.png, .tif).
        overwrite: replace an earlier preparation in ``dst``.
        quiet: no progress output.
    """
    run_cli("prepare_kasthuri", prepare_kasthuri, src, dst, dataset=dataset, val_fraction=val_fraction, stack=stack,
            ext=ext, ext2d=ext2d, overwrite=overwrite, quiet=quiet)
    print(bundle_hint(os.path.join(dst, "dataset.json")))


if __name__ == "__main__":
    fire.Fire(main)
