"""Checkpoints that a kill never leaves truncated, through Ignite's public ``Checkpoint`` API.

- :class:`AtomicDiskSaver`: Ignite's ``DiskSaver`` in its atomic mode (temporary file, then
  rename), with MONAI's fixed file names (``model.pt``), and deleting a file it replaces only
  once the new one is whole; it also prunes older resume checkpoints (:func:`prune_checkpoints`).
- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` (same arguments, same file names and
  log lines) whose final, best-model and interval checkpoints are Ignite ``Checkpoint`` objects
  writing through an :class:`AtomicDiskSaver`. Resume with MONAI's ``CheckpointLoader``.
- :class:`ValidationState`: the evaluator's best-model bookkeeping (its best metric and the
  best-model saver's score list), saved in the resume checkpoint, so that after a resume
  ``model.pt`` is only replaced by a better model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver
from monai.utils import is_scalar

from .resume import CHECKPOINT_NAME, prune_checkpoints

__all__ = ["AtomicDiskSaver", "AtomicCheckpointSaver", "ValidationState"]


class AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` writing atomically and never deleting a checkpoint before its successor is whole.

    Ignite's ``Checkpoint`` asks its save handler to remove the file it replaces *before* it writes
    the new one: with ``n_saved=1`` a kill during the write would leave no checkpoint at all. Here
    :meth:`remove` only notes the file; it is deleted after the next save has succeeded. Each file
    is written to a temporary file (``tmp*``) in the same folder and renamed onto its name (Ignite's
    atomic mode, which also adds group/other read permission).

    Args:
        dirname: the folder (created).
        filename: a fixed file name for every save (MONAI's ``final_filename`` / ``key_metric_filename``,
            e.g. ``model.pt``); None: Ignite's names (``checkpoint_epoch=3.pt``).
        n_saved: after each save, keep only the ``n_saved`` newest ``{prefix}_{epoch|iteration}=N.pt``
            files of the name just written, also those an earlier process left (:func:`prune_checkpoints`);
            None: keep them all.
        kwargs: for ``torch.save`` (as Ignite's ``DiskSaver``).
    """

    def __init__(self, dirname: Union[str, os.PathLike], filename: Optional[str] = None, n_saved: Optional[int] = None,
                 **kwargs: Any) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False, **kwargs)
        self.filename = filename
        self.n_saved = n_saved
        self.replaced: list[str] = []  # files Ignite asked to remove, deleted once the next save is whole

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Optional[Mapping] = None) -> None:
        written = self.filename or filename
        super().__call__(checkpoint, written, metadata)
        replaced, self.replaced = self.replaced, []
        for old in replaced:
            self.discard(old, keep=written)
        m = CHECKPOINT_NAME.match(written)
        if self.n_saved and m and idist.get_rank() == self.save_on_rank:
            prune_checkpoints(self.dirname, m.group(1), m.group(2), self.n_saved, newest=written)

    def remove(self, filename: str) -> None:
        """Note ``filename`` for deletion after the next successful save (see the class doc)."""
        self.replaced.append(filename)

    def discard(self, filename: str, keep: Optional[str] = None) -> None:
        """Delete ``filename`` now, unless it is ``keep`` or gone already (with a fixed name both are that name)."""
        name = self.filename or filename
        if name != (self.filename or keep) and (self.dirname / name).exists():
            super().remove(name)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments, file names and log lines), writing every file atomically.

    MONAI writes through a non-atomic file writer of its own that cannot be replaced, and Ignite's
    ``Checkpoint`` deletes the file being replaced before it writes the new one: a run killed while
    saving leaves a truncated newest checkpoint, or with ``n_saved=1`` none at all. Here each
    checkpoint is an Ignite ``Checkpoint`` writing through an :class:`AtomicDiskSaver`, so the newest
    checkpoint on disk is always whole. The Ignite objects are :attr:`final_checkpoint`,
    :attr:`key_metric_checkpoint` and :attr:`interval_checkpoint` (None when not configured).

    Interval checkpoints keep ``n_saved`` files on disk, also across a resume: Ignite counts only the
    files its own process wrote, so the checkpoint a resumed run started from (e.g.
    ``checkpoint_epoch=1.pt`` next to the new ``checkpoint_epoch=3.pt``) would stay forever; the
    older ``{prefix}_{epoch|iteration}=N.pt`` files beyond ``n_saved`` are removed after each save.

    :meth:`state_dict` / :meth:`load_state_dict`: the best-model score list (what
    :class:`ValidationState` saves with a resume checkpoint).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        name: Optional[str] = None,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: Optional[str] = None,
        save_key_metric: bool = False,
        key_metric_name: Optional[str] = None,
        key_metric_n_saved: int = 1,
        key_metric_filename: Optional[str] = None,
        key_metric_save_state: bool = False,
        key_metric_greater_or_equal: bool = False,
        key_metric_negative_sign: bool = False,
        epoch_level: bool = True,
        save_interval: int = 0,
        n_saved: Optional[int] = None,
    ) -> None:
        # MONAI's own checkpoints are left off (its writer cannot be replaced); ours are made below
        super().__init__(save_dir, save_dict, name=name, file_prefix=file_prefix, epoch_level=epoch_level)
        if key_metric_filename is not None and key_metric_n_saved > 1:
            raise ValueError("if using fixed filename to save the best metric model, we should only save 1 model.")
        self.logger_name = name
        self.save_interval = save_interval
        self.final_filename = final_filename
        self.key_metric_name = key_metric_name
        self.key_metric_negative_sign = key_metric_negative_sign

        def checkpoint(filename: Optional[str] = None, keep: Optional[int] = None, **kwargs: Any) -> Checkpoint:
            return Checkpoint(save_dict, AtomicDiskSaver(save_dir, filename, keep), filename_prefix=file_prefix, **kwargs)

        self.final_checkpoint = (
            checkpoint(final_filename, score_function=self.final_score, score_name="final_iteration")
            if save_final else None
        )
        self.key_metric_checkpoint = (
            checkpoint(key_metric_filename, score_function=self.key_metric_score, score_name="key_metric",
                       n_saved=key_metric_n_saved, include_self=key_metric_save_state,
                       greater_or_equal=key_metric_greater_or_equal)
            if save_key_metric else None
        )
        self.interval_checkpoint = (
            checkpoint(None, n_saved, score_function=self.interval_score,
                       score_name="epoch" if epoch_level else "iteration", n_saved=n_saved)
            if save_interval > 0 else None
        )

    # ---- scores (Ignite keeps the files of the highest)
    @staticmethod
    def final_score(engine: Engine) -> int:
        return engine.state.iteration

    def interval_score(self, engine: Engine) -> int:
        return engine.state.epoch if self.epoch_level else engine.state.iteration

    def key_metric_score(self, engine: Engine) -> Any:
        """The key metric (``key_metric_name``, else the engine's ``key_metric_name``), negated for
        error-like metrics; -1 (nothing saved) with a warning for a non-scalar metric, as MONAI."""
        if isinstance(self.key_metric_name, str):
            metric_name = self.key_metric_name
        elif hasattr(engine.state, "key_metric_name"):
            metric_name = engine.state.key_metric_name
        else:
            raise ValueError(f"Incompatible values: save_key_metric=True and key_metric_name={self.key_metric_name}.")
        metric = engine.state.metrics[metric_name]
        if not is_scalar(metric):
            warnings.warn(
                "key metric is not a scalar value, skip metric comparison and don't save a model."
                "please use other metrics as key metric, or change the `reduction` mode to 'mean'."
                f"got metric: {metric_name}={metric}."
            )
            return -1
        return (-1 if self.key_metric_negative_sign else 1) * metric

    # ---- the engine's events
    def attach(self, engine: Engine) -> None:
        """Register on ``COMPLETED``/``EXCEPTION_RAISED`` (final), ``EPOCH_COMPLETED`` (key metric) and the
        interval's ``EPOCH_COMPLETED``/``ITERATION_COMPLETED(every=save_interval)``, as MONAI's saver."""
        if self.logger_name is None:
            self.logger = engine.logger
        if self.final_checkpoint is not None:
            engine.add_event_handler(Events.COMPLETED, self.completed)
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        if self.key_metric_checkpoint is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.metrics_completed)
        if self.interval_checkpoint is not None:
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.save_interval), self.interval_completed)

    def save_final_checkpoint(self, engine: Engine) -> str:
        """Write the final checkpoint (one only: a previous one of this saver is deleted once it is written)."""
        ckpt = self.final_checkpoint
        previous = ckpt.last_checkpoint
        ckpt.reset()  # a new final checkpoint is written whatever its iteration
        ckpt(engine)
        current = Path(ckpt.last_checkpoint)
        if previous is not None:
            ckpt.save_handler.discard(Path(previous).name, keep=current.name)
        return os.path.join(self.save_dir, self.final_filename) if self.final_filename else str(current)

    def completed(self, engine: Engine) -> None:
        """Save the final checkpoint when the engine completes."""
        self.logger.info(f"Train completed, saved final checkpoint: {self.save_final_checkpoint(engine)}")

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """Save the final checkpoint when the engine fails, then re-raise (as MONAI's saver: put it before
        ``StatsHandler``, the first ``EXCEPTION_RAISED`` handler that raises ends the others)."""
        self.logger.info(f"Exception raised, saved the last checkpoint: {self.save_final_checkpoint(engine)}")
        raise e

    def metrics_completed(self, engine: Engine) -> None:
        """Save the best model when the key metric improved."""
        self.key_metric_checkpoint(engine)

    def interval_completed(self, engine: Engine) -> None:
        """Save an interval (resume) checkpoint."""
        self.interval_checkpoint(engine)
        if self.epoch_level:
            self.logger.info(f"Saved checkpoint at epoch: {engine.state.epoch}")
        else:
            self.logger.info(f"Saved checkpoint at iteration: {engine.state.iteration}")

    # ---- the best-model score list, for a resume
    def state_dict(self) -> dict:
        """``{"_saved": [(score, filename), ...]}`` of the best-model checkpoint (Ignite's ``Checkpoint.state_dict``)."""
        if self.key_metric_checkpoint is None:
            return {"_saved": []}
        return {"_saved": [(float(p), str(f)) for p, f in self.key_metric_checkpoint.state_dict()["_saved"]]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the best-model score list; entries whose file is gone are dropped (so a missing
        ``model.pt`` is written again at the next validation)."""
        if self.key_metric_checkpoint is None:
            warnings.warn("no key metric checkpoint saver to resume the key metric tracking list.")
            return
        fixed = self.key_metric_checkpoint.save_handler.filename
        alive = [(p, f) for p, f in state_dict.get("_saved", []) if (Path(self.save_dir) / (fixed or f)).exists()]
        self.key_metric_checkpoint.load_state_dict({"_saved": alive})


class ValidationState:
    """The best-model bookkeeping of a validation engine, as a checkpointable object.

    Put it in the trainer's resume checkpoint (``save_dict``/``load_dict``) next to the model and
    optimizer: it saves the evaluator's ``best_metric``/``best_metric_epoch`` and the score list of
    the best-model savers it is given, so that after a resume the best checkpoint (e.g.
    ``models/model.pt``) is only replaced by a better model, as without the interruption.

    Args:
        evaluator: the validation engine.
        checkpoint: the :class:`AtomicCheckpointSaver` (or a list of them) writing the evaluator's
            best model (``save_key_metric``).
    """

    def __init__(self, evaluator: Any, checkpoint: Union[AtomicCheckpointSaver, Sequence[AtomicCheckpointSaver], None] = None) -> None:
        self.evaluator = evaluator
        savers = [] if checkpoint is None else [checkpoint] if isinstance(checkpoint, CheckpointSaver) else list(checkpoint)
        for s in savers:
            if not isinstance(s, AtomicCheckpointSaver) or s.key_metric_checkpoint is None:
                raise TypeError(f"ValidationState needs best-model savers (AtomicCheckpointSaver with save_key_metric), got {s!r}")
        self.savers = savers

    def state_dict(self) -> dict:
        st = self.evaluator.state
        return {
            "best_metric": float(getattr(st, "best_metric", -1)),
            "best_metric_epoch": int(getattr(st, "best_metric_epoch", -1)),
            "key_metric_saved": [s.state_dict()["_saved"] for s in self.savers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        for saver, saved in zip(self.savers, state.get("key_metric_saved", [])):
            saver.load_state_dict({"_saved": saved})
