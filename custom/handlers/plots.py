"""Training curves as a picture: the loss and the validation metrics against the trainer's iteration.

:class:`TrainingCurves` (an Ignite handler on the trainer) records the training loss every iteration
and, after every completed run of its ``validator``, the validator's metrics (the fine-tuning IoU,
the pretraining MSE/PSNR/SSIM); it redraws ``<output_dir>/training_curves.png`` (matplotlib, no display
needed) and ``training_curves.csv`` after each validation, and logs both to the MLflow run of the
``MLFlowHandler`` of its handler list when training completes (``custom.handlers.connect_tracking``).
MONAI's ``MLFlowHandler`` logs the numbers; this adds the picture a reader looks at first.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from typing import Any, Callable

from ignite.engine import Engine, Events

from .progress import loss_postfix
from .tracking import MLflowRun

__all__ = ["TrainingCurves", "plot_curves"]

logger = logging.getLogger(__name__)


def plot_curves(loss: Sequence[tuple[int, float]], metrics: dict[str, list[tuple[int, float]]], path: str) -> str:
    """Write a PNG: the loss (left, log scale when positive) and each metric (right) against iteration."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never a window
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_metric = fig.subplots(1, 2)
    if loss:
        it, val = zip(*loss)
        ax_loss.plot(it, val, lw=0.8, color="tab:blue")
        if min(val) > 0:
            ax_loss.set_yscale("log")
    ax_loss.set(xlabel="iteration", ylabel="training loss", title="training loss")
    for name, points in metrics.items():
        if points:
            it, val = zip(*points)
            ax_metric.plot(it, val, marker="o", ms=3, label=name)
    if metrics:
        ax_metric.legend(loc="best", fontsize="small")
    ax_metric.set(xlabel="iteration", ylabel="value", title="validation")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


class TrainingCurves:
    """Loss and validation-metric curves of a training as ``training_curves.png`` / ``.csv``, also in MLflow.

    Put it in ``train#handlers`` (before the ``MLFlowHandler`` that ``--tracking mlflow`` appends, so the
    files are logged before that run closes) and pass that list to ``connect_tracking``.

    Args:
        output_dir: folder of the two files (created).
        validator: the evaluator whose ``state.metrics`` are recorded after each of its runs (None: loss only).
        metric_names: which of its metrics (default: all).
        loss_transform: trainer output -> ``{"loss": value}`` (default: the ``"loss"`` key of MONAI's output).
        name: file name stem.
        artifact_path: MLflow artifact folder.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        validator: Engine | None = None,
        metric_names: Sequence[str] | None = None,
        loss_transform: Callable[[Any], dict] = loss_postfix,
        name: str = "training_curves",
        artifact_path: str = "plots",
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self.validator = validator
        self.metric_names = None if metric_names is None else list(metric_names)
        self.loss_transform = loss_transform
        self.name, self.artifact_path = name, artifact_path
        self.mlflow = MLflowRun()
        self.loss: list[tuple[int, float]] = []
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        """Register on the trainer (loss, final files) and on the validator's ``COMPLETED`` (metrics, redraw)."""
        self.trainer = engine
        engine.add_event_handler(Events.STARTED, self.resume)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record_loss)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self.record_metrics)

    def resume(self, engine: Engine) -> None:
        """Keep the rows of an earlier ``.csv`` up to the iteration the trainer starts from (a resumed run
        continues its curves; a new run, starting at 0, keeps none; rows after the checkpoint are redone)."""
        table = self.paths()[1]
        start = engine.state.iteration
        if start <= 0 or not os.path.isfile(table):
            return
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    series, step, value = row["series"], int(row["iteration"]), float(row["value"])
                except (KeyError, TypeError, ValueError):
                    continue  # not a row of ours: ignore it rather than fail the training
                if step <= start:
                    (self.loss if series == "loss" else self.metrics.setdefault(series, [])).append((step, value))

    def record_loss(self, engine: Engine) -> None:
        for value in self.loss_transform(engine.state.output).values():
            self.loss.append((engine.state.iteration, float(value)))

    def record_metrics(self, validator: Engine) -> None:
        step = self.trainer.state.iteration if self.trainer is not None else validator.state.epoch
        for name, value in validator.state.metrics.items():
            if (self.metric_names is None or name in self.metric_names) and isinstance(value, (int, float)):
                self.metrics.setdefault(name, []).append((step, float(value)))
        self.write()

    def paths(self) -> tuple[str, str]:
        return (os.path.join(self.output_dir, f"{self.name}.png"), os.path.join(self.output_dir, f"{self.name}.csv"))

    def write(self) -> tuple[str, str]:
        """Redraw the PNG and rewrite the CSV (``series, iteration, value``; both replaced atomically)."""
        from custom.utils import atomic_path

        os.makedirs(self.output_dir, exist_ok=True)
        png, table = self.paths()
        with atomic_path(png) as tmp:
            plot_curves(self.loss, self.metrics, str(tmp))
        rows = [("loss", i, v) for i, v in self.loss] + [(n, i, v) for n, pts in self.metrics.items() for i, v in pts]
        with atomic_path(table) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["series", "iteration", "value"])
            writer.writerows(rows)
        return png, table

    def completed(self, engine: Engine) -> None:
        paths = self.write()
        note = " (logged to MLflow)" if self.mlflow.log_artifacts(paths, self.artifact_path) else ""
        logger.info(f"saved training curves: {paths[0]}{note}")
