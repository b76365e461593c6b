"""Prepare the Perez et al. organelle datasets (2D SBEM, four binary tasks) for retina_finetune.

    python scripts/prepare_perez.py SRC DST [--tasks lysosomes,mitochondria,nuclei,nucleoli]
        [--val_fraction 0.1] [--ext2d .png] [--overwrite] [--quiet]

SRC is the folder of chm-supplemental_data.zip (supplemental_data/): training_images/<task>/,
training_labels/<task>/, test_images/<task>/, ground_truth/<task>/ with PNG images and masks
(255 -> 1), paired by the number in their names; a CEM500K-style copy
{mito,lyso,nuclei,nucleoli}/{train,test}/{images,masks}/ works too. Each task is a separate
binary dataset: DST/<task>/{train,val,test}/{images,labels}/*.png plus DST/<task>/dataset.json
(2500 iterations; also a config overlay for the bundle). Validation: val_fraction of the
training images, evenly spread over the name-sorted list.
"""

from __future__ import annotations

import os
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # find custom/ without an install

from custom.prepare import PEREZ_TASKS, bundle_hint, prepare_perez, run_cli  # noqa: E402


def main(
    src: str,
    dst: str,
    tasks: str = ",".join(PEREZ_TASKS),
    val_fraction: float = 0.1,
    ext2d: str = ".png",
    overwrite: bool = False,
    quiet: bool = False,
) -> None:
    """Convert the Perez datasets in ``src`` into one bundle dataset per task under ``dst``.

    Args:
        src: the extracted supplemental_data folder (or its parent).
        dst: output folder; each task goes to ``dst/<task>/``.
        tasks: comma-separated subset of lysosomes, mitochondria, nuclei, nucleoli (mito, lyso ok).
        val_fraction: fraction of the training images held out (0 for none).
        ext2d: output suffix, .png (default) or .tif.
        overwrite: replace earlier preparations in ``dst/<task>/``.
        quiet: no progress output.
    """
    results = run_cli("prepare_perez", prepare_perez, src, dst, tasks=tasks, val_fraction=val_fraction, ext2d=ext2d,
                      overwrite=overwrite, quiet=quiet)
    for task in results:
        print(f"{task}: " + bundle_hint(os.path.join(dst, task, "dataset.json")))


if __name__ == "__main__":
    fire.Fire(main)
