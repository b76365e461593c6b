"""Segment volumes block by block on a Dask cluster with the fine-tuning bundle's inference.json.

    python scripts/infer_dask.py --input vol.ome.zarr --output_dir out --bundle_root bundles/retina_finetune
    python scripts/infer_dask.py --input vol.ome.zarr --output_dir out --scheduler tcp://10.0.0.5:8786

Every other ``--name value`` is a setting of inference.json (``--num_classes 3``, ``--planes orthoplane``,
``--block_shape "[64,512,512]"`` (None for a whole axis: ``"[16,None,None]"``), ``--save_probabilities True``...). Outputs are OME-Zarr; a killed run,
started again with the same settings, computes only the blocks it had not finished. The work is
``custom.inference.dask.run_dask``; this file only parses the command line.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "retina_finetune"


def main(
    input: str,
    output_dir: str,
    scheduler: str | None = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    processes: bool = True,
    torch_threads: int = 1,
    bundle_root: str = str(BUNDLE),
    config_file: str = str(BUNDLE / "configs" / "inference.json"),
    **settings,
) -> None:
    """Run inference.json's predictor block-wise on Dask (a LocalCluster of ``n_workers`` unless ``scheduler``)."""
    from custom.errors import one_line_error
    from custom.inference.dask import run_dask
    from custom.settings import check_values, load_schema

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    settings.setdefault("output_ext", ".ome.zarr")
    overrides = {"input": os.path.abspath(input), "output_dir": os.path.abspath(output_dir),
                 "bundle_root": os.path.abspath(bundle_root), **settings}
    try:
        check_values(settings, load_schema(os.path.dirname(os.path.abspath(config_file))))
        files = [os.path.abspath(f) for f in str(config_file).split(",")]
        written = run_dask(files, overrides, scheduler, n_workers, threads_per_worker, processes, torch_threads)
    except Exception as exc:
        line = one_line_error(exc, "infer_dask")
        if line is None:
            raise
        print(line, file=sys.stderr)
        raise SystemExit(1) from None
    for path in written:
        print(path)


if __name__ == "__main__":
    fire.Fire(main)
