"""Ignite handlers that write images: validation samples, overlays, inference reconstructions.

- :class:`SampleTripletSaver` (pretraining validation): PNGs of (degraded input | reconstruction |
  target) at every validation.
- :class:`PredictionOverlays` (segmentation validation and evaluation): ``image | truth |
  prediction`` overlays of a few items per epoch (:func:`overlay_image`).
- :class:`ReconstructionWriter` (pretraining inference): each reconstructed 2D image or stack
  slice under its source file's name, planned and checked before the run.

Each also logs its files to MLflow when connected to MONAI's ``MLFlowHandler``
(``--tracking mlflow``, ``custom.handlers.connect_tracking``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from custom.utils import file_stem

from .tracking import MLflowRun

__all__ = ["SampleTripletSaver", "PredictionOverlays", "overlay_image", "ReconstructionWriter"]

logger = logging.getLogger(__name__)


def _numpy(x: Any) -> np.ndarray:
    """A tensor or array as a float32 numpy array (on the CPU)."""
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _plane(x: Any) -> np.ndarray:
    """(1, H, W) or (H, W) -> (H, W) float32."""
    a = _numpy(x)
    return a[0] if a.ndim == 3 else a


def _to_unit_image(x: Any, mean: float, std: float) -> np.ndarray:
    """(C, H, W) or (H, W) normalised intensities -> (H, W) uint8 after undoing ``(x - mean) / std``."""
    return (np.clip(_plane(x) * std + mean, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class SampleTripletSaver:
    """Save (degraded input | reconstruction | target) of the first validation items as one PNG.

    Attach to an evaluator (``validate#handlers``). At each completed evaluation it writes
    ``output_dir/samples_iter{step:07d}.png``: one row per item, three columns, intensities mapped
    back to [0, 1] with ``mean``/``std``. ``step`` is ``engine.state.epoch * iterations_per_epoch``
    (the evaluator's epoch is the trainer's epoch; with ``epoch_length`` = validation interval this
    is the trainer's iteration). Connected to MONAI's ``MLFlowHandler`` (``--tracking mlflow``) the
    PNG is also logged to its run under ``artifact_path``.

    Args:
        output_dir: folder of the PNGs (created).
        num_samples: rows (validation items) per PNG.
        keys: the engine output keys of input, reconstruction and target.
        mean, std: the normalisation to undo.
        iterations_per_epoch: the trainer's ``epoch_length``.
        artifact_path: MLflow artifact folder.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_samples: int = 4,
        keys: Sequence[str] = ("image", "pred", "label"),
        mean: float = 0.0,
        std: float = 1.0,
        iterations_per_epoch: int = 1,
        artifact_path: str = "samples",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_samples = num_samples
        self.keys = tuple(keys)
        self.mean, self.std = float(mean), float(std)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.artifact_path = artifact_path
        self.mlflow = MLflowRun()
        self.rows: list[np.ndarray] = []
        self.last_path: str | None = None

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED`` (reset), ``ITERATION_COMPLETED`` (collect), ``COMPLETED`` (write)."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Any = None) -> None:
        self.rows = []

    def collect(self, engine: Engine) -> None:
        if len(self.rows) >= self.num_samples:
            return
        out = engine.state.output
        if not isinstance(out, list):  # not decollated: a dict of batched tensors
            out = [{k: out[k][i] for k in self.keys} for i in range(len(out[self.keys[0]]))]
        for item in out[: self.num_samples - len(self.rows)]:
            cols = [_to_unit_image(item[k], self.mean, self.std) for k in self.keys]
            self.rows.append(np.concatenate(cols, axis=1))

    def write(self, engine: Engine) -> None:
        if not self.rows:
            return
        from PIL import Image

        self.output_dir.mkdir(parents=True, exist_ok=True)
        step = int(engine.state.epoch) * self.iterations_per_epoch
        path = self.output_dir / f"samples_iter{step:07d}.png"
        Image.fromarray(np.concatenate(self.rows, axis=0)).save(path)
        self.last_path = str(path)
        note = " (logged to MLflow)" if self.mlflow.log_artifacts([path], self.artifact_path) else ""
        logger.info(f"saved input | reconstruction | target samples: {path}{note}")


def overlay_image(image: Any, truth: Any, pred: Any, num_classes: int = 2, alpha: float = 0.4) -> np.ndarray:
    """An RGB uint8 panel ``image | image + truth | image + prediction`` of one 2D slice (arrays (H, W))."""
    from monai.visualize import blend_images

    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(np.min(img)), float(np.max(img))
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    scale = float(max(num_classes, 2))
    panels = [np.repeat(img[None], 3, axis=0)]
    for lab in (truth, pred):
        lab = np.asarray(lab, dtype=np.float32)[None] / scale
        panels.append(np.asarray(blend_images(img[None], lab, alpha=alpha, cmap="hsv", rescale_arrays=False)))
    rgb = np.concatenate(panels, axis=2)  # (3, H, 3W)
    return (np.clip(np.moveaxis(rgb, 0, -1), 0, 1) * 255).astype(np.uint8)


def _representative_slice(truth: np.ndarray) -> int:
    counts = (truth > 0).reshape(truth.shape[0], -1).sum(axis=1)
    return int(np.argmax(counts)) if counts.max() > 0 else truth.shape[0] // 2


class PredictionOverlays:
    """Saves ``image | truth | prediction`` overlays of a few evaluated items per epoch as PNG and logs them
    to the MLflow run of the ``MLFlowHandler`` it is connected to.

    Items are chosen evenly over the epoch (``max_images`` of them); for a 3D item the slice with
    the most truth foreground is shown. Files: ``<output_dir>/epoch<NNNN>_<k>.png`` (the epoch is the
    trainer's when the engine is a validator).

    Args:
        output_dir: folder of the PNG files.
        max_images: overlays per epoch.
        num_classes: label classes including background (sets the colours).
        output_transform: engine output -> ``(images, labels, preds)`` lists of channel-first arrays.
        ignore_index: the value of unlabelled truth voxels (sparse labels), shown uncoloured, or None.
    """

    def __init__(
        self,
        output_dir: str,
        max_images: int = 3,
        num_classes: int = 2,
        output_transform: Callable = from_engine(["image", "label", "pred"]),
        ignore_index: Optional[int] = None,
    ) -> None:
        self.output_dir = output_dir
        self.max_images = max_images
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.output_transform = output_transform
        self.mlflow = MLflowRun()
        self.saved: List[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Any = None) -> None:
        self.saved = []

    def _wanted(self, engine: Engine) -> bool:
        n = engine.state.epoch_length or 1
        k = (engine.state.iteration - 1) % n
        picks = set(np.linspace(0, n - 1, min(self.max_images, n)).round().astype(int).tolist())
        return k in picks and len(self.saved) < self.max_images

    def iteration_completed(self, engine: Engine) -> None:
        if self.max_images <= 0 or not self._wanted(engine):
            return
        from PIL import Image

        images, labels, preds = self.output_transform(engine.state.output)
        img, lab, prd = (_numpy(x[0]) for x in (images[0], labels[0], preds[0]))
        if self.ignore_index is not None:  # unlabelled is not a class: no colour (else the top of the colour map)
            lab = np.where(lab == self.ignore_index, 0, lab)
        if img.ndim == 3:
            z = _representative_slice(lab)
            img, lab, prd = img[z], lab[z], prd[z]
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, f"epoch{engine.state.epoch:04d}_{len(self.saved)}.png")
        Image.fromarray(overlay_image(img, lab, prd, self.num_classes)).save(path)
        self.saved.append(path)

    def epoch_completed(self, engine: Engine) -> None:
        self.mlflow.log_artifacts(self.saved, artifact_path="overlays")


class ReconstructionWriter:
    """Write the reconstruction of every inference item as ``output_dir/<sub-folder>/<name><output_ext>``.

    Attach to a ``SupervisedEvaluator`` whose items carry the source path under ``path_key`` and
    the ``"plane"``/``"index"`` of ``custom.io.slice_items``, and whose postprocessing maps
    ``key`` back to [0, 1]. ``<name>`` is the source file's stem, plus ``_<plane><index:04d>``
    for slices of 3D stacks; ``<sub-folder>`` is the source's folder below ``root`` (the
    ``dataset_dir``), so same-named files of different folders get different outputs. ``.png`` is
    written as uint8 (0-255), ``.tif``/``.tiff`` as float32, through ``custom.io.write_em``. With
    ``input_suffix`` the (possibly degraded) input ``input_key`` is written as well, as
    ``<name><input_suffix><output_ext>``.

    Call :meth:`plan` with the items before the run: it refuses (one ``custom.errors.OutputError``
    line) outputs that would land on an input, that two items share, or that exist already (unless
    ``overwrite``). Writes never replace an existing file unless ``overwrite``. Connected to MONAI's
    ``MLFlowHandler`` (``--tracking mlflow``), the list of outputs is logged to its run as
    ``outputs.tsv`` (input, output) when the run completes.

    Args:
        output_dir: output folder (created).
        output_ext: ``".png"``, ``".tif"`` or ``".tiff"``.
        key: the reconstruction's output key.
        path_key: item key of the source path.
        input_key, input_suffix: also write this output key under this suffix (None: don't).
        root: the folder the sources were found in (None: every output directly in ``output_dir``).
        overwrite: replace outputs that exist already.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        output_ext: str = ".png",
        key: str = "pred",
        path_key: str = "image_path",
        input_key: str = "image",
        input_suffix: str | None = None,
        root: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(output_ext, str) or output_ext.lower() not in (".png", ".tif", ".tiff"):
            raise ValueError(f"output_ext must be .png, .tif or .tiff, got {output_ext!r}")
        self.output_dir = Path(output_dir)
        self.output_ext = output_ext
        self.key, self.path_key = key, path_key
        self.input_key, self.input_suffix = input_key, input_suffix
        self.root = os.fspath(root) if root is not None else None
        if not isinstance(overwrite, bool):
            raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
        self.overwrite = overwrite
        self.mlflow = MLflowRun()
        self.written: list[str] = []
        self.rows: list[tuple[str, str]] = []

    def output_paths(self, item: Mapping[str, Any]) -> list[str]:
        """The files written for one item: the reconstruction, then the input copy (with ``input_suffix``)."""
        from custom.inference import input_subfolder

        src = str(item[self.path_key])
        name = file_stem(src)
        index = int(item.get("index", -1))
        if index >= 0:
            name += f"_{item.get('plane', 'xy')}{index:04d}"
        folder = self.output_dir / input_subfolder(src, self.root)
        names = [name] + ([name + self.input_suffix] if self.input_suffix is not None else [])
        return [os.path.normpath(str(folder / f"{n}{self.output_ext}")) for n in names]

    def plan(self, items: Sequence[Mapping[str, Any]], inputs: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Source -> its output paths, checked by ``custom.inference.check_outputs`` against ``inputs``
        (default: every EM file under ``root``, also those set aside as unreadable)."""
        from custom.inference import check_outputs
        from custom.io import DatasetError, find_em_files

        plan: dict[str, list[str]] = {}
        for item in items:
            plan.setdefault(str(item[self.path_key]), []).extend(self.output_paths(item))
        if inputs is None and self.root:
            try:
                inputs = find_em_files(self.root)
            except DatasetError:
                inputs = []
        check_outputs(plan, list(inputs or []), self.overwrite)
        return plan

    def attach(self, engine: Engine) -> None:
        """Register on ``ITERATION_COMPLETED`` (after decollation and postprocessing) and ``COMPLETED``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.summary)

    def summary(self, engine: Engine) -> None:
        logger.info(f"wrote {len(self.written)} images to {self.output_dir}")
        self.mlflow.log_text("input\toutput\n" + "".join(f"{s}\t{p}\n" for s, p in self.rows), "outputs.tsv")

    def _write(self, path: str, x: Any) -> None:
        from custom.io import write_em

        a = np.clip(_plane(x), 0.0, 1.0)
        if self.output_ext.lower() == ".png":
            a = (a * 255.0 + 0.5).astype(np.uint8)
        write_em(path, a, overwrite=self.overwrite)
        self.written.append(path)

    def __call__(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(output, list):
            raise ValueError("ReconstructionWriter needs decollated outputs (SupervisedEvaluator decollate=True)")
        for item, out in zip(batch, output):
            paths = self.output_paths(item)
            self._write(paths[0], out[self.key])
            if self.input_suffix is not None:
                self._write(paths[1], out[self.input_key])
            self.rows += [(str(item[self.path_key]), p) for p in paths]
