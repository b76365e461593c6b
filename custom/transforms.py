"""MONAI-style dictionary transforms for RETINA's reconstruction pretraining that MONAI lacks.

The reference pretraining (BaderLab/RETINA ``pretrainer.py``) builds its pipeline with
albumentations on uint8 images. The bundle configs compose MONAI's own transforms wherever
one computes the same thing (flips, rotation, brightness/contrast, coarse dropout,
normalisation) and use these where none does:

- :class:`RandResizedCropd`: random resized crop with area ``scale`` and aspect ``ratio``
  (albumentations/torchvision ``RandomResizedCrop``); MONAI's random crops have no
  scale/ratio sampling.
- :class:`RandGaussianNoiseVard`: additive Gaussian noise whose *variance* is drawn from a range
  given on another intensity scale (albumentations ``GaussNoise(var_limit=(400, 1200))`` on
  0-255 images); MONAI's ``RandGaussianNoise`` draws the standard deviation from ``[0, std]``.
- :class:`RandGaussianBlurd`: isotropic Gaussian blur with an odd kernel size drawn from a range
  and OpenCV's sigma-from-kernel rule, reflect-101 borders (albumentations ``GaussianBlur``);
  MONAI's ``RandGaussianSmooth`` draws sigma per axis and pads with zeros, which darkens the
  borders of small crops.
- :class:`FixedAugmentd`: runs a random transform with randomness fixed per item (seeded by the
  item's content), so a validation set sees the same degradation at every validation.
- :class:`ToLabelsd`: network outputs to label maps for a given ``num_classes`` (sigmoid and 0.5
  for one channel, softmax and argmax for several), the fine-tuning configs' one place for that switch.
- :class:`LabelledIndicesd`: for sparse labels, the crop-centre candidates of MONAI's
  ``RandCropByPosNegLabeld`` restricted to labelled voxels (its own ``label > 0`` would count
  the unlabelled value, e.g. 255, as foreground).

All work on channel-first 2D arrays ``(C, H, W)`` (numpy or torch) with intensities in [0, 1]
and return the input's array type.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    MapTransform,
    Randomizable,
    RandomizableTransform,
    SpatialPadd,
    Transform,
    map_binary_to_indices,
)
from monai.utils import convert_to_dst_type, convert_to_tensor
from monai.utils.misc import MAX_SEED

__all__ = ["RandResizedCropd", "RandGaussianNoiseVard", "RandGaussianBlurd", "FixedAugmentd", "ToLabelsd", "LabelledIndicesd", "PadForCropd", "opencv_sigma"]


def _as_float_tensor(img: Any) -> torch.Tensor:
    """A plain float32 torch tensor view/copy of ``img`` (no MONAI metadata)."""
    t = convert_to_tensor(img, track_meta=False)
    return t.float() if not torch.is_floating_point(t) else t


def _check_2d(img: Any, name: str) -> None:
    if len(img.shape) != 3:
        raise ValueError(f"{name} expects channel-first 2D arrays (C, H, W), got shape {tuple(img.shape)}")


class RandResizedCropd(RandomizableTransform, MapTransform):
    """Random resized crop: a random box of random area and aspect ratio, resized to ``spatial_size``.

    The box is drawn as albumentations' and torchvision's ``RandomResizedCrop`` draw it: up to
    ``max_attempts`` times, an area fraction ``s ~ U(scale)`` of the image and an aspect ratio
    ``r = w / h`` with ``log r ~ U(log ratio)`` give ``w = round(sqrt(s * A * r))``,
    ``h = round(sqrt(s * A / r))``; the first box that fits gets a uniform position. If none fits,
    the largest centred box with the ratio clamped to ``ratio`` is used. The same box is applied to
    every key. When the transform does not fire (``prob`` < 1) the whole image is resized, so the
    output size is always ``spatial_size``.

    Args:
        keys: keys of the (C, H, W) items to crop.
        spatial_size: output (H, W) (an int for a square).
        scale: range of the crop's area as a fraction of the image's area.
        ratio: range of the crop's aspect ratio width / height.
        prob: probability of cropping (the reference uses 1).
        mode: interpolation mode of ``torch.nn.functional.interpolate`` (``"bilinear"`` matches
            OpenCV's ``INTER_LINEAR`` used by the reference; ``"nearest"`` for label maps); one mode
            or one per key.
        antialias: low-pass before downsampling (the reference's OpenCV resize does not).
        max_attempts: box draws before the centred fallback.
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (0.5, 1.5),
        prob: float = 1.0,
        mode: str | Sequence[str] = "bilinear",
        antialias: bool = False,
        max_attempts: int = 10,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if isinstance(spatial_size, (int, np.integer)):
            spatial_size = (spatial_size, spatial_size)
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"spatial_size must be a positive int or (H, W), got {spatial_size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.spatial_size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.mode = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.mode) != len(self.keys):
            raise ValueError("mode must be one string or one per key")
        self.antialias = antialias
        self.max_attempts = max_attempts
        self.box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def randomize(self, img_size: Sequence[int]) -> None:
        """Draw the box ``(top, left, height, width)`` for an image of size ``img_size`` (H, W)."""
        super().randomize(None)
        height, width = int(img_size[0]), int(img_size[1])
        if not self._do_transform:
            self.box = (0, 0, height, width)
            return
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.max_attempts):
            target_area = self.R.uniform(*self.scale) * area
            aspect = math.exp(self.R.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(self.R.randint(0, height - h + 1))
                left = int(self.R.randint(0, width - w + 1))
                self.box = (top, left, h, w)
                return
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        self.box = ((height - h) // 2, (width - w) // 2, max(h, 1), max(w, 1))

    def _crop_resize(self, img: Any, mode: str) -> Any:
        top, left, h, w = self.box
        t = _as_float_tensor(img)[:, top : top + h, left : left + w]
        align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
        antialias = self.antialias and mode in ("bilinear", "bicubic")
        out = F.interpolate(t[None], size=self.spatial_size, mode=mode, align_corners=align, antialias=antialias)[0]
        return convert_to_dst_type(out, dst=img, dtype=torch.float32)[0]

    def __call__(self, data: Mapping[Hashable, Any], randomize: bool = True) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        _check_2d(d[first], type(self).__name__)
        if randomize:
            self.randomize(d[first].shape[1:])
        for key, mode in self.key_iterator(d, self.mode):
            _check_2d(d[key], type(self).__name__)
            d[key] = self._crop_resize(d[key], mode)
        return d


class RandGaussianNoiseVard(RandomizableTransform, MapTransform):
    """Add zero-mean Gaussian noise whose variance is drawn uniformly from ``var_range``.

    ``var_range`` is given on the scale ``intensity_scale`` (the reference's 400-1200 on 0-255
    images); for data in [0, 1] the noise standard deviation is ``sqrt(var) / intensity_scale``
    (so 20/255 to 34.6/255). One variance is drawn per call, the noise is independent per pixel
    and shared by all keys. The result is clipped to ``clip`` (the reference's uint8 images
    saturate at 0 and 255); ``clip=None`` keeps it unclipped.

    Args:
        keys: keys of the items to degrade.
        prob: probability of adding noise.
        var_range: (min, max) variance on the ``intensity_scale`` scale.
        intensity_scale: the intensity value that 1.0 of the data stands for (255 for 8-bit).
        clip: (low, high) to clip the result to, or None.
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        var_range: Sequence[float] = (400.0, 1200.0),
        intensity_scale: float = 255.0,
        clip: Sequence[float] | None = (0.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not (0 <= var_range[0] <= var_range[1]):
            raise ValueError(f"var_range must satisfy 0 <= min <= max, got {var_range}")
        self.var_range = (float(var_range[0]), float(var_range[1]))
        self.intensity_scale = float(intensity_scale)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.variance = 0.0
        self._noise: np.ndarray | None = None

    def randomize(self, shape: Sequence[int]) -> None:
        """Draw whether to fire, the variance and the noise field of ``shape``."""
        super().randomize(None)
        if not self._do_transform:
            self._noise = None
            return
        self.variance = float(self.R.uniform(*self.var_range))
        std = math.sqrt(self.variance) / self.intensity_scale
        self._noise = self.R.normal(0.0, std, size=tuple(shape)).astype(np.float32)

    def __call__(self, data: Mapping[Hashable, Any], randomize: bool = True) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        if randomize:
            self.randomize(d[first].shape)
        if not self._do_transform or self._noise is None:
            return d
        for key in self.key_iterator(d):
            t = _as_float_tensor(d[key])
            out = t + torch.as_tensor(self._noise, device=t.device)
            if self.clip is not None:
                out = out.clamp(*self.clip)
            d[key] = convert_to_dst_type(out, dst=d[key], dtype=torch.float32)[0]
        return d


def opencv_sigma(kernel_size: int) -> float:
    """OpenCV's Gaussian sigma for a kernel size when none is given: 0.3 * ((k - 1) / 2 - 1) + 0.8.

    Kernels 3, 5, 7 give sigma 0.8, 1.1, 1.4 (the reference calls ``GaussianBlur`` with sigma 0).
    """
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


class RandGaussianBlurd(RandomizableTransform, MapTransform):
    """Isotropic Gaussian blur with a random odd kernel size, as albumentations' ``GaussianBlur``.

    The kernel size is an integer drawn uniformly from ``kernel_size_range`` (inclusive), even
    values rounded up to the next odd size (down when that exceeds the range): for (3, 7) this
    gives 3, 5, 7 with probabilities 1/5, 2/5, 2/5, as the reference draws it. Sigma is drawn from
    ``sigma_range`` when given, else follows from the kernel size by :func:`opencv_sigma` (the
    reference: 0.8 / 1.1 / 1.4). The kernel is normalised and truncated to the kernel size, and the
    image is padded by reflection without repeating the edge (OpenCV's default border), so a blur
    leaves the mean intensity and the borders intact.

    Args:
        keys: keys of the items to blur.
        prob: probability of blurring.
        kernel_size_range: (min, max) kernel size, odd, >= 1.
        sigma_range: optional (min, max) sigma; None: from the kernel size.
        padding_mode: ``torch.nn.functional.pad`` mode (``"reflect"`` = OpenCV's BORDER_REFLECT_101).
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        kernel_size_range: Sequence[int] = (3, 7),
        sigma_range: Sequence[float] | None = None,
        padding_mode: str = "reflect",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        lo, hi = int(kernel_size_range[0]), int(kernel_size_range[1])
        if not (1 <= lo <= hi) or lo % 2 == 0 or hi % 2 == 0:
            raise ValueError(f"kernel_size_range must be odd sizes with 1 <= min <= max, got {kernel_size_range}")
        self.kernel_size_range = (lo, hi)
        self.sigma_range = None if sigma_range is None else (float(sigma_range[0]), float(sigma_range[1]))
        self.padding_mode = padding_mode
        self.kernel_size = lo
        self.sigma = opencv_sigma(lo)

    def randomize(self, data: Any = None) -> None:
        """Draw whether to fire, the kernel size and sigma."""
        super().randomize(None)
        if not self._do_transform:
            return
        lo, hi = self.kernel_size_range
        k = int(self.R.randint(lo, hi + 1))
        if k % 2 == 0:
            k = k + 1 if k + 1 <= hi else k - 1
        self.kernel_size = k
        self.sigma = float(self.R.uniform(*self.sigma_range)) if self.sigma_range else opencv_sigma(k)

    def _blur(self, img: Any) -> Any:
        t = _as_float_tensor(img)
        k, r = self.kernel_size, self.kernel_size // 2
        if k == 1:
            return img
        x = torch.arange(k, dtype=torch.float32, device=t.device) - r
        g = torch.exp(-(x**2) / (2 * self.sigma**2))
        g = g / g.sum()
        c = t.shape[0]
        out = F.pad(t[None], (r, r, r, r), mode=self.padding_mode)
        out = F.conv2d(out, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
        out = F.conv2d(out, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)[0]
        return convert_to_dst_type(out, dst=img, dtype=torch.float32)[0]

    def __call__(self, data: Mapping[Hashable, Any], randomize: bool = True) -> dict[Hashable, Any]:
        d = dict(data)
        if randomize:
            self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            _check_2d(d[key], type(self).__name__)
            d[key] = self._blur(d[key])
        return d


class FixedAugmentd(Transform):
    """Apply a random transform with randomness fixed per item: the same item gets the same draw.

    Before each call the wrapped transform's random state is seeded from ``seed`` and a CRC32 of
    the item's ``key`` array, so a validation set gets one fixed degradation per image at every
    validation, in any worker and in any order. As this wrapper is not ``Randomizable``, a
    ``CacheDataset`` caches its output. Calls are serialised by a lock (the wrapped transform is
    reseeded each time), so threads (e.g. ``CacheDataset``'s caching pool) get the same results.

    Args:
        transform: a callable on the item dict, typically a ``Compose`` of random transforms.
        key: the item key whose content seeds the draw.
        seed: base seed; change it to draw another fixed set.
    """

    def __init__(self, transform: Any, key: Hashable = "image", seed: int = 0) -> None:
        self.transform = transform
        self.key = key
        self.seed = int(seed)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock", None)  # locks don't pickle (data-loader workers under spawn)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def item_seed(self, data: Mapping[Hashable, Any]) -> int:
        """The seed of ``data``: ``seed`` plus the CRC32 of its ``key`` array, modulo MONAI's MAX_SEED."""
        arr = data[self.key]
        arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        return (zlib.crc32(np.ascontiguousarray(arr).tobytes()) + self.seed) % MAX_SEED

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        seed = self.item_seed(data)
        with self._lock:
            if isinstance(self.transform, Randomizable):
                self.transform.set_random_state(seed=seed)
            return self.transform(dict(data))


class ToLabelsd(Compose):
    """Network output ``(C, H, W[, D])`` -> label map ``(1, ...)`` for ``num_classes`` output channels.

    One channel (binary): sigmoid, then 1 where the probability exceeds 0.5; several: softmax, then the
    argmax. MONAI's ``Activationsd`` and ``AsDiscreted`` do the work; this picks their switches.

    Args:
        keys: the keys of the outputs (e.g. ``"pred"``).
        num_classes: the network's output channels.
        activation: False when the outputs are already probabilities (e.g. ``SliceWiseInferer``'s).
    """

    def __init__(self, keys: KeysCollection, num_classes: int, activation: bool = True) -> None:
        binary = int(num_classes) == 1
        steps = [AsDiscreted(keys, argmax=not binary, threshold=0.5 if binary else None)]
        if activation:
            steps.insert(0, Activationsd(keys, sigmoid=binary, softmax=not binary))
        super().__init__(steps)


class PadForCropd(Compose):
    """Pad images and labels to at least ``spatial_size`` (MONAI's ``SpatialPadd``): images with 0,
    labels with ``ignore_index`` when labels are sparse, else 0.

    Why not one ``SpatialPadd`` over both: with sparse labels a border padded with 0 would be trained
    as labelled background; padded with the ignore value it carries no loss, like any unlabelled voxel.

    Args:
        keys: the image key(s).
        label_keys: the label key(s), channel-first maps of class indices.
        spatial_size: the crop size the padding makes room for.
        ignore_index: the value of unlabelled voxels (e.g. 255), or None (every voxel labelled).
    """

    def __init__(self, keys: KeysCollection, label_keys: KeysCollection, spatial_size: Any,
                 ignore_index: int | None = None) -> None:
        fill = 0 if ignore_index is None else int(ignore_index)
        super().__init__([SpatialPadd(keys, spatial_size), SpatialPadd(label_keys, spatial_size, value=fill)])


class LabelledIndicesd(MapTransform):
    """Crop centres on labelled voxels only: ``<key>_fg_indices`` (labelled foreground: a class > 0) and
    ``<key>_bg_indices`` (labelled background: 0), flat indices for ``RandCropByPosNegLabeld``'s
    ``fg_indices_key`` / ``bg_indices_key``.

    With ``ignore_index=None`` (every voxel labelled) it adds nothing, so ``RandCropByPosNegLabeld`` computes
    its own indices exactly as without this transform. A label with no labelled voxel at all gets every voxel
    as a background candidate (its crops carry no loss; the slice is simply uninformative).

    Args:
        keys: the label key(s), channel-first ``(1, H, W[, D])`` maps of class indices.
        ignore_index: the value of unlabelled voxels (e.g. 255), or None.
    """

    def __init__(self, keys: KeysCollection, ignore_index: int | None = None) -> None:
        super().__init__(keys)
        self.ignore_index = ignore_index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.ignore_index is None:
            return d
        for key in self.key_iterator(d):
            label = convert_to_tensor(d[key], track_meta=False)
            labelled = label != self.ignore_index
            foreground = (label > 0) & labelled
            if not bool(labelled.any()):
                labelled = torch.ones_like(labelled)
            # MONAI's own split: foreground = labelled classes > 0, background = the rest of the labelled voxels
            fg, bg = map_binary_to_indices(foreground, image=labelled, image_threshold=0)
            d[f"{key}_fg_indices"], d[f"{key}_bg_indices"] = fg, bg
        return d
