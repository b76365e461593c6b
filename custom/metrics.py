"""Segmentation metrics of the RETINA evaluation protocol and their reporting.

All functions take label maps of class indices (any spatial rank, same shape; numpy or torch)
and score one class at a time over the whole image or volume, as the paper does:

- IoU, F-score, precision, recall: MONAI's confusion-matrix metrics
  (``get_confusion_matrix`` / ``compute_confusion_matrix_metric``: "threat score" is IoU).
- Mean False Distance: the mean of the two directed average surface distances
  (prediction surface -> truth surface and back), from MONAI's ``get_edge_surface_distance``;
  in voxels unless a spacing is given. MONAI's own symmetric ASD averages the pooled distances
  instead, which weights the larger surface more, hence the explicit mean here.
- CREMI (binary, cleft-like tasks): ADGT = mean distance of predicted voxels to the nearest
  true voxel, ADF = mean distance of true voxels to the nearest predicted voxel, CREMI score =
  their mean (MONAI's ``get_surface_distance`` on the full masks); optionally FP / FN = voxels
  farther than a tolerance.

Sparse labels: with ``ignore_index`` (the label value of unlabelled voxels, e.g. 255) every score is
computed over the labelled voxels only (a prediction there is neither right nor wrong).

Conventions: a score whose sets are empty on both sides is NaN (the class is absent); a
distance to an empty set is ``inf``. Means over classes and volumes skip NaN.

For the bundle configs: :class:`PooledClassScore` (the validation key metric: counts pooled over
every validation image, averaged over the evaluated classes). The handlers that write the
evaluation tables and overlays are ``custom.handlers.SegmentationMetricsSaver`` and
``custom.handlers.PredictionOverlays``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.handlers import from_engine
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric, get_confusion_matrix
from monai.metrics.utils import get_edge_surface_distance, get_surface_distance

from .utils import class_name

__all__ = [
    "SCORES",
    "foreground_classes",
    "class_confusion",
    "scores_from_confusion",
    "directed_surface_distances",
    "mean_false_distance",
    "cremi_distances",
    "evaluate_segmentation",
    "summarize",
    "ClassConfusionMetric",
    "PooledClassScore",
]

logger = logging.getLogger(__name__)

# our short names -> MONAI's confusion-matrix metric names
SCORES: Dict[str, str] = {"iou": "threat score", "f1": "f1 score", "precision": "precision", "recall": "sensitivity"}

ArrayLike = Union[np.ndarray, torch.Tensor]


def _labels(x: ArrayLike) -> torch.Tensor:
    """A label map as an integer CPU tensor (a leading channel of size 1 is kept as is)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    if t.is_floating_point():
        t = t.round()
    return t.to(torch.int64)


def _mask(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu()).bool()


def foreground_classes(num_classes: int) -> List[int]:
    """The classes scored by default: every class but the background 0 (``[1]`` for a binary network)."""
    return list(range(1, max(2, int(num_classes))))


def class_confusion(
    pred: ArrayLike, truth: ArrayLike, classes: Sequence[int], ignore_index: int | None = None
) -> torch.Tensor:
    """Per-class counts ``(len(classes), 4)``: true positives, false positives, true negatives, false negatives
    (over the voxels whose truth is not ``ignore_index``)."""
    p, t = _labels(pred), _labels(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    if ignore_index is not None:
        labelled = t != int(ignore_index)
        p, t = p[labelled], t[labelled]
    p, t = p.reshape(1, 1, -1), t.reshape(1, 1, -1)
    rows = [get_confusion_matrix((p == c).to(torch.uint8), (t == c).to(torch.uint8))[0, 0] for c in classes]
    return torch.stack(rows) if rows else torch.zeros((0, 4))


def scores_from_confusion(confusion: torch.Tensor) -> Dict[str, torch.Tensor]:
    """IoU, F-score, precision and recall from counts ``(..., 4)`` (NaN where undefined)."""
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    return {name: compute_confusion_matrix_metric(monai_name, cm) for name, monai_name in SCORES.items()}


def directed_surface_distances(
    pred: ArrayLike, truth: ArrayLike, spacing: Optional[Sequence[float]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances of each prediction surface voxel to the truth surface, and of each truth surface voxel to
    the prediction surface (binary masks; surfaces as MONAI's ``get_mask_edges``)."""
    p, t = _mask(pred), _mask(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    if not p.any() or not t.any():  # a surface facing an empty mask is infinitely far from it
        none, far = torch.zeros(0), torch.tensor([math.inf])
        return (far if p.any() else none), (far if t.any() else none)
    with warnings.catch_warnings():  # MONAI passes its own deprecated argument internally (MONAI 1.5-1.6)
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        _, (d_pt, d_tp), _ = get_edge_surface_distance(p, t, spacing=spacing, symmetric=True, warn_empty=False)
    return d_pt.float(), d_tp.float()


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else math.nan


def mean_false_distance(pred: ArrayLike, truth: ArrayLike, spacing: Optional[Sequence[float]] = None) -> float:
    """Mean False Distance: (mean dist. prediction surface -> truth + mean dist. truth surface -> prediction) / 2.

    NaN when both masks are empty, ``inf`` when exactly one is.
    """
    p, t = _mask(pred), _mask(truth)
    if not p.any() and not t.any():
        return math.nan
    if not p.any() or not t.any():
        return math.inf
    d_pt, d_tp = directed_surface_distances(p, t, spacing)
    return (_mean(d_pt) + _mean(d_tp)) / 2.0


def cremi_distances(
    pred: ArrayLike,
    truth: ArrayLike,
    spacing: Optional[Sequence[float]] = None,
    threshold: Optional[float] = None,
) -> Dict[str, float]:
    """CREMI cleft scores of binary masks: ``adgt``, ``adf``, ``cremi_score`` (and ``fp``, ``fn`` with a threshold).

    ``adgt``: mean distance of predicted voxels to the nearest true voxel (NaN without predicted voxels);
    ``adf``: mean distance of true voxels to the nearest predicted voxel (NaN without true voxels);
    a distance to an empty set is ``inf``. ``fp`` / ``fn``: predicted / true voxels farther than
    ``threshold`` (same unit as ``spacing``; CREMI uses 200 nm) from the other mask.
    """
    p, t = _mask(pred), _mask(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")

    def directed(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if not src.any():
            return torch.zeros(0)
        if not dst.any():
            return torch.full((int(src.sum()),), math.inf)
        return torch.as_tensor(get_surface_distance(src.numpy(), dst.numpy(), spacing=spacing)).float()

    d_pred, d_true = directed(p, t), directed(t, p)
    out = {"adgt": _mean(d_pred), "adf": _mean(d_true)}
    out["cremi_score"] = (out["adgt"] + out["adf"]) / 2.0
    if threshold is not None:
        out["fp"] = float((d_pred > threshold).sum())
        out["fn"] = float((d_true > threshold).sum())
    return out


def evaluate_segmentation(
    pred: ArrayLike,
    truth: ArrayLike,
    classes: Sequence[int],
    class_names: Optional[Mapping[Any, str]] = None,
    distances: bool = True,
    cremi: bool = False,
    spacing: Optional[Sequence[float]] = None,
    cremi_threshold: Optional[float] = None,
    ignore_index: int | None = None,
) -> Dict[str, Dict[str, float]]:
    """Every metric of one prediction against its truth, per class, plus ``"mean"`` over the classes.

    Args:
        pred, truth: label maps of class indices, same shape (2D image or 3D volume).
        classes: the evaluated class indices (e.g. ``[1]`` for a binary task, ``[2, 3, 4, 5, 6]`` for Guay).
        class_names: index (int or str) -> name for the keys of the result (default ``"class_<i>"``).
        distances: also compute the Mean False Distance (``mfd``).
        cremi: also compute ``adgt``, ``adf``, ``cremi_score`` (and ``fp``, ``fn`` given ``cremi_threshold``).
        spacing: voxel size for the distances (default 1: distances in voxels).
        ignore_index: truth value of unlabelled voxels: the scores count labelled voxels only, and the
            distances see no prediction where the truth is unlabelled.
    Returns:
        ``{name: {"iou", "f1", "precision", "recall", ["mfd"], [...cremi]}, ..., "mean": {...}}``.
    """
    p, t = _labels(pred), _labels(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    scores = scores_from_confusion(class_confusion(p, t, classes, ignore_index))
    if ignore_index is not None:  # no class predicted or true at unlabelled voxels (for the distances)
        p = torch.where(t == int(ignore_index), -1, p)
        t = torch.where(t == int(ignore_index), -1, t)
    result: Dict[str, Dict[str, float]] = {}
    for i, c in enumerate(classes):
        row = {name: float(v[i]) for name, v in scores.items()}
        if distances:
            row["mfd"] = mean_false_distance(p == c, t == c, spacing)
        if cremi:
            row.update(cremi_distances(p == c, t == c, spacing, cremi_threshold))
        result[class_name(c, class_names)] = row
    result["mean"] = _nanmean_rows(list(result.values()))
    return result


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else math.nan


def _nanmean_rows(rows: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return {k: _nanmean([r[k] for r in rows if k in r]) for k in keys}


def summarize(per_volume: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Dict[str, Dict[str, float]]:
    """Mean over volumes of :func:`evaluate_segmentation` results (per class and for ``"mean"``), NaN skipped."""
    names: List[str] = []
    for res in per_volume.values():
        names += [n for n in res if n not in names]
    return {n: _nanmean_rows([res[n] for res in per_volume.values() if n in res]) for n in names}


# ----------------------------------------------------------------------------------------------
# MONAI metric and Ignite handlers


class ClassConfusionMetric(CumulativeIterationMetric):
    """Per-class confusion counts of label maps, pooled over every image seen, then a score.

    ``y_pred`` and ``y``: batch-first ``(B, 1, ...)`` label maps of class indices (or lists of
    channel-first ones); voxels whose ``y`` is ``ignore_index`` are not counted. :meth:`aggregate` sums the counts over all images, computes the score
    per class from the pooled counts and, with ``reduction="mean"``, averages over the classes.
    """

    def __init__(self, classes: Sequence[int], metric_name: str = "iou", ignore_index: int | None = None) -> None:
        super().__init__()
        if metric_name not in SCORES:
            raise ValueError(f"metric_name must be one of {sorted(SCORES)}, got {metric_name!r}")
        self.classes = [int(c) for c in classes]
        self.metric_name = metric_name
        self.ignore_index = ignore_index

    def _compute_tensor(self, y_pred: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("ClassConfusionMetric needs y")
        return torch.stack([class_confusion(p, t, self.classes, self.ignore_index) for p, t in zip(y_pred, y)])

    def aggregate(self, reduction: str = "mean") -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("ClassConfusionMetric has no data to aggregate")
        per_class = compute_confusion_matrix_metric(SCORES[self.metric_name], data.double().sum(dim=0))
        if reduction == "none":
            return per_class.float()
        valid = per_class[~torch.isnan(per_class)]
        return valid.mean().float() if valid.numel() else torch.tensor(float("nan"))


class PooledClassScore(IgniteMetricHandler):
    """Ignite metric: :class:`ClassConfusionMetric` (IoU by default) averaged over ``classes``.

    Counts are pooled over the whole epoch (every validation image or slice), so the score is the
    whole-dataset IoU per class, as the paper scores volumes, rather than a mean of per-slice IoUs.
    With ``ignore_index`` only labelled voxels (truth not ``ignore_index``) are counted.
    """

    def __init__(
        self,
        classes: Sequence[int],
        metric_name: str = "iou",
        output_transform: Callable = from_engine(["pred", "label"]),
        save_details: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(
            metric_fn=ClassConfusionMetric(classes, metric_name, ignore_index),
            output_transform=output_transform,
            save_details=save_details,
        )
