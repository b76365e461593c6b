"""Turning the RETINA benchmark datasets, as their owners publish them, into the layout the
``retina_finetune`` bundle trains on (tooling for ``scripts/prepare.py``; not part of the bundles).

Output (``DST``)::

    DST/train/images/<name>.<ext>    DST/train/labels/<name>.<ext>
    DST/val/images/...               DST/val/labels/...
    DST/test/images/...              DST/test/labels/...
    DST/dataset.json

Images are uint8 (2D ``(Y, X)`` PNGs or 3D ``(Z, Y, X)`` TIFF stacks by default); each label file
has the image's shape and holds uint8 class indices (0 = background). An image and its label
share the file name.

``dataset.json`` doubles as a bundle config overlay of plain values only (no ``$`` expressions,
``_target_`` keys or file macros: :func:`custom.overlays.check_plain_config` checks it before it is
written, and the bundles refuse an overlay from outside their ``configs/`` folder that holds code,
so a shared dataset cannot run code): its top-level keys are the
``retina_finetune`` config entries of the dataset (``dataset_dir``, ``num_classes``,
``label_names``, ``eval_classes``, ``class_weights``, ``planes``, ``iterations``,
``intensity_mean``/``intensity_std`` of the training images in [0, 1], and augmentation switches:
the benchmark's :class:`~scripts.prepare.recipes.Recipe` from ``recipes.yaml``), so training is::

    cd bundles/retina_finetune
    python -m monai.bundle run --config_file "['configs/train.json','DST/dataset.json']"

Everything else about the preparation (sources, splits and section ranges, label counts, notes)
is under the key ``dataset_info``. ``num_classes`` follows the bundle's convention: 1 for a
binary task (one sigmoid channel), else the number of classes including background.

Validation: the published training data are split deterministically, never at random: by
default the last ``val_fraction`` of the sections of each training volume (anisotropic stacks,
adjacent sections stay on one side), or of the training slices / images (2D datasets), or whole
volumes (``val_by="volumes"``). A published validation set (Guay's ``eval`` volume) is used as is.

One module per benchmark (:mod:`.cremi`, :mod:`.guay`, :mod:`.kasthuri`, :mod:`.perez`,
:mod:`.urocell`, :mod:`.cem500k`), each with its ``prepare_<dataset>`` function (the source folder
as published, the output folder) and its command (``cli``); shared: :mod:`.common`, :mod:`.writer`,
:mod:`.recipes`. Problems a user can fix raise :class:`custom.io.DatasetError` with one line naming
the path and what was expected there, option problems raise :class:`OptionError`.
"""

from .cem500k import check_cem500k
from .common import (OptionError, Reporter, binary_mask, bundle_hint, class_indices, holdout_count, holdout_indices,
                     image_to_uint8, run_cli)
from .cremi import CREMI_BACKGROUND_ID, cremi_cleft_mask, find_cremi_samples, prepare_cremi
from .guay import find_guay_volumes, prepare_guay
from .kasthuri import find_slice_layout, prepare_kasthuri
from .perez import find_perez_layout, prepare_perez
from .recipes import PEREZ_TASKS, RECIPES, Recipe
from .urocell import UROCELL_MISSING_DATA_ROWS, find_urocell_volumes, prepare_urocell
from .writer import DatasetWriter

__all__ = [
    "CREMI_BACKGROUND_ID",
    "DatasetWriter",
    "OptionError",
    "PEREZ_TASKS",
    "RECIPES",
    "Recipe",
    "Reporter",
    "UROCELL_MISSING_DATA_ROWS",
    "binary_mask",
    "bundle_hint",
    "check_cem500k",
    "class_indices",
    "cremi_cleft_mask",
    "find_cremi_samples",
    "find_guay_volumes",
    "find_perez_layout",
    "find_slice_layout",
    "find_urocell_volumes",
    "holdout_count",
    "holdout_indices",
    "image_to_uint8",
    "prepare_cremi",
    "prepare_guay",
    "prepare_kasthuri",
    "prepare_perez",
    "prepare_urocell",
    "run_cli",
]
