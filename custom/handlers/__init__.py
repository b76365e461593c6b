"""Ignite handlers MONAI lacks, one concept a file; the configs name them ``custom.handlers.<Name>``.

- :mod:`.checkpointing`: :class:`AtomicCheckpointSaver` (MONAI's ``CheckpointSaver`` through Ignite's
  public ``Checkpoint`` with the atomic :class:`AtomicDiskSaver`), :class:`ValidationState`.
- :mod:`.resume`: :func:`latest_checkpoint`, :func:`resume_checkpoint`, :func:`prune_checkpoints`.
- :mod:`.tracking`: :func:`connect_tracking` (our handlers get MONAI's ``MLFlowHandler`` of their
  list), :class:`MLflowRun`, :class:`MLflowExtras`, :func:`local_tracking_uri`.
- :mod:`.images`: :class:`SampleTripletSaver`, :class:`PredictionOverlays` (:func:`overlay_image`),
  :class:`ReconstructionWriter`.
- :mod:`.evaluation`: :class:`SegmentationMetricsSaver` (the per-volume and mean tables).
"""

from .checkpointing import AtomicCheckpointSaver, AtomicDiskSaver, ValidationState
from .evaluation import SegmentationMetricsSaver
from .images import PredictionOverlays, ReconstructionWriter, SampleTripletSaver, overlay_image
from .resume import latest_checkpoint, prune_checkpoints, resume_checkpoint
from .tracking import close_tracking, MLflowExtras, MLflowRun, connect_tracking, local_tracking_uri

__all__ = [
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "ValidationState",
    "latest_checkpoint",
    "prune_checkpoints",
    "resume_checkpoint",
    "local_tracking_uri",
    "MLflowRun",
    "connect_tracking",
    "close_tracking",
    "MLflowExtras",
    "SampleTripletSaver",
    "PredictionOverlays",
    "overlay_image",
    "ReconstructionWriter",
    "SegmentationMetricsSaver",
]
