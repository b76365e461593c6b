"""How any image dtype reaches the network: the dataset fingerprint and the mapping to [0, 1].

EM images come as uint8, 12- or 16-bit uint16, int32 (MRC, some HDF5) or float32 (already
scaled, or 0-255). Scaling by the dtype's range (uint16 / 65535) makes a 12-bit stack almost
constant, and MONAI's ``LoadImage`` turns uint16 into int32, whose range makes every voxel ~0.5.
So the mapping is chosen once, from the *values* of the training images, and then travels with
the model; training, evaluation and inference apply exactly the same numbers:

1. :func:`fingerprint`: dtype, min/max and 0.5/99.5 percentiles of a bounded sample of the
   training images (a few slices of at most ``max_files`` files: seconds, not minutes).
2. :func:`choose_range`: the value range ``[low, high]`` mapped linearly onto [0, 1] (clipped):

   ============== ==============================================================================
   ``"auto"``     uint8/int8/bool: the dtype's range (uint8 / 255, as the paper); floats already
                  within [0, 1]: as they are; anything else: ``"percentile"``
   ``"dtype"``    the dtype's full range (floats: [0, 1]); the project's behaviour before
   ``"range"``    the observed [min, max] of the sample
   ``"percentile"`` the sample's [0.5, 99.5] percentiles (robust to hot pixels and padding)
   ``[lo, hi]``   exactly these values
   ============== ==============================================================================

3. :func:`dataset_intensity`: the record ``{"mapping", "low", "high", "mean", "std",
   "fingerprint"}``; ``mean``/``std`` (for MONAI's ``NormalizeIntensity``) are measured on the
   mapped sample unless the user sets them.
4. :func:`attach` stores the record on the network, whose ``state_dict`` carries it
   (``TransUNet.get_extra_state``), so every checkpoint knows its input; :func:`from_checkpoint`
   reads it back for evaluation and inference. :class:`MapIntensityd` applies it (MONAI's
   ``ScaleIntensityRange``) and warns once per file whose dtype or range differs from it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange

from custom.utils import progress

__all__ = [
    "MAPPINGS",
    "fingerprint",
    "choose_range",
    "dataset_intensity",
    "attach",
    "from_checkpoint",
    "write_record",
    "as_params",
    "MapIntensityd",
]

logger = logging.getLogger(__name__)

MAPPINGS = ("auto", "dtype", "range", "percentile")
#: percentiles of the ``"percentile"`` mapping
PERCENTILES = (0.5, 99.5)
#: CEM500K statistics in [0, 1], used only for weights that carry no record of their own
CEM500K_MEAN, CEM500K_STD = 0.57287007, 0.12740536


def _paths(items: Sequence[Any], image_key: str) -> list[tuple[str, Optional[str]]]:
    """Distinct (path, HDF5 key) of the images named by dataset items, in order."""
    seen: dict[tuple[str, Optional[str]], None] = {}
    for item in items:
        if isinstance(item, Mapping):
            seen.setdefault((os.fspath(item[image_key]), item.get(f"{image_key}_key")), None)
        else:
            seen.setdefault((os.fspath(item), None), None)
    return list(seen)


def _evenly(n: int, k: int) -> list[int]:
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, num=min(n, k))})


def _sample_file(path: str, key: Optional[str], slices: int, max_pixels: int) -> tuple[np.ndarray, str]:
    from custom.io import em_shape, read_em_slice

    shape = em_shape(path, key, "image")
    indices = [-1] if len(shape) == 2 else _evenly(shape[0], slices)
    parts, dtype = [], None
    for z in indices:
        sl = read_em_slice(path, "xy", z, key, "image")
        dtype = dtype or str(sl.dtype)
        flat = sl.reshape(-1)
        step = max(1, flat.size // max_pixels)
        parts.append(flat[::step].astype(np.float64))
    return np.concatenate(parts), str(dtype)


def _sample(
    items: Sequence[Any], image_key: str = "image", max_files: int = 16, slices_per_file: int = 4,
    max_pixels: int = 2**16,
) -> tuple[np.ndarray, list[str]]:
    """Pixel values (float64) of a few xy slices of at most ``max_files`` images, and each file's dtype."""
    paths = _paths(items, image_key)
    if not paths:
        raise ValueError("no images to take an intensity fingerprint of")
    values, dtypes = [], []
    for i in progress(_evenly(len(paths), max_files), "intensity fingerprint"):
        v, dt = _sample_file(*paths[i], slices_per_file, max_pixels)
        values.append(v)
        dtypes.append(dt)
    return np.concatenate(values), dtypes


def _describe_sample(sample: np.ndarray, dtypes: list[str]) -> dict[str, Any]:
    lo, hi = np.percentile(sample, PERCENTILES)
    kinds = sorted(set(dtypes))
    if len(kinds) > 1:
        logger.warning("training images mix dtypes %s; one intensity mapping is used for all", kinds)
    return {
        "dtype": max(kinds, key=dtypes.count),
        "dtypes": kinds,
        "min": float(sample.min()),
        "max": float(sample.max()),
        "p0.5": float(lo),
        "p99.5": float(hi),
        "files": len(dtypes),
        "pixels": int(sample.size),
    }


def fingerprint(items: Sequence[Any], image_key: str = "image", **sample_kwargs: Any) -> dict[str, Any]:
    """Intensity statistics of a bounded sample of the images of ``items``.

    Args:
        items: dataset items (dicts with ``image_key``, optional ``"<key>_key"``) or paths.
        sample_kwargs: ``max_files`` files sampled (evenly over the list, 16), ``slices_per_file``
            xy slices per volume (4), ``max_pixels`` pixels kept per slice (a regular stride, 65536).

    Returns:
        ``{"dtype", "dtypes", "min", "max", "p0.5", "p99.5", "files", "pixels"}`` (JSON-ready).
    """
    return _describe_sample(*_sample(items, image_key, **sample_kwargs))


def _dtype_range(dtype: str) -> tuple[float, float]:
    dt = np.dtype(dtype)
    if dt == bool:
        return 0.0, 1.0
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def choose_range(fp: Mapping[str, Any], mapping: Union[str, Sequence[float]] = "auto") -> tuple[float, float, str]:
    """``(low, high, how)``: the values mapped to 0 and 1, and the rule that chose them (see the module doc)."""
    if not isinstance(mapping, str):
        low, high = (float(v) for v in mapping)
        how = "fixed"
    else:
        if mapping not in MAPPINGS:
            raise ValueError(f"intensity mapping must be one of {MAPPINGS} or [low, high], got {mapping!r}")
        how = mapping
        dt = np.dtype(fp["dtype"])
        if how == "auto":
            small_int = dt == bool or (np.issubdtype(dt, np.integer) and dt.itemsize == 1)
            unit_float = np.issubdtype(dt, np.floating) and fp["min"] >= 0.0 and fp["max"] <= 1.0
            how = "dtype" if small_int or unit_float else "percentile"
        if how == "dtype":
            low, high = _dtype_range(fp["dtype"])
        elif how == "range":
            low, high = fp["min"], fp["max"]
        else:
            low, high = fp["p0.5"], fp["p99.5"]
            if high <= low:  # a sample that is constant inside its percentiles: fall back to its full range
                low, high = fp["min"], fp["max"]
    if not high > low:
        raise ValueError(
            f"intensity range [{low:g}, {high:g}] is empty: the sampled images are constant ({fp['dtype']}, "
            f"value {low:g}); check the images or set intensity_mapping to [low, high]"
            if fp.get("dtype") else f"intensity range [{low:g}, {high:g}] is empty; set [low, high] with low < high"
        )
    return float(low), float(high), how


def _mapped(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def dataset_intensity(
    items: Sequence[Any],
    mapping: Union[str, Sequence[float]] = "auto",
    mean: Optional[float] = None,
    std: Optional[float] = None,
    image_key: str = "image",
    **sample_kwargs: Any,
) -> dict[str, Any]:
    """The intensity record of a training set: fingerprint, ``[low, high]`` -> [0, 1], mean/std after it.

    ``mean``/``std`` given by the user are kept; otherwise they are measured on the mapped sample.
    With a fixed ``[low, high]`` mapping and both ``mean`` and ``std`` given nothing is read (the record
    then has no fingerprint). Logs one line saying what was chosen.

    Raises:
        custom.errors.ConfigError: the mapping is unknown, or the images are constant under it.
    """
    from custom.errors import ConfigError

    fixed = not isinstance(mapping, str) and mean is not None and std is not None
    sample, dtypes = (None, []) if fixed else _sample(items, image_key, **sample_kwargs)  # all set: read nothing
    fp = None if sample is None else _describe_sample(sample, dtypes)
    try:
        low, high, how = choose_range(fp or {}, mapping)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"intensity_mapping: {e}") from None
    if sample is not None:
        unit = _mapped(sample, low, high)
        mean = float(unit.mean()) if mean is None else float(mean)
        std = float(unit.std()) if std is None else float(std)
    if not std > 1e-6:
        raise ConfigError(
            f"intensity_std: the images are constant after mapping [{low:g}, {high:g}] -> [0, 1] (std {std:g}); "
            "check intensity_mapping or set intensity_mean/intensity_std"
        )
    record = {"mapping": how, "low": low, "high": high, "mean": mean, "std": std, "fingerprint": fp}
    logger.info("[retina] intensity: %s", describe(record))
    return record


def describe(record: Mapping[str, Any]) -> str:
    """One line: what the images are and how they reach the network."""
    fp = record.get("fingerprint") or {}
    seen = (f"{fp.get('dtype')} images (sample of {fp.get('files')} file(s): min {fp.get('min'):g}, "
            f"p0.5 {fp.get('p0.5'):g}, p99.5 {fp.get('p99.5'):g}, max {fp.get('max'):g}); ") if fp else ""
    return (f"{seen}{record['mapping']} mapping [{record['low']:g}, {record['high']:g}] -> [0, 1], "
            f"then (x - {record['mean']:.4f}) / {record['std']:.4f}")


def attach(network: torch.nn.Module, record: Mapping[str, Any]) -> torch.nn.Module:
    """Store ``record`` on ``network`` (``input_intensity``), so its state dict and checkpoints carry it."""
    target = getattr(network, "module", network)  # DDP
    target.input_intensity = dict(record)
    return network


def from_checkpoint(
    path: Union[str, os.PathLike, None], mean: Optional[float] = None, std: Optional[float] = None
) -> dict[str, Any]:
    """The intensity record stored in a checkpoint (ours, plain or wrapped), ``mean``/``std`` overriding.

    Weights without a record (the authors' releases, older checkpoints) get ``{"mapping": "per-image"}``
    with the CEM500K mean/std: :class:`MapIntensityd` then maps each input by its own percentiles,
    with one warning.
    """
    from custom.checkpoints import read_checkpoint_meta

    record = None
    if path and os.path.isfile(os.fspath(path)):
        record = read_checkpoint_meta(path).get("input_intensity")
    if record is None:
        record = {"mapping": "per-image", "low": None, "high": None, "mean": CEM500K_MEAN, "std": CEM500K_STD}
        if path:
            logger.warning("%s: the weights record no intensity mapping; each input is mapped by its own "
                           "0.5/99.5 percentiles (uint8: / 255)", os.fspath(path))
    if mean is not None:
        record["mean"] = float(mean)
    if std is not None:
        record["std"] = float(std)
    return record


def write_record(path: Union[str, os.PathLike], record: Mapping[str, Any]) -> str:
    """Write ``record`` as the ``network_data_format.inputs.image`` entry of a bundle's metadata.json."""
    from custom.utils import atomic_path

    entry = {
        "network_data_format": {
            "inputs": {
                "image": {
                    "value_range": [record["low"], record["high"]],
                    "dtype": (record.get("fingerprint") or {}).get("dtype"),
                    "intensity_mapping": record["mapping"],
                    "normalization": {"mean": record["mean"], "std": record["std"]},
                    "fingerprint": record.get("fingerprint"),
                }
            }
        }
    }
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(entry, f, indent=2)
    return path


def as_params(record: Mapping[str, Any]) -> dict[str, Any]:
    """Flat MLflow parameters of a record: ``intensity_mapping``, ``intensity_low`` ... ``image_dtype``."""
    fp = record.get("fingerprint") or {}
    return {
        "intensity_mapping": record["mapping"],
        "intensity_low": record["low"],
        "intensity_high": record["high"],
        "intensity_mean": record["mean"],
        "intensity_std": record["std"],
        "image_dtype": fp.get("dtype"),
        "image_p0.5": fp.get("p0.5"),
        "image_p99.5": fp.get("p99.5"),
    }


class MapIntensityd(MapTransform):
    """Map image values ``[low, high]`` of an intensity record onto [0, 1] (clipped), float32.

    The arithmetic is MONAI's ``ScaleIntensityRange``. Works on the raw values, so MONAI's
    uint16 -> int32 conversion on loading changes nothing. Warns once per file (meta
    ``filename_or_obj``) whose dtype (meta ``em_dtype``, set by ``custom.io.EMReader``) or
    0.5/99.5 percentile range differs from the record's fingerprint. A record with
    ``"mapping": "per-image"`` (weights without a record) maps each image by its own percentiles
    (uint8 and bool: the dtype range).
    """

    def __init__(self, keys: KeysCollection, intensity: Mapping[str, Any], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.record = dict(intensity)
        self._warned: set = set()

    def _scaler(self, img: Any) -> ScaleIntensityRange:
        low, high = self.record.get("low"), self.record.get("high")
        if low is None or high is None:  # weights without a record: this image's own range
            values = _values(img)
            dtype = str(_meta(img).get("em_dtype") or str(getattr(img, "dtype", values.dtype)).replace("torch.", ""))
            fp = {"dtype": dtype, "min": float(values.min()), "max": float(values.max()),
                  **dict(zip(("p0.5", "p99.5"), (float(v) for v in np.percentile(values, PERCENTILES))))}
            low, high, _ = choose_range(fp, "auto")
        return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)

    def _check(self, img: Any) -> None:
        """Warn once per file read by ``EMReader`` (evaluation, inference) unlike the training images."""
        fp, meta = self.record.get("fingerprint"), _meta(img)
        name, dtype = str(meta.get("filename_or_obj", "")), meta.get("em_dtype")
        if not fp or not dtype or name in self._warned:
            return
        problems = []
        if dtype != fp["dtype"]:
            problems.append(f"dtype {dtype}, the model was trained on {fp['dtype']}")
        lo, hi = np.percentile(_values(img), PERCENTILES)
        span = fp["p99.5"] - fp["p0.5"]
        centre = fp["p0.5"] + 0.5 * span
        if span > 0 and not (lo <= centre <= hi and 0.25 * span <= hi - lo <= 4 * span):
            problems.append(f"values {lo:g}..{hi:g} (p0.5..p99.5), the training images' {fp['p0.5']:g}..{fp['p99.5']:g}")
        if problems:
            self._warned.add(name)
            logger.warning("%s: %s; mapped as the training images were ([%g, %g] -> [0, 1])",
                           name, "; ".join(problems), self.record["low"], self.record["high"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            self._check(img)
            d[key] = self._scaler(img)(img)
        return d


def _values(img: Any, max_pixels: int = 2**20) -> np.ndarray:
    """A strided float64 sample of an image's values (for percentiles)."""
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    flat = arr.reshape(-1)
    return flat[:: max(1, flat.size // max_pixels)].astype(np.float64)


def _meta(img: Any) -> Mapping:
    meta = getattr(img, "meta", None)
    return meta if isinstance(meta, Mapping) else {}
