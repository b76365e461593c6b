"""Block-wise inference on a Dask cluster (``dask.distributed``): one task per zarr chunk of the output.

The client plans and checks the outputs exactly as ``inference.json`` does (its ``evaluator.plan()``),
creates each output as a resumable OME-Zarr (:func:`custom.io.sinks.open_sink` with ``resume``,
built under ``.partial-<name>`` and renamed into place at the end) whose chunks are the blocks,
and submits one task per block not yet marked done. Each task, on any worker:

1. builds the bundle's own ``network`` (weights loaded), ``inferer``, ``block_preprocessing`` and
   ``postprocessing`` from the same config files and overrides (once per worker process, cached),
2. reads its block plus halo from the input (:func:`custom.io.formats.open_volume`),
3. predicts it (:func:`custom.inference.blockwise.predict_block`, the function of the single-process
   streaming path, so both write the same voxels),
4. writes its chunk-aligned region of every output (no two tasks touch one chunk) and marks the block
   done (:class:`custom.inference.blockwise.DoneMarks`): a killed run, rerun, skips finished blocks.

Scheduling, retries and worker placement are Dask's: ``scheduler`` is an address (a SLURM cluster from
``dask-jobqueue``, a ``dask-cuda`` cluster with one worker per GPU) or None for a ``LocalCluster``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..io import em_format
from ..io.formats import open_volume
from ..io.sinks import open_sink
from ..utils import progress as progress_bar
from .blockwise import Block, DoneMarks, block_grid, compact, predict_block, quiet

__all__ = ["Job", "block_task", "components", "run_dask"]

logger = logging.getLogger(__name__)

_CACHE: dict = {}


@dataclass(frozen=True)
class Job:
    """What every task of one input needs (plain, picklable values)."""

    config_files: tuple
    overrides: str  # JSON of the config overrides
    source: str
    key: Optional[str]
    stores: tuple  # the outputs' temporary zarr groups: labels, then probabilities
    marks: str  # the DoneMarks folder's parent
    probability_dtype: str
    torch_threads: int = 1


def components(config_files: Sequence[str], overrides: str, torch_threads: int = 1) -> tuple:
    """``(network, inferer, block_preprocessing, postprocessing, device)`` of the bundle config, built once per
    process: the network in eval mode with the config's weights (``model_path``, unless ``load_pretrain`` is False)."""
    cache_key = (tuple(config_files), overrides)
    if cache_key not in _CACHE:
        import torch
        from monai.bundle import ConfigParser

        from ..checkpoints import load_weights

        torch.set_num_threads(max(1, int(torch_threads)))
        parser = ConfigParser()
        parser.read_config(list(config_files))
        parser.update(json.loads(overrides))
        network = parser.get_parsed_content("network")
        if parser.get_parsed_content("load_pretrain"):
            load_weights(network, parser.get_parsed_content("model_path"))
        network.eval()
        _CACHE[cache_key] = (network, quiet(parser.get_parsed_content("inferer")),
                             parser.get_parsed_content("block_preprocessing"),
                             parser.get_parsed_content("postprocessing"), parser.get_parsed_content("device"))
    return _CACHE[cache_key]


def block_task(job: Job, block: Block) -> str:
    """Predict one block and write it into every output store; returns the block's name once marked done."""
    import zarr

    network, inferer, pre, post, device = components(job.config_files, job.overrides, job.torch_threads)
    with open_volume(job.source, job.key) as vol:
        labels, probs = predict_block(vol, block, network, inferer, pre, post, device)
    arrays = [zarr.open_array(store, path="0", mode="r+") for store in job.stores]
    arrays[0][block.core] = labels.astype(arrays[0].dtype, copy=False)
    for k, arr in enumerate(arrays[1:]):
        arr[block.core] = compact(probs[k], job.probability_dtype)
    (Path(job.marks) / ".retina-blocks" / block.name).touch()
    return block.name


def _client(scheduler: Optional[str], n_workers: int, threads_per_worker: int, processes: bool):
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                           dashboard_address=None)
    return Client(cluster), cluster


def run_dask(
    config_files: Sequence[str],
    overrides: dict,
    scheduler: Optional[str] = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    processes: bool = True,
    torch_threads: int = 1,
) -> list[str]:
    """Segment every input of the bundle config on a Dask cluster; returns the written outputs.

    Args:
        config_files: the bundle's ``inference.json`` (and overlays); ``overrides``: settings as on its
            command line (``input``, ``output_dir``, ``bundle_root``, ``output_ext`` ``.ome.zarr`` ...).
        scheduler: a scheduler address, or None: a ``LocalCluster`` of ``n_workers`` processes
            (``processes=False``: threads of this process) with ``threads_per_worker`` task threads each.
        torch_threads: intra-op threads of each task's network.

    Raises:
        ConfigError: an output is not zarr (``--output_ext .ome.zarr``), an input is 2D.
    """
    from distributed import as_completed
    from monai.bundle import ConfigParser

    overrides = dict(overrides)
    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(overrides)
    predictor = parser.get_parsed_content("evaluator")
    plan = predictor.plan()
    block_shape, halo = predictor.block_shape, predictor.block_halo
    for src, paths in plan.items():
        if any(em_format(p) != "zarr" for p in paths):
            raise ConfigError(f"{paths[0]}: the Dask path writes zarr outputs only; pass --output_ext .ome.zarr")
    client, cluster = _client(scheduler, n_workers, threads_per_worker, processes)
    written: list[str] = []
    try:
        for src, paths in plan.items():
            written += _run_one(client, as_completed, config_files, overrides, predictor, src, paths, block_shape, halo,
                                torch_threads)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return written


def _run_one(client, as_completed, config_files, overrides, predictor, src, paths, block_shape, halo, torch_threads):
    with open_volume(src, predictor.input_key) as vol:
        if vol.ndim != 3:
            raise ConfigError(f"{src}: the Dask path segments 3D volumes; run inference.json for 2D images")
        shape, spacing, units = vol.shape, vol.spacing, vol.units
    blocks = block_grid(shape, block_shape, halo)
    chunks = tuple(c.stop - c.start for c in blocks[0].core)
    sinks = [open_sink(p, shape, predictor.output_dtype if k == 0 else predictor.probability_dtype, predictor.overwrite,
                       chunks=chunks, spacing=spacing, units=units, resume=True) for k, p in enumerate(paths)]
    run = {"input": os.path.abspath(src), "shape": shape, "blocks": [block_shape, halo],
           "outputs": [os.path.abspath(p) for p in paths]}
    marks = DoneMarks(sinks[0].tmp, run)
    todo = [b for b in blocks if not marks.done(b)]
    logger.info("[retina] %s: %d block(s), %d done earlier, %d to compute on %s", src, len(blocks),
                len(blocks) - len(todo), len(todo), client.dashboard_link or client.scheduler.address)
    job = Job(tuple(os.path.abspath(f) for f in config_files), json.dumps(overrides, sort_keys=True, default=str),
              os.path.abspath(src), predictor.input_key, tuple(os.fspath(s.tmp) for s in sinks), os.fspath(sinks[0].tmp),
              str(np.dtype(predictor.probability_dtype)), int(torch_threads))
    futures = client.map(block_task, [job] * len(todo), todo, pure=False)
    bar = progress_bar(as_completed(futures), f"{os.path.basename(src.rstrip('/'))} blocks", total=len(todo))
    for future in bar if predictor.show_progress else as_completed(futures):
        future.result()  # a failed block raises here (the others keep their marks for a rerun)
    marks.clear()
    return [sink.commit() for sink in sinks]
