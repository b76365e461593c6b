"""Slice-wise inference of the 2D RETINA network over 2D images and 3D volumes, and writing the results.

- :class:`SliceWiseInferer`: a MONAI ``Inferer`` returning class *probabilities*. A 2D input
  ``(B, C, H, W)`` goes through MONAI's ``SlidingWindowInferer``; a volume ``(B, C, Z, Y, X)``
  through MONAI's ``SliceInferer`` (2D windows within each slice, windows of several slices
  batched together) along one or three axes: ``planes="xy"`` (anisotropic data, the default) or
  ``"orthoplane"`` (xy, xz and yz probabilities averaged, for isotropic data).
  Binary (one output channel): sigmoid; multi-class: softmax. Post-processing then thresholds
  at 0.5 or takes the argmax (``AsDiscreted`` in the bundle configs).
- :class:`VolumePredictor`: the inference "engine" of ``inference.json``: plans every output
  first (:func:`plan_outputs`), then runs a dataset of volumes through pre-processing, the
  inferer and post-processing and writes each label volume with :func:`custom.io.write_em` in
  the input's geometry and, by default, its format. A failing volume is reported and skipped;
  the others are still written; at the end a :class:`InferenceError` names the failures (so
  ``monai.bundle run`` exits non-zero). It runs as an Ignite engine, so MONAI's handlers (the
  ``MLFlowHandler`` of ``--tracking mlflow``) attach to it.
- :func:`list_inputs` (which files a ``--input`` names; a folder of 2D slices is one volume when
  its layout says so, :func:`slice_stack`), :func:`output_path` (where each result goes: the
  input's sub-folder below ``--input`` is kept under ``output_dir``), :func:`plan_outputs` and
  :func:`check_outputs` (no output may land on an input, on another output or, unless
  ``overwrite``, on an existing file: refused with one :class:`custom.errors.OutputError` line
  before the first volume is processed).
"""

from ..errors import InferenceError
from .inferer import SliceWiseInferer
from .inputs import list_inputs, slice_stack
from .outputs import (
    OUTPUT_EXTS,
    check_outputs,
    input_subfolder,
    output_path,
    plan_outputs,
)
from .predictor import VolumePredictor

__all__ = [
    "SliceWiseInferer",
    "VolumePredictor",
    "InferenceError",
    "list_inputs",
    "slice_stack",
    "output_path",
    "input_subfolder",
    "plan_outputs",
    "check_outputs",
    "OUTPUT_EXTS",
]
