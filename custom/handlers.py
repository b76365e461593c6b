"""Small pieces the pretraining bundle's configs call that are neither transforms nor data I/O.

- :func:`pretraining_datalist`: the training/validation item lists of an unlabelled EM folder
  (falling back to the synthetic demo set when no folder is given), split by file.
- :func:`latest_checkpoint`: the newest complete ``CheckpointSaver`` interval checkpoint in a folder, to resume.
- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` writing each file under a temporary name
  and renaming it, so a run killed while saving never leaves a truncated checkpoint; it keeps
  ``n_saved`` interval checkpoints on disk across resumes (:func:`prune_checkpoints`).
- :func:`resume_checkpoint` and :class:`ValidationState`: what a restarted training resumes from, and
  the best-model bookkeeping saved with it.
- :func:`inference_items` / :func:`raise_failed_inputs`: the items of a folder to run inference on,
  with unreadable files set aside (reported at the end, non-zero exit) instead of stopping the run.
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
from monai.handlers import CheckpointSaver, MLFlowHandler
from monai.utils import path_to_sqlite_uri

__all__ = [
    "pretraining_datalist",
    "latest_checkpoint",
    "prune_checkpoints",
    "AtomicCheckpointSaver",
    "resume_checkpoint",
    "ValidationState",
    "inference_items",
    "raise_failed_inputs",
    "local_tracking_uri",
    "find_mlflow_handler",
    "SampleTripletSaver",
    "MLflowExtras",
    "ReconstructionWriter",
]

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"_(?:iteration|epoch)=(\d+)\.pt$")


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
    slices, taken evenly. The first ``check_items`` items of each split (all of them when
    negative) are read once (``custom.data.validate_items``), and every file is checked for being
    empty (one ``stat`` each), so an unreadable dataset fails before training.

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
    for f in files:
        if os.path.isfile(f) and os.path.getsize(f) == 0:
            raise data.DatasetError(f"{f}: empty file (0 bytes)")
    if check_items != 0:
        data.validate_items(train[:check_items] if check_items > 0 else train)
        data.validate_items(val[:check_items] if check_items > 0 else val)
    logger.info(f"{dataset_dir}: {len(files)} files, {len(train)} training and {len(val)} validation images")
    return {"training": train, "validation": val}


def _complete_checkpoint(path: str) -> bool:
    """True when ``path`` is a whole ``torch.save`` zip archive (a truncated one lacks its central directory)."""
    import zipfile

    try:
        return os.path.getsize(path) > 0 and zipfile.is_zipfile(path)
    except OSError:
        return False


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint", score_name: str = "iteration") -> str | None:
    """Path of the complete ``{prefix}_{score_name}=N.pt`` file with the largest N in ``ckpt_dir``, or None.

    ``score_name`` is ``"iteration"`` or ``"epoch"`` (``CheckpointSaver`` with ``epoch_level``).

    Temporary files of an interrupted atomic save (``tmp*``, ``*.tmp<pid>``) do not match the pattern.
    A truncated or empty checkpoint (written by a non-atomic saver killed mid-write, or a full disk)
    is skipped with a warning in favour of the next older one.

    Raises:
        custom.checkpoints.CheckpointError: checkpoints exist but none is complete.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.glob(f"{prefix}_{score_name}=*.pt"):
        m = _CKPT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), str(p)))
    if not found:
        return None
    for _, path in sorted(found, reverse=True):
        if _complete_checkpoint(path):
            logger.info(f"latest checkpoint in {ckpt_dir}: {path}")
            return path
        logger.warning(f"{path}: incomplete checkpoint (truncated or empty); not resuming from it")
    from custom.checkpoints import CheckpointError

    raise CheckpointError(
        f"{ckpt_dir}: no complete checkpoint to resume from ({len(found)} truncated); "
        "delete them, or pass --resume False to start afresh"
    )


_CKPT_NAME_RE = re.compile(r"^(.+)_(iteration|epoch)=(\d+)\.pt$")


def prune_checkpoints(
    ckpt_dir: str | os.PathLike,
    prefix: str = "checkpoint",
    score_name: str = "iteration",
    n_saved: int = 1,
    newest: str | None = None,
) -> list[str]:
    """Remove all but the ``n_saved`` newest ``{prefix}_{score_name}=N.pt`` files of ``ckpt_dir`` (largest N kept).

    :class:`AtomicCheckpointSaver` calls it after each successful interval save (``newest``: the
    file just written, always kept), so the checkpoint a resumed training started from does not
    stay beside the new ones. Other files (``previous_*``, ``model.pt``, temporary files) are not
    touched. Returns the removed paths.
    """
    folder = Path(ckpt_dir)
    found = []
    for p in folder.glob(f"{prefix}_{score_name}=*.pt"):
        m = _CKPT_NAME_RE.match(p.name)
        if m and m.group(1) == prefix and m.group(2) == score_name:
            found.append((p.name == newest, int(m.group(3)), p))
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)  # the file just written first, then newest first
    removed = []
    for _, _, p in found[max(int(n_saved), 1):]:
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(str(p))
        logger.info(f"removed the older checkpoint {p} (n_saved={n_saved})")
    return removed


_DEFERRED_CLASSES: dict[type, type] = {}


def _deferred_removal(cls: type) -> type:
    """A subclass of the disk saver ``cls`` whose ``remove`` waits until the next save has succeeded.

    Ignite's ``Checkpoint`` removes the file it replaces *before* writing the new one; with
    ``n_saved=1`` a kill during the write would leave no checkpoint at all.
    """
    if cls not in _DEFERRED_CLASSES:

        class Deferred(cls):  # type: ignore[valid-type, misc]
            def remove(self, filename: str) -> None:
                self._pending_removals = [*getattr(self, "_pending_removals", []), filename]

            def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
                super().__call__(checkpoint, filename, metadata)
                fixed = getattr(self, "filename", None)  # MONAI's fixed names (model.pt) override Ignite's
                written = fixed or filename
                for old in getattr(self, "_pending_removals", []):
                    if (fixed or old) != written and (Path(self.dirname) / (fixed or old)).exists():
                        super().remove(old)
                self._pending_removals = []
                keep = getattr(self, "_prune_n_saved", None)  # interval checkpoints (AtomicCheckpointSaver)
                m = _CKPT_NAME_RE.match(written)
                if keep and m:
                    prune_checkpoints(self.dirname, m.group(1), m.group(2), keep, newest=written)

        Deferred.__name__ = Deferred.__qualname__ = f"Deferred{cls.__name__}"
        _DEFERRED_CLASSES[cls] = Deferred
    return _DEFERRED_CLASSES[cls]


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments), writing every file atomically.

    MONAI creates Ignite's ``DiskSaver`` with ``atomic=False`` (older Ignite left atomic saves
    readable by their owner only), and Ignite's ``Checkpoint`` deletes the file being replaced before
    it writes the new one: a run killed while saving leaves a truncated newest checkpoint, or with
    ``n_saved=1`` none at all. Here each file is written to a temporary file in the same folder and
    renamed onto its name (Ignite's atomic mode, which since 0.4.x also adds group/other read
    permission), and the replaced file is deleted only after that, so the newest checkpoint on disk
    is always whole.

    Interval checkpoints keep ``n_saved`` files on disk, also across a resume: Ignite counts only
    the files its own process wrote, so the checkpoint a resumed run started from (e.g.
    ``checkpoint_epoch=1.pt`` next to the new ``checkpoint_epoch=3.pt``) would stay forever. After
    each successful interval save the older ``{prefix}_{epoch|iteration}=N.pt`` files beyond
    ``n_saved`` are removed (:func:`prune_checkpoints`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            handler = getattr(ckpt, "save_handler", None)
            if handler is not None:
                if not hasattr(handler, "_atomic"):
                    raise RuntimeError("this Ignite's DiskSaver has no atomic mode; AtomicCheckpointSaver needs one")
                handler._atomic = True
                handler.__class__ = _deferred_removal(type(handler))
                if ckpt is self._interval_checkpoint:
                    handler._prune_n_saved = getattr(ckpt, "n_saved", None)


def resume_checkpoint(
    ckpt_dir: str | os.PathLike, planned: int | None = None, prefix: str = "checkpoint", score_name: str = "iteration"
) -> str | None:
    """The checkpoint an interrupted training resumes from, or None to start a new training.

    The newest complete ``{prefix}_{score_name}=N.pt`` (:func:`latest_checkpoint`) when N is below
    ``planned`` (iterations or epochs, as ``score_name``). When N has reached it, that training
    finished: its checkpoints are renamed ``previous_...`` (no longer matched, so a later
    interruption of the new training resumes the new one) and None is returned, so the same command
    trains again (what MONAI Label expects of each training request) instead of doing nothing.
    """
    path = latest_checkpoint(ckpt_dir, prefix, score_name)
    if path is None or planned is None:
        return path
    m = _CKPT_RE.search(os.path.basename(path))
    if m is None or int(m.group(1)) < int(planned):
        return path
    for p in Path(ckpt_dir).glob(f"{prefix}_{score_name}=*.pt"):
        os.replace(p, p.with_name(f"previous_{p.name}"))
    logger.warning(
        f"{path}: the training in {ckpt_dir} finished ({score_name} {m.group(1)} of {planned}); starting a "
        f"new one (its checkpoints were renamed previous_*)"
    )
    return None


class ValidationState:
    """The best-model bookkeeping of a validation engine, as a checkpointable object.

    Put it in the trainer's resume checkpoint (``save_dict``/``load_dict``) next to the model and
    optimizer: it saves the evaluator's ``best_metric``/``best_metric_epoch`` and the score list of
    each key-metric ``CheckpointSaver`` attached to the evaluator, so that after a resume the best
    checkpoint (e.g. ``models/model.pt``) is only replaced by a better model, as without the
    interruption.
    """

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator

    def _savers(self) -> list:
        savers = []
        for handlers in getattr(self.evaluator, "_event_handlers", {}).values():
            for func, *_ in handlers:
                owner = getattr(func, "__self__", None)
                if isinstance(owner, CheckpointSaver) and owner._key_metric_checkpoint is not None and owner not in savers:
                    savers.append(owner)
        return savers

    def state_dict(self) -> dict:
        st = self.evaluator.state
        return {
            "best_metric": float(getattr(st, "best_metric", -1)),
            "best_metric_epoch": int(getattr(st, "best_metric_epoch", -1)),
            "key_metric_saved": [[(float(p), str(f)) for p, f in s._key_metric_checkpoint.state_dict()["_saved"]]
                                 for s in self._savers()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        for saver, saved in zip(self._savers(), state.get("key_metric_saved", [])):
            fixed = getattr(saver._key_metric_checkpoint.save_handler, "filename", None)  # MONAI's model.pt
            alive = [(p, f) for p, f in saved if (Path(saver.save_dir) / (fixed or f)).exists()]
            saver._key_metric_checkpoint.load_state_dict({"_saved": alive})


def inference_items(
    dataset_dir: str | os.PathLike, planes: str = "xy", path_key: str = "image_path", check_data: bool = True
) -> dict[str, Any]:
    """Slice items of every EM file under ``dataset_dir`` for inference, unreadable files set aside.

    Each file's header (and with ``check_data`` its pixels: ``custom.data.validate_items``) is read
    once; a file that fails is logged with its one-line problem and left out, so the others are
    still processed. Call :func:`raise_failed_inputs` after the run to end with a non-zero status.

    Returns:
        ``{"items": [{"image", path_key, "plane", "index"}, ...], "failed": ["<path>: <problem>", ...],
        "files": n, "dataset_dir": str}``.

    Raises:
        custom.data.DatasetError: ``dataset_dir`` holds no EM file, or none of them can be read.
    """
    from custom import data

    files = data.find_em_files(str(dataset_dir))
    items: list[dict] = []
    failed: list[str] = []
    for f in files:
        try:
            found = data.slice_items([{"image": f, path_key: f}], planes=planes)
            if check_data:
                data.validate_items([{"image": f}])
        except data.DatasetError as e:
            failed.append(str(e))
            logger.error(f"skipped (unreadable): {e}")
            continue
        items.extend(found)
    if not items:
        raise data.DatasetError(f"{dataset_dir}: none of the {len(files)} input file(s) can be read: {'; '.join(failed[:5])}")
    return {"items": items, "failed": failed, "files": len(files), "dataset_dir": str(dataset_dir)}


def raise_failed_inputs(screened: Mapping[str, Any], output_dir: str | os.PathLike | None = None) -> None:
    """Raise ``custom.data.DatasetError`` listing the files :func:`inference_items` set aside (if any)."""
    failed = list(screened.get("failed", []))
    if not failed:
        return
    from custom.data import DatasetError

    n = int(screened.get("files", len(failed)))
    where = f" into {output_dir}" if output_dir else ""
    raise DatasetError(
        f"{screened.get('dataset_dir', '')}: {len(failed)} of {n} input file(s) could not be read, "
        f"the other {n - len(failed)} were processed{where}: " + "; ".join(failed)
    )


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
        tags: name -> value set as run tags with the parameters (tags, unlike parameters, may
            change: e.g. ``resumed_from``, the checkpoint a restarted run continued from; empty
            values are not set).
    """

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        artifacts: Sequence[str] | str | None = None,
        artifact_path: str | None = "model",
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self.params = dict(params or {})
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v not in (None, "")}
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
        for k, v in self.tags.items():
            handler.client.set_tag(run_id, k, v)
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
    """Write the reconstruction of every inference item as ``output_dir/<sub-folder>/<name><output_ext>``.

    Attach to a ``SupervisedEvaluator`` whose items carry the source path under ``path_key`` and
    the ``"plane"``/``"index"`` of ``custom.data.slice_items``, and whose postprocessing maps
    ``key`` back to [0, 1]. ``<name>`` is the source file's stem, plus ``_<plane><index:04d>``
    for slices of 3D stacks; ``<sub-folder>`` is the source's folder below ``root`` (the
    ``dataset_dir``), so same-named files of different folders get different outputs. ``.png`` is
    written as uint8 (0-255), ``.tif``/``.tiff`` as float32, through ``custom.data.write_em``. With
    ``input_suffix`` the (possibly degraded) input ``input_key`` is written as well, as
    ``<name><input_suffix><output_ext>``.

    Call :meth:`plan` with the items before the run: it refuses (one ``custom.errors.OutputError``
    line) outputs that would land on an input, that two items share, or that exist already (unless
    ``overwrite``). Writes never replace an existing file unless ``overwrite``. With MONAI's
    ``MLFlowHandler`` on the same engine (``--tracking mlflow``), the list of outputs is logged to
    its run as ``outputs.tsv`` (input, output) when the run completes.

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
        self.written: list[str] = []
        self._rows: list[tuple[str, str]] = []

    def output_paths(self, item: Mapping[str, Any]) -> list[str]:
        """The files written for one item: the reconstruction, then the input copy (with ``input_suffix``)."""
        from custom.inference import input_subfolder

        src = str(item[self.path_key])
        name = _stem(src)
        index = int(item.get("index", -1))
        if index >= 0:
            name += f"_{item.get('plane', 'xy')}{index:04d}"
        folder = self.output_dir / input_subfolder(src, self.root)
        names = [name] + ([name + self.input_suffix] if self.input_suffix is not None else [])
        return [os.path.normpath(str(folder / f"{n}{self.output_ext}")) for n in names]

    def plan(self, items: Sequence[Mapping[str, Any]], inputs: Sequence[str] | None = None) -> dict[str, list[str]]:
        """Source -> its output paths, checked by ``custom.inference.check_outputs`` against ``inputs``
        (default: every EM file under ``root``, also those set aside as unreadable)."""
        from custom import data
        from custom.inference import check_outputs

        plan: dict[str, list[str]] = {}
        for item in items:
            plan.setdefault(str(item[self.path_key]), []).extend(self.output_paths(item))
        if inputs is None and self.root:
            try:
                inputs = data.find_em_files(self.root)
            except data.DatasetError:
                inputs = []
        check_outputs(plan, list(inputs or []), self.overwrite)
        return plan

    def attach(self, engine: Any) -> None:
        """Register on ``ITERATION_COMPLETED`` (after decollation and postprocessing) and ``COMPLETED``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def _summary(self, engine: Any) -> None:
        logger.info(f"wrote {len(self.written)} images to {self.output_dir}")
        handler = find_mlflow_handler(engine)
        if handler is not None and handler.cur_run is not None:
            text = "input\toutput\n" + "".join(f"{s}\t{p}\n" for s, p in self._rows)
            handler.client.log_text(handler.cur_run.info.run_id, text, "outputs.tsv")

    def _write(self, path: str, x: Any) -> None:
        from custom.data import write_em

        a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        a = a[0] if a.ndim == 3 else a
        a = np.clip(a, 0.0, 1.0)
        if self.output_ext.lower() == ".png":
            a = (a * 255.0 + 0.5).astype(np.uint8)
        write_em(path, a.astype(a.dtype, copy=False), overwrite=self.overwrite)
        self.written.append(path)

    def __call__(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(output, list):
            raise ValueError("ReconstructionWriter needs decollated outputs (SupervisedEvaluator decollate=True)")
        for item, out in zip(batch, output):
            paths = self.output_paths(item)
            self._write(paths[0], out[self.key])
            if self.input_suffix is not None:
                self._write(paths[1], out[self.input_key])
            self._rows += [(str(item[self.path_key]), p) for p in paths]
