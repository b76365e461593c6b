"""The inference engine of ``inference.json``: plan every output, then predict and write each volume."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.inferers import Inferer

from ..errors import ConfigError, InferenceError, describe
from ..handlers.tracking import MLflowRun, connect_tracking
from ..io import em_format, write_em
from ..io.formats import open_volume
from ..io.sinks import open_sink
from ..measurements import label_prefix, measurement_paths, write_measurements
from .blockwise import (
    DoneMarks,
    block_grid,
    predict_block,
    quiet,
    run_blocks,
    stream_settings,
)
from .outputs import check_outputs, plan_outputs

__all__ = ["VolumePredictor"]

logger = logging.getLogger(__name__)


class VolumePredictor:
    """Predict and write every item of ``dataset``; one failure does not stop the others.

    First (:meth:`plan`, also called by ``inference.json``'s ``initialize``) every output path is
    computed and checked (:func:`plan_outputs`): a refusal is one ``OutputError`` line and nothing
    is processed. Then per item: ``dataset[i]`` (loading + pre-processing), ``inferer(image[None],
    network)`` (probabilities), ``postprocessing({"image", "pred"})`` (label map ``(1, ...)``),
    then :func:`custom.io.write_em` to the planned path with the input as reference (NIfTI
    affine / NRRD space copied), never over an existing file unless ``overwrite``. Progress goes
    to the log (one line per input).

    The items run as one epoch of an Ignite ``Engine`` to which ``handlers`` are attached (MONAI's
    ``MLFlowHandler`` with ``--tracking mlflow``, ``custom.handlers.MLflowExtras`` for the run's
    parameters, connected to it by ``custom.handlers.connect_tracking``). When an ``MLFlowHandler``
    is among them, its run also gets the metrics
    ``volumes_written`` / ``volumes_failed`` and the artifact ``outputs.tsv`` (input, output, error).

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
        input_root: the ``--input`` folder: each input's sub-folder below it is kept under ``output_dir``.
        overwrite: replace outputs that exist already (default: refuse them, naming the first).
        num_classes: output channels of the network (how many probability files to plan).
        handlers: Ignite handlers to attach (``val_handlers``: the same, the name MONAI's
            ``--tracking`` option uses when a config has no handler list).
        streaming: ``True``: read every 3D input block by block and write each block as it is done
            (:mod:`custom.inference.blockwise`; peak memory flat in the number of sections); ``False``:
            whole volumes in memory; ``"auto"``: streaming for inputs read lazily (zarr, HDF5, TIFF) that
            are zarr stores or hold at least ``stream_voxels`` voxels.
        block_preprocessing: the pre-processing after loading (a dict transform on ``{"image": (1, z, y, x)}``;
            required for streaming).
        block_shape, block_halo: streaming blocks (None: a whole axis) and the halo read around each.
        probability_dtype: dtype of streamed probability outputs (float32, float16, uint8 scaled 0-255).
        resume: zarr outputs of a killed streaming run are continued (finished blocks are kept).
        input_key: the HDF5 dataset / zarr array of the inputs when streaming (``h5_image_key``).
        progress: a progress bar over the blocks when streaming.
        measure: after each label volume, write its per-object and per-class tables next to it
            (:func:`custom.measurements.write_measurements`: ``<label>_objects.csv``, ``<label>_summary.csv``,
            planned and checked with the other outputs).
        class_names: class index -> name for the tables (a dict with str or int keys, or a list).
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
        input_root: Optional[str] = None,
        overwrite: bool = False,
        num_classes: Optional[int] = None,
        handlers: Optional[Sequence] = None,
        val_handlers: Optional[Sequence] = None,
        streaming: Union[bool, str] = False,
        block_preprocessing: Optional[Callable] = None,
        block_shape: Optional[Sequence[Optional[int]]] = None,
        block_halo: Any = 0,
        probability_dtype: Any = "float32",
        stream_voxels: int = 2**26,
        resume: bool = True,
        input_key: Optional[str] = None,
        progress: bool = True,
        measure: bool = False,
        class_names: Any = None,
    ) -> None:
        if streaming not in (True, False, "auto"):
            raise ConfigError(f"streaming: expected True, False or 'auto', got {streaming!r}")
        for name, flag in (("save_probabilities", save_probabilities), ("overwrite", overwrite)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name}: expected True or False, got {flag!r}; write --{name} True or --{name} False")
        try:
            self.output_dtype = np.dtype(output_dtype)
        except TypeError:
            raise ConfigError(f"output_dtype: not a numpy dtype: {output_dtype!r} (e.g. uint8, uint16, int32)") from None
        self.dataset = dataset
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.output_dir = os.fspath(output_dir)
        self.output_ext = output_ext
        self.output_postfix = output_postfix
        self.save_probabilities = save_probabilities
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.image_key, self.pred_key = image_key, pred_key
        self.input_root = os.fspath(input_root) if input_root is not None else None
        self.overwrite = overwrite
        self.num_classes = int(num_classes) if num_classes is not None else None
        self.handlers = [h for h in list(handlers or []) + list(val_handlers or []) if h is not None]
        self.mlflow = MLflowRun()
        self.outputs: Optional[Dict[str, List[str]]] = None
        self.written: List[str] = []
        self.failed: List[tuple] = []
        self._rows: List[Tuple[str, str, str]] = []
        self.streaming, self.block_preprocessing = streaming, block_preprocessing
        self.block_shape, self.block_halo = stream_settings(block_shape, block_halo)
        self.probability_dtype, self.stream_voxels = np.dtype(probability_dtype), int(stream_voxels)
        self.resume, self.input_key, self.show_progress = bool(resume), input_key, bool(progress)
        self.stats: Dict[str, dict] = {}
        if not isinstance(measure, bool):
            raise ConfigError(f"measure: expected True or False, got {measure!r}; write --measure True or --measure False")
        if class_names is not None and not isinstance(class_names, (dict, list, tuple)):
            raise ConfigError(f"label_names: expected a dict of class index -> name or a list, got {class_names!r}")
        self.measure, self.class_names = measure, class_names
        self.tables: Dict[str, Tuple[str, str]] = {}

    @property
    def tracking(self) -> bool:
        """True when an ``MLFlowHandler`` is among the handlers (``--tracking mlflow``)."""
        from monai.handlers import MLFlowHandler

        return any(isinstance(h, MLFlowHandler) for h in self.handlers)

    def _source(self, i: int) -> str:
        item = self.dataset.data[i]
        return os.fspath(item[self.image_key] if isinstance(item, dict) else item)

    def plan(self) -> Dict[str, List[str]]:
        """Every input -> its output paths, checked (:func:`plan_outputs`); computed once."""
        if self.outputs is None:
            sources = [self._source(i) for i in range(len(self.dataset))]
            n_prob = 0
            if self.save_probabilities:
                n_prob = 1 if (self.num_classes or 1) == 1 else self.num_classes
            self.outputs = plan_outputs(
                sources, self.output_dir, self.output_ext, self.output_postfix, root=self.input_root,
                overwrite=self.overwrite, probabilities=n_prob,
            )
            if self.measure:
                self.tables = {src: measurement_paths(label_prefix(paths[0])) for src, paths in self.outputs.items()}
                check_outputs({s: list(t) for s, t in self.tables.items()}, sources, self.overwrite, " or --output_postfix")
        return self.outputs

    def streams(self, src: str) -> bool:
        """Whether ``src`` is segmented block by block (see ``streaming``)."""
        if self.streaming is False or self.block_preprocessing is None:
            return False
        with open_volume(src, self.input_key) as vol:
            if vol.ndim != 3:
                return False
            if self.streaming is True:
                return True
            return vol.lazy and (em_format(src) == "zarr" or int(np.prod(vol.shape)) >= self.stream_voxels)

    def predict_streaming(self, src: str, paths: List[str]) -> List[str]:
        """Segment ``src`` block by block into sinks for ``paths`` (labels, then probabilities)."""
        with open_volume(src, self.input_key) as vol:
            blocks = block_grid(vol.shape, self.block_shape, self.block_halo)
            chunks = tuple(c.stop - c.start for c in blocks[0].core)
            voxel = dict(spacing=vol.spacing, units=vol.units)
            sinks = []
            try:
                for k, path in enumerate(paths):
                    attrs = vol.attrs if em_format(path) == vol.fmt == "hdf5" else None
                    dtype = self.output_dtype if k == 0 else self.probability_dtype
                    sinks.append(open_sink(path, vol.shape, dtype, self.overwrite, reference=src, chunks=chunks,
                                           attrs=attrs, resume=self.resume, **voxel))
                marks = None
                if sinks[0].resumable:
                    run = {"input": os.path.abspath(src), "shape": vol.shape, "blocks": [self.block_shape, self.block_halo],
                           "outputs": [os.path.abspath(p) for p in paths]}
                    marks = DoneMarks(sinks[0].tmp, run)
                inferer = quiet(self.inferer)

                def compute(block):
                    return predict_block(vol, block, self.network, inferer, self.block_preprocessing,
                                         self.postprocessing, self.device)

                self.stats[src] = run_blocks(blocks, compute, sinks, self.probability_dtype, marks,
                                             desc=os.path.basename(src.rstrip("/")), show_progress=self.show_progress)
            except BaseException:
                for sink in sinks:
                    sink.abort()
                raise
        if marks is not None:
            marks.clear()
        return [sink.commit() for sink in sinks]

    def predict(self, i: int) -> List[str]:
        """Process item ``i``; returns the written paths (raises on any problem)."""
        src = self._source(i)
        paths = self.plan()[src]
        if self.streams(src):
            return self.predict_streaming(src, paths)
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
        p = probs.detach().cpu().float().numpy() if self.save_probabilities else None
        if p is not None and len(paths) - 1 != p.shape[0]:
            raise InferenceError(f"{src}: the network gives {p.shape[0]} class(es), num_classes is {self.num_classes}")
        written = [write_em(paths[0], labels.numpy().astype(self.output_dtype), reference=src, overwrite=self.overwrite)]
        if p is not None:
            written += [write_em(dst, p[k], reference=src, overwrite=self.overwrite) for k, dst in enumerate(paths[1:])]
        return written

    # ---- one Ignite iteration per item
    def _step(self, engine: Any, i: int) -> Dict[str, Any]:
        n = len(self.dataset)
        start = time.time()
        src = self._source(i)
        try:
            paths = self.predict(i)
            if self.measure:  # the label volume is read back lazily, block by block (flat memory)
                paths += write_measurements(paths[0], class_names=self.class_names, overwrite=self.overwrite)
        except Exception as err:  # report, keep going with the other volumes
            msg = describe(err)  # the file's problem, not MONAI's "applying transform" wrapper
            msg = msg[len(src) + 2:] if msg.startswith(f"{src}: ") else msg  # the path is printed once
            self.failed.append((src, msg))
            self._rows.append((src, "", msg))
            logger.error("[retina] [%d/%d] %s: FAILED: %s", i + 1, n, src, msg)
            return {"source": src, "written": [], "error": msg}
        self.written += paths
        self._rows += [(src, p, "") for p in paths]
        logger.info("[retina] [%d/%d] %s -> %s (%.1f s)", i + 1, n, src, paths[0], time.time() - start)
        return {"source": src, "written": paths, "error": ""}

    def _metrics(self, engine: Any) -> None:
        n, failed = len(self.dataset), len(self.failed)
        engine.state.metrics.update({"volumes_written": n - failed, "volumes_failed": failed})

    def _log_outputs(self, engine: Any) -> None:
        self.mlflow.log_text("input\toutput\terror\n" + "".join(f"{s}\t{o}\t{e}\n" for s, o, e in self._rows),
                             "outputs.tsv")

    def run(self) -> List[str]:
        """Plan every output, then predict every item; raises :class:`InferenceError` at the end if any failed."""
        from ignite.engine import Engine, Events

        self.plan()
        os.makedirs(self.output_dir, exist_ok=True)
        self.network.eval()
        n = len(self.dataset)
        self.written, self.failed, self._rows = [], [], []
        engine = Engine(self._step)
        connect_tracking([*self.handlers, self])  # this predictor and the handlers log to the MLFlowHandler's run
        # registered before the handlers, so that MONAI's MLFlowHandler logs them before it closes its run
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._metrics)
        engine.add_event_handler(Events.COMPLETED, self._log_outputs)
        for h in self.handlers:
            h.attach(engine)
        engine.run(range(n), max_epochs=1)
        if self.failed:
            lines = "\n".join(f"  {src}: {msg}" for src, msg in self.failed)
            raise InferenceError(f"{len(self.failed)} of {n} input(s) failed ({n - len(self.failed)} written):\n{lines}")
        logger.info("[retina] wrote %d file(s) for %d input(s) to %s", len(self.written), n, self.output_dir)
        return self.written
