"""Streaming inference: a volume read block by block, each finished block written into its outputs.

Peak memory is one block (plus its halo) of input and probabilities, whatever the number of
sections. The same block function serves the single-process loop here and the Dask tasks of
:mod:`custom.inference.dask`, so the two write the same voxels.

- xy (the default): blocks are slabs of whole sections (``block=(16, None, None)``, no halo), so
  every section is tiled exactly as in memory and the result equals the in-memory one.
- orthoplane, or xy over sections too large for memory: blocks of ``(bz, by, bx)`` voxels read with
  a ``halo`` on every side (clipped at the volume's border); the three planes' probabilities are
  averaged by the inferer within the block (float32, bounded by the block) and the halo is cut.
  Probabilities are written in ``probability_dtype`` (float16 or uint8 scaled to 0-255 keep
  outputs compact).

A resumable run (zarr outputs) marks each block when it is written (:class:`DoneMarks`), so a
killed run continues with the blocks that were not finished.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..io.errors import dataset_error
from ..utils import progress as progress_bar

__all__ = ["Block", "DoneMarks", "block_grid", "predict_block", "quiet", "run_blocks", "stream_settings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """One block of a grid: ``core`` is what it writes, ``outer`` what it reads (core + halo, clipped)."""

    index: tuple
    core: tuple
    outer: tuple

    @property
    def inner(self) -> tuple:
        """``core`` relative to ``outer``."""
        return tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(self.core, self.outer))

    @property
    def voxels(self) -> int:
        return int(np.prod([s.stop - s.start for s in self.core]))

    @property
    def name(self) -> str:
        return "_".join(str(i) for i in self.index)


def stream_settings(block: Optional[Sequence[Optional[int]]], halo: Any, ndim: int = 3) -> tuple[tuple, tuple]:
    """``block`` (ints; None or <= 0: the whole axis) and ``halo`` (an int for every axis, or one per axis),
    checked: one line :class:`ConfigError` for anything else."""
    block = list(block) if block is not None else [16] + [None] * (ndim - 1)
    halo = [halo] * ndim if isinstance(halo, int) and not isinstance(halo, bool) else list(halo)
    ok = len(block) == ndim and len(halo) == ndim
    ok = ok and all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in block)
    ok = ok and all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in halo)
    if not ok:
        raise ConfigError(f"block_shape / block_halo: expected {ndim} integers (None: a whole axis) and a halo >= 0 "
                          f"per axis, got {block!r} / {halo!r}; e.g. --block_shape '[16,None,None]' --block_halo 0")
    return tuple(None if b is None or b <= 0 else int(b) for b in block), tuple(int(h) for h in halo)


def block_grid(shape: Sequence[int], block: Sequence[Optional[int]], halo: Sequence[int] = (0, 0, 0)) -> list[Block]:
    """Blocks of ``block`` voxels (None: the whole axis) covering ``shape`` in C order, each read with ``halo``."""
    axes = []
    for n, b, h in zip(shape, block, halo):
        b = n if b is None else min(int(b), n)
        axes.append([(k, slice(s, min(s + b, n)), slice(max(0, s - h), min(n, s + b + h)))
                     for k, s in enumerate(range(0, n, b))])
    return [Block(tuple(a[0] for a in combo), tuple(a[1] for a in combo), tuple(a[2] for a in combo))
            for combo in itertools.product(*axes)]


def quiet(inferer: Any) -> Any:
    """A copy of ``inferer`` without its own per-call progress bar (a bar per block would flood the
    terminal; the block loop has one); the same object when it has none."""
    window = getattr(inferer, "window", None)
    if isinstance(window, dict) and window.get("progress"):
        inferer = copy.copy(inferer)
        inferer.window = {**window, "progress": False}
    return inferer


def predict_block(
    volume: Any,
    block: Block,
    network: torch.nn.Module,
    inferer: Callable,
    preprocessing: Optional[Callable] = None,
    postprocessing: Optional[Callable] = None,
    device: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of ``block.core``.

    Args:
        volume: sliceable (Z, Y, X) (a :class:`custom.io.lazy.Volume`).
        preprocessing: a dict transform on ``{"image": (1, z, y, x)}`` (the bundle's intensity mapping and
            normalisation: voxel-wise, so a block maps as the whole volume would).
        postprocessing: a dict transform on ``{"pred": (C, z, y, x)}`` giving labels ``(1, z, y, x)``.

    Returns:
        labels ``(z, y, x)`` (the postprocessing's dtype) and probabilities ``(C, z, y, x)`` float32.
    """
    raw = volume[block.outer]
    data = {"image": raw[None]}
    if preprocessing is not None:
        data = preprocessing(data)
    image = torch.as_tensor(np.asarray(data["image"]) if not torch.is_tensor(data["image"]) else data["image"])
    with torch.inference_mode():
        probs = inferer(image[None].float().to(device), network)[0]
    probs = probs[(slice(None), *block.inner)].float().cpu()
    labels = postprocessing({"pred": probs})["pred"] if postprocessing is not None else probs
    labels = torch.as_tensor(labels).cpu().numpy()
    if labels.ndim == probs.ndim:
        labels = labels[0]
    return labels, probs.numpy()


def compact(probs: np.ndarray, dtype: Any) -> np.ndarray:
    """Probabilities in [0, 1] as ``dtype``: floats as they are, uint8 / uint16 scaled to the dtype's range."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return np.rint(np.clip(probs, 0, 1) * np.iinfo(dtype).max).astype(dtype)
    return probs.astype(dtype)


class DoneMarks:
    """One empty file per finished block under ``<folder>/.retina-blocks/``, plus ``run.json`` (what the
    run computes: a rerun with other settings or another grid is refused instead of mixing results)."""

    def __init__(self, folder: os.PathLike | str, run: dict) -> None:
        self.folder = Path(folder) / ".retina-blocks"
        self.folder.mkdir(parents=True, exist_ok=True)
        record = self.folder / "run.json"
        text = json.dumps(run, sort_keys=True, default=str)
        if record.exists() and record.read_text() != text:
            raise dataset_error(folder, "unfinished output of another run (other input, settings or blocks); "
                                        "delete it to start again")
        record.write_text(text)

    def done(self, block: Block) -> bool:
        return (self.folder / block.name).exists()

    def mark(self, block: Block) -> None:
        (self.folder / block.name).touch()

    def count(self) -> int:
        return sum(1 for p in self.folder.iterdir() if p.name != "run.json")

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_blocks(
    blocks: Sequence[Block],
    compute: Callable[[Block], tuple[np.ndarray, np.ndarray]],
    sinks: Sequence[Any],
    probability_dtype: Any = "float32",
    marks: Optional[DoneMarks] = None,
    desc: str = "blocks",
    show_progress: bool = True,
) -> dict:
    """Compute and write every block not yet marked done: ``sinks[0]`` gets the labels, ``sinks[1:]`` one
    probability channel each (``probs[0]`` alone for a binary network's single channel).

    Returns:
        ``{"blocks", "computed", "skipped", "seconds", "voxels_per_s"}``.
    """
    start, computed, skipped, voxels = time.time(), 0, 0, 0
    todo: Iterable[Block] = blocks
    bar = progress_bar(blocks, desc, total=len(blocks)) if show_progress else None
    for block in bar if bar is not None else todo:
        if marks is not None and marks.done(block):
            skipped += 1
            continue
        labels, probs = compute(block)
        sinks[0][block.core] = np.asarray(labels).astype(sinks[0].dtype, copy=False)
        for k, sink in enumerate(sinks[1:]):
            sink[block.core] = compact(probs[k], probability_dtype)
        if marks is not None:
            marks.mark(block)
        computed += 1
        voxels += block.voxels
        if bar is not None:
            bar.set_postfix_str(f"{voxels / max(time.time() - start, 1e-9) / 1e6:.3f} Mvoxel/s")
    seconds = time.time() - start
    stats = {"blocks": len(blocks), "computed": computed, "skipped": skipped, "seconds": round(seconds, 3),
             "voxels_per_s": voxels / seconds if seconds > 0 else 0.0}
    logger.info("[retina] %s: %d block(s) computed, %d done earlier, %.1f s, %.3f Mvoxel/s", desc, computed, skipped,
                seconds, stats["voxels_per_s"] / 1e6)
    return stats
