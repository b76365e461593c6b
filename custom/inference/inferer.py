"""Slice-wise probabilities of the 2D network over a 2D image or a 3D volume (one plane, or three averaged)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, Union

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep

from ..utils import PLANE_AXIS, plane_list

__all__ = ["SliceWiseInferer"]

logger = logging.getLogger(__name__)


class SliceWiseInferer(Inferer):
    """Probabilities of a 2D segmentation network over a 2D image or, slice by slice, a 3D volume.

    Args:
        roi_size: sliding-window size within a slice (int or (H, W)); the paper uses 224.
        sw_batch_size: windows per network call (windows of neighbouring slices share a batch).
        overlap: window overlap within a slice (paper: 0.7 for 3D, 0.5 for 2D).
        planes: ``"xy"``, ``"orthoplane"`` or a list of ``"xy"``/``"xz"``/``"yz"``; volumes are
            ``(Z, Y, X)``, so xy slices run along the first spatial axis.
        activation: ``"auto"`` (sigmoid for one output channel, else softmax), ``"sigmoid"``,
            ``"softmax"`` or ``"none"`` (raw logits; only meaningful with a single plane).
        mode: window blending, ``"constant"`` or ``"gaussian"`` (MONAI's ``BlendMode``).
        padding_mode, cval: how slices smaller than the window are padded (before normalisation
            the pad value 0 is the dataset mean).
        sw_device, device: where windows run and where the whole-volume output is kept (MONAI's
            meaning; ``device="cpu"`` keeps big volumes out of GPU memory).
        progress: show a progress bar per plane.
    """

    def __init__(
        self,
        roi_size: Union[int, Sequence[int]] = 224,
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        planes: Union[str, Sequence[str]] = "xy",
        activation: str = "auto",
        mode: str = "constant",
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: Union[torch.device, str, None] = None,
        device: Union[torch.device, str, None] = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ("auto", "sigmoid", "softmax", "none"):
            raise ValueError(f"activation must be auto, sigmoid, softmax or none, got {activation!r}")
        self.roi_size = tuple(int(r) for r in ensure_tuple_rep(roi_size, 2))
        self.planes = plane_list(planes)
        if activation == "none" and len(self.planes) > 1:
            raise ValueError("averaging several planes needs probabilities: use activation 'auto'")
        self.activation = activation
        self.window = dict(
            sw_batch_size=int(sw_batch_size),
            overlap=float(overlap),
            mode=mode,
            padding_mode=padding_mode,
            cval=float(cval),
            sw_device=sw_device,
            device=device,
            progress=progress,
        )

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        act = self.activation
        if act == "auto":
            act = "sigmoid" if logits.shape[1] == 1 else "softmax"
        if act == "sigmoid":
            return torch.sigmoid(logits)
        if act == "softmax":
            return torch.softmax(logits, dim=1)
        return logits

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``inputs`` ``(B, C, H, W)`` or ``(B, C, Z, Y, X)`` -> probabilities ``(B, classes, same spatial)``."""
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        spatial = x.ndim - 2
        if spatial == 2:
            inferer = SlidingWindowInferer(roi_size=self.roi_size, **self.window)
            return self._activate(inferer(x, network, *args, **kwargs))
        if spatial != 3:
            raise ValueError(f"expected a (B, C, H, W) image or a (B, C, Z, Y, X) volume, got shape {tuple(x.shape)}")
        total: Optional[torch.Tensor] = None
        for plane in self.planes:
            inferer = SliceInferer(spatial_dim=PLANE_AXIS[plane], roi_size=self.roi_size, **self.window)
            probs = self._activate(inferer(x, network, *args, **kwargs))
            total = probs if total is None else total.add_(probs.to(total.device))
        assert total is not None
        return total / len(self.planes) if len(self.planes) > 1 else total


# --------------------------------------------------------------------------------------
# which inputs
# --------------------------------------------------------------------------------------
#: a slice file name: anything, a number, no digit after it (``s12.png``, ``slice_0001_em.tif``)
