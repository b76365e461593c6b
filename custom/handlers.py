"""Small pieces the pretraining bundle's configs call that are neither transforms nor data I/O.

- :func:`pretraining_datalist`: the training/validation item lists of an unlabelled EM folder
  (falling back to the synthetic demo set when no folder is given), split by file.
- :func:`latest_checkpoint`: the newest ``CheckpointSaver`` interval checkpoint in a folder, to resume.
- :func:`local_tracking_uri`: a local SQLite MLflow store in a folder (MLflow 3 has no file store).
- :class:`SampleTripletSaver`: Ignite handler for an evaluator: PNGs of (degraded input,
  reconstruction, target) at every validation, also logged to MLflow when tracking is on.
- :class:`MLflowExtras`: Ignite handler for a trainer: logs the run's parameters and, when training
  completes, files such as the final model to the MLflow run of MONAI's ``MLFlowHandler``.
- :class:`ReconstructionWriter`: Ignite handler for an inference evaluator: writes each
  reconstructed 2D image (or stack slice) under its source file's name.

The MLflow pieces only act when ``python -m monai.bundle run ... --tracking mlflow`` attached
MONAI's ``MLFlowHandler`` to the same engine; they reuse its client and run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.handlers import MLFlowHandler
from monai.utils import path_to_sqlite_uri

__all__ = [
    "pretraining_datalist",
    "latest_checkpoint",
    "local_tracking_uri",
    "find_mlflow_handler",
    "SampleTripletSaver",
    "MLflowExtras",
    "ReconstructionWriter",
]

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"_iteration=(\d+)\.pt$")


def pretraining_datalist(
    dataset_dir: str | os.PathLike | None,
    demo_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    max_val_files: int = 64,
    max_val_items: int = 256,
    planes: str = "xy",
    seed: int = 0,
    check_items: int = 8,
    demo_kwargs: Mapping[str, Any] | None = None,
    exit_on_error: bool = False,
) -> dict[str, list[dict]]:
    """Training and validation items of every 2D image and 3D-stack slice under ``dataset_dir``.

    Files are found recursively (``custom.data.find_em_files``); a seeded permutation holds out
    ``round(val_fraction * n_files)`` files (at least 1, at most ``max_val_files``) for validation,
    so no image contributes to both. 3D stacks are expanded into slice items
    (``custom.data.slice_items``); files are not read beyond the header. A single file is split
    by slices instead (its last ``val_fraction``). Validation is capped at ``max_val_items``
    slices, taken evenly. The first ``check_items`` items of each split are read once
    (``custom.data.validate_items``) so an unreadable dataset fails before training.

    When ``dataset_dir`` is empty or None, the synthetic demo set is written to ``demo_dir``
    (``custom.synthetic.write_unlabelled_demo``, skipped when present) and used.

    With ``exit_on_error`` (what the bundle config sets) a dataset problem ends the program with
    its one-line message (``SystemExit``, status 1) instead of a traceback through MONAI's
    config machinery.

    Returns:
        ``{"training": [...], "validation": [...]}`` with items ``{"image": path, "plane", "index"}``.

    Raises:
        custom.data.DatasetError: one line naming the folder or file when nothing usable is found.
    """
    from custom.data import DatasetError

    try:
        return _split_datalist(
            dataset_dir or _demo_folder(demo_dir, demo_kwargs),
            val_fraction=val_fraction,
            max_val_files=max_val_files,
            max_val_items=max_val_items,
            planes=planes,
            seed=seed,
            check_items=check_items,
        )
    except DatasetError as e:
        if exit_on_error:
            raise SystemExit(f"retina_pretrain: dataset error: {e}") from None
        raise


def _demo_folder(demo_dir: str | os.PathLike, demo_kwargs: Mapping[str, Any] | None) -> str:
    from custom import synthetic

    synthetic.write_unlabelled_demo(str(demo_dir), **dict(demo_kwargs or {}))
    logger.info(f"no dataset_dir given: using the synthetic demo set in {demo_dir}")
    return str(demo_dir)


def _split_datalist(
    dataset_dir: str | os.PathLike,
    *,
    val_fraction: float,
    max_val_files: int,
    max_val_items: int,
    planes: str,
    seed: int,
    check_items: int,
) -> dict[str, list[dict]]:
    from custom import data

    files = list(data.find_em_files(str(dataset_dir)))
    if not files:
        raise data.DatasetError(f"{dataset_dir}: no EM images found")
    if len(files) == 1:
        items = data.slice_items([{"image": files[0]}], planes=planes)
        n_val = min(max(1, int(round(val_fraction * len(items)))), len(items) - 1) if len(items) > 1 else 0
        train = items[: len(items) - n_val] if n_val else items
        val = items[len(items) - n_val :] if n_val else list(items)
        if not n_val:
            logger.warning(f"{dataset_dir}: a single 2D image; validating on the training image")
    else:
        order = np.random.RandomState(seed).permutation(len(files))
        n_val = min(max(1, int(round(val_fraction * len(files)))), max_val_files, len(files) - 1)
        val_files = sorted(files[i] for i in order[:n_val])
        train_files = sorted(files[i] for i in order[n_val:])
        train = data.slice_items([{"image": f} for f in train_files], planes=planes)
        val = data.slice_items([{"image": f} for f in val_files], planes=planes)
    if len(val) > max_val_items:
        keep = np.linspace(0, len(val) - 1, max_val_items).round().astype(int)
        val = [val[i] for i in keep]
    if check_items > 0:
        data.validate_items(train[:check_items])
        data.validate_items(val[:check_items])
    logger.info(f"{dataset_dir}: {len(files)} files, {len(train)} training and {len(val)} validation images")
    return {"training": train, "validation": val}


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """Path of the ``{prefix}_iteration=N.pt`` file with the largest N in ``ckpt_dir``, or None."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob(f"{prefix}_iteration=*.pt"):
        m = _CKPT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), str(p)))
    if not found:
        return None
    path = max(found)[1]
    logger.info(f"latest checkpoint in {ckpt_dir}: {path}")
    return path


def local_tracking_uri(folder: str | os.PathLike, db_name: str = "mlflow.db") -> str:
    """``sqlite:///`` URI of an MLflow store ``folder/db_name`` (folder created); artifacts go to ``folder/mlruns``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(Path(folder) / db_name)


def find_mlflow_handler(engine: Any) -> MLFlowHandler | None:
    """The ``MLFlowHandler`` attached to ``engine`` (found through its ``STARTED`` callback), or None."""
    for handlers in getattr(engine, "_event_handlers", {}).values():  # Ignite keeps no public registry
        for func, *_ in handlers:
            owner = getattr(func, "__self__", None)
            if isinstance(owner, MLFlowHandler):
                return owner
    return None


def _log_artifact(engine: Any, path: str, artifact_path: str | None) -> bool:
    """Log ``path`` to the active run of the engine's MLFlowHandler; False when there is none."""
    handler = find_mlflow_handler(engine)
    if handler is None or handler.cur_run is None:
        return False
    handler.client.log_artifact(handler.cur_run.info.run_id, path, artifact_path=artifact_path)
    return True


def _to_unit_image(x: Any, mean: float, std: float) -> np.ndarray:
    """(C, H, W) or (H, W) normalised intensities -> (H, W) uint8 after undoing ``(x - mean) / std``."""
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    a = a[0] if a.ndim == 3 else a
    return (np.clip(a * std + mean, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class SampleTripletSaver:
    """Save (degraded input | reconstruction | target) of the first validation items as one PNG.

    Attach to an evaluator (``validate#handlers``). At each completed evaluation it writes
    ``output_dir/samples_iter{step:07d}.png``: one row per item, three columns, intensities mapped
    back to [0, 1] with ``mean``/``std``. ``step`` is ``engine.state.epoch * iterations_per_epoch``
    (the evaluator's epoch is the trainer's epoch; with ``epoch_length`` = validation interval this
    is the trainer's iteration). When MONAI's ``MLFlowHandler`` is attached to the same engine
    (``--tracking mlflow``) the PNG is also logged to its run under ``artifact_path``.

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
        self._rows: list[np.ndarray] = []
        self.last_path: str | None = None

    def attach(self, engine: Any) -> None:
        """Register on ``STARTED`` (reset), ``ITERATION_COMPLETED`` (collect), ``COMPLETED`` (write)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Any) -> None:
        self._rows = []

    def _collect(self, engine: Any) -> None:
        if len(self._rows) >= self.num_samples:
            return
        out = engine.state.output
        if not isinstance(out, list):  # not decollated: a dict of batched tensors
            out = [{k: out[k][i] for k in self.keys} for i in range(len(out[self.keys[0]]))]
        for item in out[: self.num_samples - len(self._rows)]:
            cols = [_to_unit_image(item[k], self.mean, self.std) for k in self.keys]
            self._rows.append(np.concatenate(cols, axis=1))

    def _write(self, engine: Any) -> None:
        if not self._rows:
            return
        from PIL import Image

        self.output_dir.mkdir(parents=True, exist_ok=True)
        step = int(engine.state.epoch) * self.iterations_per_epoch
        path = self.output_dir / f"samples_iter{step:07d}.png"
        Image.fromarray(np.concatenate(self._rows, axis=0)).save(path)
        self.last_path = str(path)
        logged = _log_artifact(engine, str(path), self.artifact_path)
        note = " (logged to MLflow)" if logged else ""
        logger.info(f"saved input | reconstruction | target samples: {path}{note}")


class MLflowExtras:
    """Log parameters and final files to the MLflow run of MONAI's ``MLFlowHandler`` on a trainer.

    MONAI's handler logs losses, metrics and ``max_epochs``/``epoch_length``; this adds the
    recipe's parameters (once its run is open, at the first completed iteration) and, when the
    trainer completes, the given files or folders (e.g. the final ``model.pt``) as artifacts.
    Put it in ``train#handlers`` after the handler that writes those files: handlers run in
    order. Does nothing without ``--tracking mlflow``.

    Args:
        params: name -> value (nested dicts are flattened with ``.``; values logged as strings).
        artifacts: paths logged when training completes (missing ones skipped).
        artifact_path: MLflow artifact folder of ``artifacts``.
    """

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        artifacts: Sequence[str] | str | None = None,
        artifact_path: str | None = "model",
    ) -> None:
        self.params = dict(params or {})
        self.artifacts = [artifacts] if isinstance(artifacts, (str, os.PathLike)) else list(artifacts or [])
        self.artifact_path = artifact_path
        self._params_logged = False

    def attach(self, engine: Any) -> None:
        """Register on ``ITERATION_COMPLETED`` (parameters, once) and ``COMPLETED`` (artifacts)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._log_params)
        engine.add_event_handler(Events.COMPLETED, self._log_artifacts)

    @staticmethod
    def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, Mapping):
                out.update(MLflowExtras._flatten(v, name + "."))
            else:
                out[name] = str(v)[:500]
        return out

    def _log_params(self, engine: Any) -> None:
        if self._params_logged:
            return
        handler = find_mlflow_handler(engine)
        if handler is None or handler.cur_run is None:
            return
        run_id = handler.cur_run.info.run_id
        existing = handler.client.get_run(run_id).data.params
        for k, v in self._flatten(self.params).items():
            if k not in existing:  # a resumed run keeps its original parameters
                handler.client.log_param(run_id, k, v)
        self._params_logged = True

    def _log_artifacts(self, engine: Any) -> None:
        for path in self.artifacts:
            if os.path.exists(path) and _log_artifact(engine, str(path), self.artifact_path):
                logger.info(f"logged {path} to MLflow")



def _stem(path: str) -> str:
    name = os.path.basename(os.fspath(path).rstrip("/"))
    for ext in (".nii.gz", ".ome.tif", ".ome.tiff"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


class ReconstructionWriter:
    """Write the reconstruction of every inference item as ``output_dir/<name><output_ext>``.

    Attach to a ``SupervisedEvaluator`` whose items carry the source path under ``path_key`` and
    the ``"plane"``/``"index"`` of ``custom.data.slice_items``, and whose postprocessing maps
    ``key`` back to [0, 1]. ``<name>`` is the source file's stem, plus ``_<plane><index:04d>``
    for slices of 3D stacks. ``.png`` is written as uint8 (0-255), ``.tif``/``.tiff`` as float32,
    through ``custom.data.write_em``. With ``input_suffix`` the (possibly degraded) input
    ``input_key`` is written as well, as ``<name><input_suffix><output_ext>``.

    Args:
        output_dir: output folder (created).
        output_ext: ``".png"``, ``".tif"`` or ``".tiff"``.
        key: the reconstruction's output key.
        path_key: item key of the source path.
        input_key, input_suffix: also write this output key under this suffix (None: don't).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        output_ext: str = ".png",
        key: str = "pred",
        path_key: str = "image_path",
        input_key: str = "image",
        input_suffix: str | None = None,
    ) -> None:
        if output_ext.lower() not in (".png", ".tif", ".tiff"):
            raise ValueError(f"output_ext must be .png, .tif or .tiff, got {output_ext!r}")
        self.output_dir = Path(output_dir)
        self.output_ext = output_ext
        self.key, self.path_key = key, path_key
        self.input_key, self.input_suffix = input_key, input_suffix
        self.written: list[str] = []

    def attach(self, engine: Any) -> None:
        """Register on ``ITERATION_COMPLETED`` (after decollation and postprocessing) and ``COMPLETED``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def _summary(self, engine: Any) -> None:
        logger.info(f"wrote {len(self.written)} images to {self.output_dir}")

    def _write(self, name: str, x: Any) -> None:
        from custom.data import write_em

        a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        a = a[0] if a.ndim == 3 else a
        a = np.clip(a, 0.0, 1.0)
        if self.output_ext.lower() == ".png":
            a = (a * 255.0 + 0.5).astype(np.uint8)
        path = str(self.output_dir / f"{name}{self.output_ext}")
        write_em(path, a.astype(a.dtype, copy=False))
        self.written.append(path)

    def __call__(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(output, list):
            raise ValueError("ReconstructionWriter needs decollated outputs (SupervisedEvaluator decollate=True)")
        for item, out in zip(batch, output):
            name = _stem(str(item[self.path_key]))
            index = int(item.get("index", -1))
            if index >= 0:
                name += f"_{item.get('plane', 'xy')}{index:04d}"
            self._write(name, out[self.key])
            if self.input_suffix is not None:
                self._write(name + self.input_suffix, out[self.input_key])
