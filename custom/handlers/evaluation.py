"""The evaluation tables: every evaluated image or volume scored, written as CSV and JSON.

:class:`SegmentationMetricsSaver` scores each item with ``custom.metrics.evaluate_segmentation``
(IoU, F1, precision, recall, Mean False Distance, CREMI distances) and, at the end of the epoch,
writes the per-volume and mean tables, puts the means into ``engine.state.metrics`` and logs both
files to MLflow when connected to MONAI's ``MLFlowHandler`` (``custom.handlers.connect_tracking``).
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Sequence

from ignite.engine import Engine, Events
from monai.handlers import from_engine

from custom.metrics import evaluate_segmentation, summarize
from custom.utils import atomic_path

from .tracking import MLflowRun

__all__ = ["SegmentationMetricsSaver"]

logger = logging.getLogger(__name__)


def _json_value(v: float) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _item_name(item: Any, index: int) -> str:
    if isinstance(item, Mapping):
        image = item.get("image")
        meta = getattr(image, "meta", None) or {}
        name = meta.get("filename_or_obj") or item.get("name")
        if isinstance(name, (list, tuple)):
            name = name[0] if name else None
        if name:
            return str(name)
    return f"item_{index:04d}"


class SegmentationMetricsSaver:
    """Scores every evaluated image or volume with ``custom.metrics.evaluate_segmentation``; at the end of the
    epoch writes ``<output_dir>/<prefix>_metrics.csv`` (one row per volume and class, plus the means)
    and ``<prefix>_summary.json``, puts ``<prefix>_mean_<metric>`` (and per class
    ``<prefix>_<class>_<metric>``) into ``engine.state.metrics`` (so StatsHandler and MLflow record
    them) and logs both files to the MLflow run of the ``MLFlowHandler`` it is connected to.

    Args:
        output_dir: folder of the CSV and JSON files.
        classes: the evaluated class indices.
        output_transform: engine output -> ``(preds, labels)`` lists of channel-first label maps.
        prefix: file and metric name prefix.
        options: the other keywords of ``evaluate_segmentation`` (``class_names``, ``distances``,
            ``cremi``, ``spacing``, ``cremi_threshold``); an unknown one is refused here (``TypeError``).
    """

    def __init__(
        self,
        output_dir: str,
        classes: Sequence[int],
        output_transform: Callable = from_engine(["pred", "label"]),
        prefix: str = "eval",
        **options: Any,
    ) -> None:
        self.output_dir = output_dir
        self.classes = [int(c) for c in classes]
        inspect.signature(evaluate_segmentation).bind(None, None, self.classes, **options)
        self.options = options
        self.output_transform = output_transform
        self.prefix = prefix
        self.mlflow = MLflowRun()
        self.results: Dict[str, Dict[str, Dict[str, float]]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Any = None) -> None:
        self.results = {}

    def iteration_completed(self, engine: Engine) -> None:
        preds, labels = self.output_transform(engine.state.output)
        outputs = engine.state.output if isinstance(engine.state.output, (list, tuple)) else [None] * len(preds)
        for item, p, t in zip(outputs, preds, labels):
            name = _item_name(item, len(self.results))
            while name in self.results:
                name += "_"
            self.results[name] = evaluate_segmentation(p[0], t[0], self.classes, **self.options)
            logger.info("%s: %s", name, _fmt(self.results[name]["mean"]))

    def epoch_completed(self, engine: Engine) -> None:
        if not self.results:
            return
        summary = summarize(self.results)
        paths = self.write(summary)
        for cls, row in summary.items():
            for metric, v in row.items():
                key = f"{self.prefix}_mean_{metric}" if cls == "mean" else f"{self.prefix}_{cls}_{metric}"
                engine.state.metrics[key] = v
        logger.info("[retina] %s over %d volume(s): %s", self.prefix, len(self.results), _fmt(summary["mean"]))
        self.mlflow.log_artifacts(paths, artifact_path="metrics")

    def write(self, summary: Mapping[str, Mapping[str, float]]) -> List[str]:
        """Write the CSV and JSON files; returns their paths."""
        os.makedirs(self.output_dir, exist_ok=True)
        metrics: List[str] = []
        for res in list(self.results.values()) + [summary]:
            for row in res.values():
                metrics += [k for k in row if k not in metrics]
        csv_path = os.path.join(self.output_dir, f"{self.prefix}_metrics.csv")
        with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["volume", "class"] + metrics)
            for vol, res in list(self.results.items()) + [("mean", summary)]:
                for cls, row in res.items():
                    w.writerow([vol, cls] + [row.get(m, "") for m in metrics])
        json_path = os.path.join(self.output_dir, f"{self.prefix}_summary.json")
        doc = {
            "classes": self.classes,
            "mean": {c: {k: _json_value(v) for k, v in r.items()} for c, r in summary.items()},
            "per_volume": {
                vol: {c: {k: _json_value(v) for k, v in r.items()} for c, r in res.items()}
                for vol, res in self.results.items()
            },
        }
        with atomic_path(json_path) as tmp, open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        return [csv_path, json_path]


def _fmt(row: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in row.items())
