"""Peak memory of streamed inference against the number of sections, in one run.

    python scripts/bench_memory.py [--sections 50,200,400] [--size 1024] [--preset retina]
        [--block_sections 16] [--baseline true] [--workdir DIR]

For each section count it writes a synthetic uint8 zarr volume (``sections x size x size``, one chunk
per section), runs the fine-tuning bundle's ``inference.json`` on it through
``python -m monai.bundle run`` (random weights of ``preset``: memory does not depend on them;
OME-Zarr out, ``block_shape [block_sections, None, None]``) and prints that process's peak resident
memory (``getrusage`` of the child) and its wall time. The baseline, measured in the same run on the
first section count, is the in-memory path (``--streaming False``), which holds the whole volume and
its probabilities. Nothing of the user's is touched: everything lives under ``workdir`` (a new
temporary folder by default), removed at the end unless ``workdir`` was given.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from custom.networks import transunet_from_preset  # noqa: E402

FT = REPO / "bundles" / "retina_finetune"

# the child's peak RSS (Linux: KiB) printed after the bundle run finished
_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def synthetic_volume(path: Path, sections: int, size: int) -> None:
    """A uint8 zarr array of random-texture sections, written one section at a time (never all in memory)."""
    arr = zarr.open_array(str(path), mode="w", shape=(sections, size, size), chunks=(1, size, size), dtype="uint8")
    rng = np.random.default_rng(0)
    for z in range(sections):
        arr[z] = rng.integers(0, 256, size=(size, size), dtype=np.uint8)


def run_once(root: Path, src: Path, out: Path, streaming: bool, block_sections: int, preset: str) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one ``inference.json`` run on ``src``."""
    cmd = [sys.executable, "-c", _RSS, sys.executable, "-m", "monai.bundle", "run",
           "--config_file", str(FT / "configs" / "inference.json"), "--bundle_root", str(root),
           "--input", str(src), "--output_dir", str(out), "--progress", "False", "--preset", preset,
           "--streaming", str(streaming), "--block_shape", f"[{block_sections},None,None]"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=FT)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        said = [line for line in res.stderr.splitlines() if "retina_finetune:" in line] or res.stderr.splitlines()[-1:]
        raise SystemExit(f"bench_memory: inference failed on {src.name}: {said[-1] if said else 'no message'}")
    return int(res.stdout.split()[-1]) / 1024, secs


def main(sections: str | int | tuple = "50,200,400", size: int = 1024, preset: str = "retina",
         block_sections: int = 16, baseline: bool = True, workdir: str | None = None) -> dict:
    if isinstance(sections, str):
        sections = sections.split(",")
    counts = [int(s) for s in (sections if isinstance(sections, (tuple, list)) else [sections])]  # fire: a tuple
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench_memory_"))
    base.mkdir(parents=True, exist_ok=True)
    root = base / "bundle"
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(transunet_from_preset(preset, out_channels=1).state_dict(), root / "models" / "model.pt")
    figures: dict = {"preset": preset, "size": size, "block_sections": block_sections,
                     "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    for key, value in figures.items():
        print(f"{key}: {value}", flush=True)
    try:
        for i, n in enumerate(counts):
            src = base / f"v{n}.zarr"
            synthetic_volume(src, n, size)
            gb = n * size * size / 2**30
            if baseline and i == 0:
                rss, secs = run_once(root, src, base / f"mem{n}", False, block_sections, preset)
                figures[f"in_memory_{n}_peak_rss_mib"] = rss
                print(f"in_memory_{n}_sections: peak RSS {rss:.0f} MiB, {secs:.0f} s ({gb:.2f} GiB of input)", flush=True)
            rss, secs = run_once(root, src, base / f"out{n}", True, block_sections, preset)
            figures[f"streamed_{n}_peak_rss_mib"] = rss
            print(f"streamed_{n}_sections: peak RSS {rss:.0f} MiB, {secs:.0f} s ({gb:.2f} GiB of input, "
                  f"{n * size * size / secs:.3g} voxels/s)", flush=True)
            shutil.rmtree(src)
        streamed = [figures[f"streamed_{n}_peak_rss_mib"] for n in counts]
        print(f"streamed_peak_rss_spread_mib: {max(streamed) - min(streamed):.0f}")
        print(f"self_peak_rss_mib: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    finally:
        if not workdir:
            shutil.rmtree(base, ignore_errors=True)
    return figures


if __name__ == "__main__":
    fire.Fire(lambda **kw: (main(**kw), None)[1])
