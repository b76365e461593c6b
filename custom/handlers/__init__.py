"""Ignite handlers MONAI lacks, one concept a file; the configs name them ``custom.handlers.<Name>``.

- :mod:`.checkpointing`: :class:`AtomicCheckpointSaver` (MONAI's ``CheckpointSaver`` through Ignite's
  public ``Checkpoint`` with the atomic :class:`AtomicDiskSaver`), :class:`ValidationState`.
- :mod:`.resume`: :func:`latest_checkpoint`, :func:`resume_checkpoint`, :func:`prune_checkpoints`.
- :mod:`.tracking`: :func:`connect_tracking` (our handlers get MONAI's ``MLFlowHandler`` of their
  list), :class:`MLflowRun`, :class:`MLflowExtras`, :func:`local_tracking_uri`.
- :mod:`.images`: :class:`SampleTripletSaver`, :class:`PredictionOverlays` (:func:`overlay_image`),
  :class:`ReconstructionWriter`.
- :mod:`.evaluation`: :class:`SegmentationMetricsSaver` (the per-volume and mean tables).
- :mod:`.progress`: :class:`EngineProgress` (Ignite's ``ProgressBar``, silent off a terminal).
- :mod:`.plots`: :class:`TrainingCurves` (loss and validation metrics against iteration, PNG + CSV, MLflow).
"""

from .checkpointing import AtomicCheckpointSaver, AtomicDiskSaver, ValidationState
from .evaluation import SegmentationMetricsSaver
from .images import (
    PredictionOverlays,
    ReconstructionWriter,
    SampleTripletSaver,
    overlay_image,
)
from .plots import TrainingCurves, plot_curves
from .progress import EngineProgress, loss_postfix
from .resume import latest_checkpoint, prune_checkpoints, resume_checkpoint
from .tracking import (
    MLflowExtras,
    MLflowRun,
    close_tracking,
    connect_tracking,
    local_tracking_uri,
)

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "EngineProgress",
    "MLflowExtras",
    "MLflowRun",
    "PredictionOverlays",
    "ReconstructionWriter",
    "SampleTripletSaver",
    "SegmentationMetricsSaver",
    "TrainingCurves",
    "ValidationState",
    "close_tracking",
    "connect_tracking",
    "latest_checkpoint",
    "local_tracking_uri",
    "loss_postfix",
    "overlay_image",
    "plot_curves",
    "prune_checkpoints",
    "resume_checkpoint",
]
