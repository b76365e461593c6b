"""Slice-wise inference of the 2D RETINA network over 2D images and 3D volumes, and writing the results.

- :class:`SliceWiseInferer`: a MONAI ``Inferer`` returning class *probabilities*. A 2D input
  ``(B, C, H, W)`` goes through MONAI's ``SlidingWindowInferer``; a volume ``(B, C, Z, Y, X)``
  through MONAI's ``SliceInferer`` (2D windows within each slice, windows of several slices
  batched together) along one or three axes: ``planes="xy"`` (anisotropic data, the default) or
  ``"orthoplane"`` (xy, xz and yz probabilities averaged, for isotropic data).
  Binary (one output channel): sigmoid; multi-class: softmax. Post-processing then thresholds
  at 0.5 or takes the argmax (``AsDiscreted`` in the bundle configs).
- :class:`VolumePredictor`: the inference "engine" of ``inference.json``: runs a dataset of
  volumes through pre-processing, the inferer and post-processing and writes each label volume
  with :func:`custom.data.write_em` in the input's geometry and, by default, its format. A
  failing volume is reported and skipped; the others are still written; at the end a
  :class:`InferenceError` names the failures (so ``monai.bundle run`` exits non-zero).
- :func:`list_inputs` and :func:`output_path`: which files a ``--input`` names and where
  each result goes.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep

from .data import PLANES, em_format, find_em_files, write_em
from .errors import describe

__all__ = ["SliceWiseInferer", "VolumePredictor", "InferenceError", "list_inputs", "output_path", "plane_list"]

logger = logging.getLogger(__name__)

#: plane -> spatial axis of a (Z, Y, X) volume that the slices are taken along
PLANE_AXIS = {"xy": 0, "xz": 1, "yz": 2}


class InferenceError(RuntimeError):
    """Some inputs could not be processed (the message lists them, one per line)."""


def plane_list(planes: Union[str, Sequence[str]]) -> List[str]:
    """``"xy"`` -> ``["xy"]``; ``"orthoplane"`` -> ``["xy", "xz", "yz"]``; a list of plane names as is."""
    if isinstance(planes, str):
        planes = list(PLANES) if planes in ("orthoplane", "all") else [planes]
    out = list(planes)
    bad = [p for p in out if p not in PLANE_AXIS]
    if bad or not out:
        raise ValueError(f"planes must be 'xy', 'xz', 'yz', 'orthoplane' or a list of those, got {planes!r}")
    return out


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


def list_inputs(path: Union[str, os.PathLike], slices_as_volume: bool = False) -> List[str]:
    """The inputs that ``path`` names: a file -> itself; a folder -> every EM file below it
    (:func:`custom.data.find_em_files`), or the folder itself as one volume of per-slice images when
    ``slices_as_volume``."""
    path = os.fspath(path)
    if os.path.isdir(path) and slices_as_volume:
        return [path]
    return find_em_files(path)


_SAME_EXT = {"tiff": ".tif", "pil": ".png", "hdf5": ".h5", "nifti": ".nii.gz", "nrrd": ".nrrd", "mrc": ".mrc", "dir": ""}


def output_path(input_path: str, output_dir: str, output_ext: str = "", postfix: str = "seg") -> str:
    """``<output_dir>/<input stem>_<postfix><ext>``; ``ext`` from ``output_ext`` or, when empty, the input's
    format (TIFF -> .tif, PNG/JPEG -> .png, HDF5 -> .h5, NIfTI -> .nii.gz, NRRD, MRC; a folder of slices ->
    a folder of PNG slices)."""
    name = os.path.basename(os.fspath(input_path).rstrip("/\\"))
    fmt = em_format(input_path)
    if name.lower().endswith(".nii.gz"):
        stem = name[:-7]
    elif fmt not in (None, "dir"):
        stem = os.path.splitext(name)[0]
    else:
        stem = name
    ext = output_ext if output_ext else _SAME_EXT.get(fmt or "", ".tif")
    if ext and not ext.startswith("."):
        ext = "." + ext
    return os.path.join(output_dir, f"{stem}_{postfix}{ext}" if postfix else f"{stem}{ext}")


def _probability_path(label_path: str, k: Optional[int]) -> str:
    base = label_path
    for ext in (".nii.gz", ".tif", ".png", ".h5", ".nrrd", ".mrc"):
        if base.lower().endswith(ext):
            base, keep = base[: -len(ext)], ext
            break
    else:
        keep = ""
    keep = ".tif" if keep in ("", ".png") else keep
    return f"{base}_prob{'' if k is None else k}{keep}"


class VolumePredictor:
    """Predict and write every item of ``dataset``; one failure does not stop the others.

    Per item: ``dataset[i]`` (loading + pre-processing), ``inferer(image[None], network)``
    (probabilities), ``postprocessing({"image", "pred"})`` (label map ``(1, ...)``), then
    :func:`custom.data.write_em` to :func:`output_path` with the input as reference (NIfTI affine /
    NRRD space copied). Progress goes to the log and stdout.

    Args:
        dataset: a MONAI ``Dataset`` whose ``data`` are dicts with ``image_key`` paths.
        network, inferer, postprocessing: as in MONAI's evaluators.
        output_dir: where results go (created).
        output_ext: output format suffix (``.tif``, ``.nii.gz``, ``.h5``, ``.nrrd``, ``.png``); empty: the input's.
        output_postfix: appended to the input's stem.
        output_dtype: numpy dtype of the label volumes.
        save_probabilities: also write float32 probabilities (foreground for binary, one file per
            class otherwise; TIFF for PNG inputs).
        device: where the network runs.
        val_handlers: accepted so that MONAI's ``--tracking`` option can patch this engine; unused.
    """

    def __init__(
        self,
        dataset: Any,
        network: torch.nn.Module,
        inferer: Inferer,
        postprocessing: Optional[Callable] = None,
        output_dir: str = "outputs",
        output_ext: str = "",
        output_postfix: str = "seg",
        output_dtype: Any = "uint8",
        save_probabilities: bool = False,
        device: Union[torch.device, str, None] = None,
        image_key: str = "image",
        pred_key: str = "pred",
        val_handlers: Optional[Sequence] = None,
    ) -> None:
        self.dataset = dataset
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.output_dir = output_dir
        self.output_ext = output_ext
        self.output_postfix = output_postfix
        self.output_dtype = np.dtype(output_dtype)
        self.save_probabilities = save_probabilities
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.image_key, self.pred_key = image_key, pred_key
        if val_handlers:
            logger.warning("VolumePredictor ignores %d handler(s): it is not an Ignite engine", len(val_handlers))
        self.written: List[str] = []
        self.failed: List[tuple] = []

    def _source(self, i: int) -> str:
        item = self.dataset.data[i]
        return os.fspath(item[self.image_key] if isinstance(item, dict) else item)

    def predict(self, i: int) -> List[str]:
        """Process item ``i``; returns the written paths (raises on any problem)."""
        src = self._source(i)
        data = self.dataset[i]
        image = torch.as_tensor(data[self.image_key])
        with torch.no_grad():
            probs = self.inferer(image[None].to(self.device), self.network)[0]
        data = dict(data)
        data[self.pred_key] = probs
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        labels = torch.as_tensor(data[self.pred_key]).detach().cpu()
        if labels.ndim == image.ndim:  # channel-first (1, ...)
            labels = labels[0]
        if tuple(labels.shape) != tuple(image.shape[1:]):
            raise InferenceError(f"{src}: prediction shape {tuple(labels.shape)} differs from input {tuple(image.shape[1:])}")
        dst = output_path(src, self.output_dir, self.output_ext, self.output_postfix)
        written = [write_em(dst, labels.numpy().astype(self.output_dtype), reference=src)]
        if self.save_probabilities:
            p = probs.detach().cpu().float().numpy()
            if p.shape[0] == 1:
                written.append(write_em(_probability_path(dst, None), p[0], reference=src))
            else:
                written += [write_em(_probability_path(dst, k), p[k], reference=src) for k in range(p.shape[0])]
        return written

    def run(self) -> List[str]:
        """Predict every item; raises :class:`InferenceError` at the end if any failed."""
        os.makedirs(self.output_dir, exist_ok=True)
        self.network.eval()
        n = len(self.dataset)
        self.written, self.failed = [], []
        for i in range(n):
            start = time.time()
            src = self._source(i)
            try:
                paths = self.predict(i)
            except Exception as err:  # report, keep going with the other volumes
                msg = describe(err)  # the file's problem, not MONAI's "applying transform" wrapper
                msg = msg[len(src) + 2:] if msg.startswith(f"{src}: ") else msg  # the path is printed once
                self.failed.append((src, msg))
                logger.error("[%d/%d] %s: FAILED: %s", i + 1, n, src, msg)
                print(f"[retina] [{i + 1}/{n}] {src}: FAILED: {msg}", flush=True)
                continue
            self.written += paths
            print(f"[retina] [{i + 1}/{n}] {src} -> {paths[0]} ({time.time() - start:.1f} s)", flush=True)
        if self.failed:
            lines = "\n".join(f"  {src}: {msg}" for src, msg in self.failed)
            raise InferenceError(f"{len(self.failed)} of {n} input(s) failed ({n - len(self.failed)} written):\n{lines}")
        print(f"[retina] wrote {len(self.written)} file(s) to {self.output_dir}", flush=True)
        return self.written
