"""Prepare the Perez et al. organelle datasets (2D SBEM, four binary tasks) for retina_finetune.

    python scripts/prepare.py perez SRC DST [--tasks lysosomes,mitochondria,nuclei,nucleoli]
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
from collections.abc import Sequence
from pathlib import Path

from custom.io import DatasetError

from .common import (OptionError, Reporter, as_names, bundle_hint, check_fraction, command, existing_folder,
                     holdout_indices, listing, pair_slices, read_pairs_2d, split_folders, subdirs, warn_intermediate)
from .recipes import PEREZ_TASKS, RECIPES
from .writer import DatasetWriter

_PEREZ_EXPECTED = (
    "the Perez et al. folders training_images/, training_labels/, test_images/, ground_truth/ with one "
    "sub-folder per organelle (lysosomes, mitochondria, nuclei, nucleoli), as in chm-supplemental_data.zip"
)


def _perez_task(name: str) -> str:
    n = str(name).strip().lower()
    for task, (singular, aliases) in PEREZ_TASKS.items():
        if n == task or n == singular or n in aliases:
            return task
    raise OptionError(f"unknown Perez task {name!r}; choose from {', '.join(PEREZ_TASKS)}")


def find_perez_layout(src: str | os.PathLike, tasks: Sequence[str]) -> dict[str, dict[str, tuple[Path, Path]]]:
    """Per task ``{split: (image_dir, label_dir)}`` of the published Perez layout (at ``src`` or
    one folder below, e.g. ``supplemental_data/``), or of the CEM500K benchmark layout
    ``{mito,lyso,nuclei,nucleoli}/{train,test}/{images,masks}``."""
    root = existing_folder(src, _PEREZ_EXPECTED)
    for base in [root] + [p for _, p in sorted(subdirs(root).items())]:
        kids = subdirs(base)
        if "training_images" in kids and "training_labels" in kids:
            out: dict[str, dict[str, tuple[Path, Path]]] = {}
            for task in tasks:
                tr_i, tr_l = subdirs(kids["training_images"]).get(task), subdirs(kids["training_labels"]).get(task)
                if tr_i is None or tr_l is None:
                    raise DatasetError(
                        f"{base}: no training_images/{task}/ and training_labels/{task}/ folders; expected {_PEREZ_EXPECTED}"
                    )
                out[task] = {"train": (tr_i, tr_l)}
                te_i = subdirs(kids["test_images"]).get(task) if "test_images" in kids else None
                te_l = subdirs(kids["ground_truth"]).get(task) if "ground_truth" in kids else None
                if te_i is not None and te_l is not None:
                    out[task]["test"] = (te_i, te_l)
            return out
        by_alias = {}
        for task in tasks:
            for n in (task, *PEREZ_TASKS[task][1]):
                if n in kids and "train" in split_folders(kids[n]):
                    by_alias[task] = split_folders(kids[n])
                    break
        if by_alias:
            missing = [t for t in tasks if t not in by_alias]
            if missing:
                raise DatasetError(f"{base}: no train/{{images,masks}} folders for {', '.join(missing)}")
            return by_alias
    raise DatasetError(f"{root}: expected {_PEREZ_EXPECTED}; found {listing(root)}")


def prepare_perez(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    tasks: str | Sequence[str] = tuple(PEREZ_TASKS),
    val_fraction: float = 0.1,
    ext2d: str = ".png",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, dict]:
    """Perez et al. (2D SBEM images, four separate binary tasks) -> one dataset per task.

    Each task is written to ``DST/<task>/`` (``lysosomes``, ``mitochondria``, ``nuclei``,
    ``nucleoli``), a complete dataset folder with its own ``dataset.json``. Images are paired
    with masks by the number in their names; masks 255 -> 1. Validation: ``val_fraction`` of the
    training images, evenly spread over the (name-sorted) list. Returns ``{task: dataset.json}``.

    Args:
        src: the extracted supplemental_data folder (or its parent).
        dst: output folder; each task goes to ``dst/<task>/``.
        tasks: comma-separated subset of lysosomes, mitochondria, nuclei, nucleoli (mito, lyso ok).
        val_fraction: fraction of the training images held out (0 for none).
        ext2d: output suffix, .png (default) or .tif.
        overwrite: replace earlier preparations in ``dst/<task>/``.
        reporter: progress output (on the command line ``--quiet``: none).
    """
    rep = reporter or Reporter("prepare_perez")
    check_fraction(val_fraction)
    chosen = list(dict.fromkeys(_perez_task(t) for t in as_names(tasks)))
    if not chosen:
        raise OptionError(f"no Perez task chosen; choose from {', '.join(PEREZ_TASKS)}")
    layout = find_perez_layout(src, chosen)
    out: dict[str, dict] = {}
    for task in chosen:
        rec = RECIPES[f"perez_{task}"]
        writer = DatasetWriter(Path(os.fspath(dst)) / task, rec, src, rep, overwrite=overwrite, ext2d=ext2d)
        odd = 0
        for split, (img_dir, lab_dir) in layout[task].items():
            pairs = pair_slices(img_dir, lab_dir)
            held = set(holdout_indices(len(pairs), val_fraction, "spread")) if split == "train" and "val" not in layout[task] else set()
            for i, (name, image, mask, info, n_odd) in enumerate(read_pairs_2d(pairs, rep, f"{task} {split}")):
                odd += n_odd
                writer.add("val" if i in held else split, name, image, mask, pairs[i]["image"], **info)
        if "test" not in layout[task]:
            rep.warn(f"{task}: no test images found (test_images/{task}, ground_truth/{task}): no test split")
        warn_intermediate(rep, odd)
        out[task] = writer.finish({"task": task, "validation": f"{val_fraction} of the training images, evenly spread"})
        rep.warnings.clear()
    return out


def _print_hints(results: dict[str, dict], arguments: dict) -> None:
    for task in results:
        print(f"{task}: " + bundle_hint(os.path.join(arguments["dst"], task, "dataset.json")))


cli = command("prepare_perez", prepare_perez, after=_print_hints)
