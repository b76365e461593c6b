"""Prepare the RETINA benchmarks for the retina_finetune bundle (and check a CEM500K folder for
retina_pretrain): one command, one sub-command per dataset.

    python scripts/prepare.py cremi SRC DST      # CREMI synaptic clefts (HDF5 samples A, B, C)
    python scripts/prepare.py guay SRC DST       # Guay et al. platelets (TIFF stacks, 7 classes)
    python scripts/prepare.py kasthuri SRC DST   # Kasthuri++ / Lucchi++ mitochondria (per-slice PNGs)
    python scripts/prepare.py perez SRC DST      # Perez et al. organelles (2D, one dataset per task)
    python scripts/prepare.py urocell SRC DST    # UroCell lysosomes and mitochondria (NIfTI)
    python scripts/prepare.py cem500k SRC        # check the CEM500K pretraining patches

``python scripts/prepare.py cremi --help`` lists a sub-command's options. Each writes
DST/{train,val,test}/{images,labels}/ and DST/dataset.json, a config overlay of plain values with
the paper's settings for the dataset:
``--config_file "['configs/train.json','DST/dataset.json']"``. The converters live in
``scripts/prepare/`` (a tooling package: not shipped with the bundles).
"""

from __future__ import annotations

import os
import sys

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # find custom/ and scripts/prepare/ without an install

from scripts.prepare import cem500k, cremi, guay, kasthuri, perez, urocell  # noqa: E402

COMMANDS = {
    "cremi": cremi.cli,
    "guay": guay.cli,
    "kasthuri": kasthuri.cli,
    "perez": perez.cli,
    "urocell": urocell.cli,
    "cem500k": cem500k.cli,
}

if __name__ == "__main__":
    fire.Fire(COMMANDS)
