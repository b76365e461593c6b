"""Prepare UroCell (isotropic FIB-SEM, lysosomes and mitochondria) for the retina_finetune bundle.

    python scripts/prepare_urocell.py SRC DST [--test_volumes fib1-0-0-0] [--val_fraction 0.1]
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
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # find custom/ without an install

from custom.prepare import bundle_hint, prepare_urocell, run_cli  # noqa: E402


def main(
    src: str,
    dst: str,
    test_volumes: str = "fib1-0-0-0",
    val_fraction: float = 0.1,
    val_by: str = "sections",
    crop_missing: bool = True,
    ext: str = ".tif",
    overwrite: bool = False,
    quiet: bool = False,
) -> None:
    """Convert the UroCell volumes in ``src`` into the bundle layout in ``dst``.

    Args:
        src: the UroCell folder (data/, lyso/, mito/; searched recursively).
        dst: output folder (new, or pass ``--overwrite``).
        test_volumes: comma-separated volume names for test/.
        val_fraction: fraction held out for validation (0 for none).
        val_by: ``sections`` (the last z sections of each training volume) or ``volumes``.
        crop_missing: drop the known rows of missing data (fib1-0-0-0, fib1-1-0-3).
        ext: 3D output suffix: .tif (default), .nii.gz, .h5 or .nrrd.
        overwrite: replace an earlier preparation in ``dst``.
        quiet: no progress output.
    """
    run_cli("prepare_urocell", prepare_urocell, src, dst, test_volumes=test_volumes, val_fraction=val_fraction,
            val_by=val_by, crop_missing=crop_missing, ext=ext, overwrite=overwrite, quiet=quiet)
    print(bundle_hint(os.path.join(dst, "dataset.json")))


if __name__ == "__main__":
    fire.Fire(main)
