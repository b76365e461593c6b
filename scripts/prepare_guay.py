"""Prepare the Guay et al. platelet volumes (SBF-SEM, 7 classes) for the retina_finetune bundle.

    python scripts/prepare_guay.py SRC DST [--val_fraction 0.1] [--use_published_val True]
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
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # find custom/ without an install

from custom.prepare import bundle_hint, prepare_guay, run_cli  # noqa: E402


def main(
    src: str,
    dst: str,
    val_fraction: float = 0.1,
    use_published_val: bool = True,
    ext: str = ".tif",
    overwrite: bool = False,
    quiet: bool = False,
) -> None:
    """Convert the Guay stacks in ``src`` into the bundle layout in ``dst``.

    Args:
        src: folder with {train,eval,test}-{images,labels}.tif (searched recursively).
        dst: output folder (new, or pass ``--overwrite``).
        val_fraction: sections held out when the eval volume is absent or not used.
        use_published_val: use eval-images.tif/eval-labels.tif as the validation set.
        ext: 3D output suffix: .tif (default), .nii.gz, .h5 or .nrrd.
        overwrite: replace an earlier preparation in ``dst``.
        quiet: no progress output.
    """
    run_cli("prepare_guay", prepare_guay, src, dst, val_fraction=val_fraction, use_published_val=use_published_val,
            ext=ext, overwrite=overwrite, quiet=quiet)
    print(bundle_hint(os.path.join(dst, "dataset.json")))


if __name__ == "__main__":
    fire.Fire(main)
