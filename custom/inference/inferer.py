"""Slice-wise probabilities of the 2D network over a 2D image or a 3D volume (one plane, or three averaged)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Callable, Optional, Union

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep

from ..networks import autocast_dtype, prepare_for_inference
from ..utils import PLANE_AXIS, plane_list

__all__ = ["SliceWiseInferer", "WindowRunner"]

logger = logging.getLogger(__name__)


class WindowRunner:
    """The network as the sliding window calls it: windows ``(N, C, h, w)`` -> fp32 logits ``(N, K, h, w)``.

    Runs under ``torch.inference_mode`` with the autocast dtype (``None``: fp32) and, with
    ``channels_last``, the windows in channels-last layout (the layout the prepared network's weights have).
    ``count(n)`` is told the number of windows of each call. ``autocast(device_type)`` is the autocast
    context of the calls, to be entered also around many calls (its weight casts are then cached).
    """

    def __init__(self, network: Callable[..., torch.Tensor], dtype: Optional[torch.dtype], channels_last: bool,
                 count: Optional[Callable[[int], None]] = None):
        self.network = network
        self.dtype = dtype
        self.channels_last = channels_last
        self.count = count

    def autocast(self, device_type: str):
        """``torch.autocast`` in the runner's dtype on ``device_type``, or a no-op context for fp32."""
        return torch.autocast(device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.count is not None:
            self.count(int(x.shape[0]))
        with torch.inference_mode(), self.autocast(x.device.type):
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.network(x, *args, **kwargs)
        # a normal fp32 tensor: MONAI's blending scales it in place, which an inference tensor refuses
        return y.to(torch.float32, copy=True)


class SliceWiseInferer(Inferer):
    """Probabilities of a 2D segmentation network over a 2D image or, slice by slice, a 3D volume.

    Args:
        roi_size: sliding-window size within a slice (int or (H, W)); the paper uses 224. Larger
            windows work (the network interpolates its position embeddings).
        sw_batch_size: windows per network call (windows of neighbouring slices share a batch; windows
            shrunk by ``fit_roi`` come proportionally more to a call).
        overlap: window overlap within a slice (paper: 0.7 for 3D, 0.5 for 2D).
        planes: ``"xy"``, ``"orthoplane"`` or a list of ``"xy"``/``"xz"``/``"yz"``; volumes are
            ``(Z, Y, X)``, so xy slices run along the first spatial axis.
        activation: ``"auto"`` (sigmoid for one output channel, else softmax), ``"sigmoid"``,
            ``"softmax"`` or ``"none"`` (raw logits; only meaningful with a single plane).
        mode: window blending, ``"constant"`` or ``"gaussian"`` (MONAI's ``BlendMode``; gaussian
            down-weights window borders, so a lower overlap suffices).
        padding_mode, cval: how slices smaller than the window are padded (before normalisation
            the pad value 0 is the dataset mean).
        sw_device, device: where windows run and where the whole-volume output is kept (MONAI's
            meaning; ``device="cpu"`` keeps big volumes out of GPU memory).
        progress: show a progress bar per plane.
        precision: autocast of the network, ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA) or ``"auto"``
            (bf16 where the device has it natively, else fp32: ``custom.networks.autocast_dtype``).
        channels_last: run the network in channels-last memory layout (faster convolutions on CPUs).
        compile: ``torch.compile`` the network once (the first call pays the compilation).
        fold: fold the weight standardisation once per call when the network is in eval mode
            (exact; ``custom.networks.prepare_for_inference``).
        fit_roi: shrink the window along a slice axis shorter than ``roi_size`` to that length rounded
            up to a multiple of 16, instead of padding it to the full window (the xz/yz slices of a
            volume with fewer sections than the window: orthoplane then costs about 3x xy, not more).

    Every network call runs under ``torch.inference_mode``; the blended output is fp32. ``windows``
    counts the windows run so far (model FLOPs = windows x FLOPs of one window).
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
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        fold: bool = True,
        fit_roi: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ("auto", "sigmoid", "softmax", "none"):
            raise ValueError(f"activation must be auto, sigmoid, softmax or none, got {activation!r}")
        self.roi_size = tuple(int(r) for r in ensure_tuple_rep(roi_size, 2))
        self.planes = plane_list(planes)
        if activation == "none" and len(self.planes) > 1:
            raise ValueError("averaging several planes needs probabilities: use activation 'auto'")
        autocast_dtype(precision)  # refuse an unknown precision now, not at the first volume
        self.activation = activation
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.fold = bool(fold)
        self.fit_roi = bool(fit_roi)
        self._compiled: Optional[tuple] = None  # (weakref to the network, its compiled wrapper)
        self.windows = 0
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

    def _roi(self, slice_shape: Sequence[int]) -> tuple:
        """The window for slices of ``slice_shape`` (H, W): ``roi_size``, or with ``fit_roi`` no longer than needed."""
        if not self.fit_roi:
            return self.roi_size
        return tuple(min(r, -(-int(n) // 16) * 16) for r, n in zip(self.roi_size, slice_shape))

    def _prepared(self, network: Callable[..., torch.Tensor], dtype: Optional[torch.dtype]) -> Callable[..., torch.Tensor]:
        """The network folded (eval mode only: a training network is left alone), laid out and compiled."""
        if not isinstance(network, torch.nn.Module) or network.training:
            return network
        if self._compiled is not None and self._compiled[0]() is network:
            prepare_for_inference(network, self.channels_last, compile=False, fold=self.fold, dtype=dtype)  # refold
            return self._compiled[1]
        prepared = prepare_for_inference(network, self.channels_last, compile=self.compile, fold=self.fold, dtype=dtype)
        if self.compile:
            self._compiled = (weakref.ref(network), prepared)
        return prepared

    def runner(self, network: Callable[..., torch.Tensor], device: Union[torch.device, str, None]) -> WindowRunner:
        """What the sliding window calls for ``network`` on ``device`` (prepared, autocast, inference mode)."""
        dev = torch.device(self.window["sw_device"] or device or "cpu")
        dtype = autocast_dtype(self.precision, dev)
        return WindowRunner(self._prepared(network, dtype), dtype, self.channels_last, count=self._count)

    def _settings(self, roi: tuple) -> dict:
        """The sliding-window settings for windows of ``roi``: a window smaller than ``roi_size`` (``fit_roi``)
        gets a proportionally larger batch, so a network call holds about as many pixels (thin xz/yz slices
        would otherwise cost one small call each)."""
        scale = (self.roi_size[0] * self.roi_size[1]) // max(1, roi[0] * roi[1])
        batch = self.window["sw_batch_size"] * max(1, scale)
        return dict(self.window, roi_size=roi, sw_batch_size=batch)

    def _count(self, n: int) -> None:
        self.windows += n

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``inputs`` ``(B, C, H, W)`` or ``(B, C, Z, Y, X)`` -> probabilities ``(B, classes, same spatial)``."""
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        spatial = x.ndim - 2
        if spatial not in (2, 3):
            raise ValueError(f"expected a (B, C, H, W) image or a (B, C, Z, Y, X) volume, got shape {tuple(x.shape)}")
        run = self.runner(network, x.device)
        # one autocast context for the whole input: autocast caches its casts of the weights until the
        # outermost context exits, so they are cast once, not at every network call
        with run.autocast(torch.device(self.window["sw_device"] or x.device).type):
            if spatial == 2:
                inferer = SlidingWindowInferer(**self._settings(self._roi(x.shape[2:])))
                return self._activate(inferer(x, run, *args, **kwargs))
            total: Optional[torch.Tensor] = None
            for plane in self.planes:
                axis = PLANE_AXIS[plane]
                in_slice = [n for i, n in enumerate(x.shape[2:]) if i != axis]
                inferer = SliceInferer(spatial_dim=axis, **self._settings(self._roi(in_slice)))
                probs = self._activate(inferer(x, run, *args, **kwargs))
                total = probs if total is None else total.add_(probs.to(total.device))
        assert total is not None
        return total / len(self.planes) if len(self.planes) > 1 else total
