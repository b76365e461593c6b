"""Prepare CREMI (synaptic clefts, 3D) for the retina_finetune bundle.

    python scripts/prepare_cremi.py SRC DST [--train_samples A,B] [--test_samples C]
        [--val_fraction 0.1] [--val_by sections|volumes] [--ext .tif] [--overwrite] [--quiet]

SRC holds the CREMI files as published on cremi.org: sample_A_20160501.hdf,
sample_B_20160501.hdf, sample_C_20160501.hdf (HDF5 datasets volumes/raw and
volumes/labels/clefts, cleft id 0xffffffffffffffff = background). A and B train, C tests.
DST receives {train,val,test}/{images,labels}/sample_X.tif (uint8 stacks; labels 0 = background,
1 = cleft; validation = the last 10% of the sections of each training sample) and dataset.json,
which is also a config overlay for the bundle (see custom/prepare.py).
"""

from __future__ import annotations

import os
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # find custom/ without an install

from custom.prepare import bundle_hint, prepare_cremi, run_cli  # noqa: E402


def main(
    src: str,
    dst: str,
    train_samples: str = "A,B",
    test_samples: str = "C",
    val_fraction: float = 0.1,
    val_by: str = "sections",
    ext: str = ".tif",
    overwrite: bool = False,
    quiet: bool = False,
) -> None:
    """Convert the CREMI samples in ``src`` into the bundle layout in ``dst``.

    Args:
        src: folder with sample_{A,B,C}_20160501.hdf (searched recursively).
        dst: output folder (new, or pass ``--overwrite``).
        train_samples: samples for train/val, comma separated.
        test_samples: samples for test.
        val_fraction: fraction held out for validation (0 for none).
        val_by: ``sections`` (the last sections of each training sample) or ``volumes``.
        ext: 3D output suffix: .tif (default), .nii.gz, .h5 or .nrrd.
        overwrite: replace an earlier preparation in ``dst``.
        quiet: no progress output.
    """
    run_cli("prepare_cremi", prepare_cremi, src, dst, train_samples=train_samples, test_samples=test_samples,
            val_fraction=val_fraction, val_by=val_by, ext=ext, overwrite=overwrite, quiet=quiet)
    print(bundle_hint(os.path.join(dst, "dataset.json")))


if __name__ == "__main__":
    fire.Fire(main)
