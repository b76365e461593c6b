"""Dataset intensity mean and standard deviation for the fine-tuning bundle's normalisation.

The RETINA recipe normalises each dataset with its own mean and std of intensities scaled to
[0, 1] by dtype (uint8 / 255, uint16 / 65535; ``custom.io.to_unit_range``). This reads every
2D image and 3D volume under a folder (or one file) and prints the values as bundle overrides::

    python scripts/compute_mean_std.py /data/mito/train/images
    # -> --intensity_mean 0.5541 --intensity_std 0.1576   (pass them to monai.bundle run)

Volumes are read slice by slice (``--max_slices`` caps the xy slices taken per volume, evenly
spaced), so memory stays at one slice. Sums are accumulated in float64.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from custom.io import DatasetError, em_shape, find_em_files, read_em, read_em_slice, to_unit_range  # noqa: E402


def _slices(path: str, max_slices: int):
    """Yield the 2D arrays of ``path``: the image itself, or (evenly sampled) xy slices of a volume."""
    shape = em_shape(path)
    if len(shape) == 2:
        yield read_em(path)
        return
    n = shape[0]
    idx = range(n) if max_slices <= 0 or n <= max_slices else np.linspace(0, n - 1, max_slices).round().astype(int)
    for i in idx:
        yield read_em_slice(path, "xy", int(i))


def compute_mean_std(root: str, max_slices: int = 0) -> dict:
    """Mean and std over every pixel of every image/volume under ``root`` (unit-range intensities).

    Returns:
        ``{"intensity_mean", "intensity_std", "files", "pixels"}``.

    Raises:
        custom.io.DatasetError: ``root`` missing, empty or holding an unreadable file.
    """
    files = find_em_files(root)
    total, total_sq, count = 0.0, 0.0, 0
    for path in files:
        for sl in _slices(path, max_slices):
            x = to_unit_range(sl).astype(np.float64, copy=False)
            total += float(x.sum())
            total_sq += float(np.square(x).sum())
            count += x.size
    if count == 0:
        raise DatasetError(f"{root}: no pixels read")
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    return {"intensity_mean": mean, "intensity_std": std, "files": len(files), "pixels": count}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder of training images/volumes (searched recursively) or one file")
    parser.add_argument("--max_slices", type=int, default=0, help="xy slices sampled per volume (0: all)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args(argv)
    try:
        res = compute_mean_std(args.root, args.max_slices)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['files']} file(s), {res['pixels']} pixels: mean {res['intensity_mean']:.8f}, std {res['intensity_std']:.8f}")
        print(f"bundle overrides: --intensity_mean {res['intensity_mean']:.8f} --intensity_std {res['intensity_std']:.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
