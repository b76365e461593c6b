"""Slice-wise inference of the 2D RETINA network over 2D images and 3D volumes, and writing the results.

- :class:`SliceWiseInferer`: a MONAI ``Inferer`` returning class *probabilities*. A 2D input
  ``(B, C, H, W)`` goes through MONAI's ``SlidingWindowInferer``; a volume ``(B, C, Z, Y, X)``
  through MONAI's ``SliceInferer`` (2D windows within each slice, windows of several slices
  batched together) along one or three axes: ``planes="xy"`` (anisotropic data, the default) or
  ``"orthoplane"`` (xy, xz and yz probabilities averaged, for isotropic data).
  Binary (one output channel): sigmoid; multi-class: softmax. Post-processing then thresholds
  at 0.5 or takes the argmax (``AsDiscreted`` in the bundle configs).
- :class:`VolumePredictor`: the inference "engine" of ``inference.json``: plans every output
  first (:func:`plan_outputs`), then runs a dataset of volumes through pre-processing, the
  inferer and post-processing and writes each label volume with :func:`custom.io.write_em` in
  the input's geometry and, by default, its format. A failing volume is reported and skipped;
  the others are still written; at the end a :class:`InferenceError` names the failures (so
  ``monai.bundle run`` exits non-zero). It runs as an Ignite engine, so MONAI's handlers (the
  ``MLFlowHandler`` of ``--tracking mlflow``) attach to it.
- :func:`list_inputs` (which files a ``--input`` names; a folder of 2D slices is one volume when
  its layout says so, :func:`slice_stack`), :func:`output_path` (where each result goes: the
  input's sub-folder below ``--input`` is kept under ``output_dir``), :func:`plan_outputs` and
  :func:`check_outputs` (no output may land on an input, on another output or, unless
  ``overwrite``, on an existing file: refused with one :class:`custom.errors.OutputError` line
  before the first volume is processed).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep

from .errors import ConfigError, InferenceError, OutputError, describe
from .handlers.tracking import MLflowRun, connect_tracking
from .io import FORMATS, DatasetError, em_format, em_shape, find_em_files, slice_folder_problem, write_em
from .utils import PLANE_AXIS, file_stem, plane_list, progress

__all__ = [
    "SliceWiseInferer",
    "VolumePredictor",
    "InferenceError",
    "list_inputs",
    "slice_stack",
    "output_path",
    "input_subfolder",
    "plan_outputs",
    "check_outputs",
]

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------
# which inputs
# --------------------------------------------------------------------------------------
#: a slice file name: anything, a number, no digit after it (``s12.png``, ``slice_0001_em.tif``)
_NUMBERED = re.compile(r"^(.*?)(\d+)(\D*)$")


def _short(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def slice_stack(folder: Union[str, os.PathLike]) -> Tuple[bool, str]:
    """Whether ``folder`` is one volume stored as per-slice 2D images, and why (or why not).

    A slice stack: no sub-folders; at least 2 image files (png/jpg/tif, hidden and non-image
    files aside), all of one format, named by one numbered pattern (``s1.png`` ... ``s120.png``,
    ``0000.tif`` ...: same text around the number, distinct numbers) and all 2D of one shape
    (headers read, no pixels). Anything else (differently shaped 2D images, 3D files, other
    names, sub-folders) is a list of separate images.

    Returns:
        ``(True, "<n> same-shaped 2D slices <first> ... <last>, (Y, X)")`` or ``(False, reason)``.
    """
    folder = os.fspath(folder)
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError as exc:
        return False, f"cannot list it ({exc.strerror or exc})"
    subdirs = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    if subdirs:
        return False, f"it has sub-folders ({_short(subdirs)})"
    files = [n for n in names if em_format(os.path.join(folder, n)) is not None]
    if len(files) < 2:
        return False, f"it holds {len(files)} image file(s)"
    other = [n for n in files if not FORMATS[em_format(os.path.join(folder, n))].slice_file]
    if other:
        return False, f"it holds 3D formats ({_short(other)})"
    patterns: Dict[tuple, List[str]] = {}
    numbers: Dict[tuple, str] = {}
    for n in files:
        stem, ext = os.path.splitext(n)
        m = _NUMBERED.match(stem)
        if m is None:
            return False, f"{n} has no slice number in its name"
        key = (m.group(1), m.group(3), ext.lower())
        patterns.setdefault(key, []).append(n)
        if (key, int(m.group(2))) in numbers:
            return False, f"{numbers[(key, int(m.group(2)))]} and {n} have the same slice number"
        numbers[(key, int(m.group(2)))] = n
    if len(patterns) > 1:
        a, b = (v[0] for v in list(patterns.values())[:2])
        return False, f"the names follow {len(patterns)} patterns (e.g. {a}, {b})"
    first_shape = None
    for n in progress(files, f"reading the headers in {folder}"):
        try:
            shape = tuple(em_shape(os.path.join(folder, n)))
        except DatasetError as exc:
            return False, f"cannot read the header of {n} ({describe(exc).split(': ', 1)[-1]})"
        if len(shape) != 2:
            return False, f"{n} is not 2D (shape {shape})"
        if first_shape is None:
            first_shape = shape
        elif shape != first_shape:
            return False, f"the images differ in shape ({files[0]} {first_shape}, {n} {shape})"
    order = sorted(files, key=lambda n: int(_NUMBERED.match(os.path.splitext(n)[0]).group(2)))
    return True, f"{len(files)} same-shaped 2D slices {order[0]} ... {order[-1]}, {first_shape}"


def list_inputs(path: Union[str, os.PathLike], slices_as_volume: Union[bool, str] = "auto") -> List[str]:
    """The inputs that ``path`` names: a file -> itself; a folder -> every EM file below it
    (:func:`custom.io.find_em_files`), or the folder itself as one volume of per-slice images.

    Args:
        path: a file or a folder.
        slices_as_volume: ``"auto"`` (default): a folder that :func:`slice_stack` recognises is one
            volume, any other folder a list of files; ``True``: the folder is one volume; ``False``:
            each file is an input. For a folder, one line says which reading was chosen.

    Raises:
        custom.errors.ConfigError: ``slices_as_volume`` is none of True, False, "auto".
        custom.io.DatasetError: ``path`` is missing or holds no EM file.
    """
    if slices_as_volume not in (True, False, "auto") or isinstance(slices_as_volume, (int, float)) and not isinstance(
        slices_as_volume, bool
    ):
        raise ConfigError(
            f"slices_as_volume: expected True, False or 'auto', got {slices_as_volume!r}; "
            "write --slices_as_volume True, False or auto"
        )
    path = os.fspath(path)
    if not os.path.isdir(path):
        return find_em_files(path)
    if slices_as_volume is True:
        _say(f"{path}: read as one volume of 2D slices (slices_as_volume True)")
        return [path]
    if slices_as_volume == "auto":
        stack, why = slice_stack(path)
        if stack:
            _say(f"{path}: read as one volume: {why} (--slices_as_volume False to segment each image on its own)")
            return [path]
    files = find_em_files(path)
    if slices_as_volume == "auto":
        _say(f"{path}: read as {len(files)} separate input(s), not one slice volume: {why} "
             "(--slices_as_volume True to force one volume)")
    else:
        _say(f"{path}: read as {len(files)} separate input(s) (slices_as_volume False)")
    return files


def _say(line: str) -> None:
    logger.info("[retina] %s", line)  # like the per-volume progress lines


# --------------------------------------------------------------------------------------
# where results go, and the checks that no user file is lost
# --------------------------------------------------------------------------------------
#: what ``output_ext`` may be (with or without the dot); "" is the input's format
OUTPUT_EXTS = ("", ".tif", ".tiff", ".png", ".h5", ".hdf5", ".nii", ".nii.gz", ".nrrd", ".mrc", ".mha")


def input_subfolder(input_path: str, root: Optional[str]) -> str:
    """The folder of ``input_path`` relative to the folder ``root`` (``in/a/vol.tif`` below ``in`` -> ``a``;
    ``""`` when ``root`` is not a folder, is the input itself, or does not hold it)."""
    if not root or not os.path.isdir(root):
        return ""
    src, base = os.path.abspath(input_path), os.path.abspath(root)
    if src == base:
        return ""
    rel = os.path.relpath(os.path.dirname(src), base)
    return "" if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def output_path(
    input_path: str, output_dir: str, output_ext: str = "", postfix: str = "seg", root: Optional[str] = None
) -> str:
    """``<output_dir>/<sub-folder>/<input stem>_<postfix><ext>``.

    ``<sub-folder>``: the input's folder relative to ``root`` (the ``--input`` folder), so that
    ``in/a/vol.tif`` and ``in/b/vol.tif`` go to ``out/a/vol_seg.tif`` and ``out/b/vol_seg.tif``;
    empty without ``root``. ``ext`` from ``output_ext`` or, when empty, the input's format (TIFF ->
    .tif, PNG/JPEG -> .png, HDF5 -> .h5, NIfTI -> .nii.gz, NRRD, MRC, MetaImage/GIPL -> .mha: the
    format's ``out_ext``; a folder of slices -> a folder of PNG slices)."""
    fmt = em_format(input_path)
    name = os.path.basename(os.fspath(input_path).rstrip("/\\"))
    stem = file_stem(name) if fmt not in (None, "dir") else name
    ext = output_ext if output_ext else (FORMATS[fmt].out_ext if fmt else ".tif")
    if ext and not ext.startswith("."):
        ext = "." + ext
    folder = os.path.join(output_dir, input_subfolder(os.fspath(input_path), root))
    return os.path.normpath(os.path.join(folder, f"{stem}_{postfix}{ext}" if postfix else f"{stem}{ext}"))


def _probability_path(label_path: str, k: Optional[int]) -> str:
    base = label_path
    for ext in (".nii.gz", ".tiff", ".tif", ".png", ".hdf5", ".h5", ".nii", ".nrrd", ".mrc", ".mha"):
        if base.lower().endswith(ext):
            base, keep = base[: -len(ext)], ext
            break
    else:
        keep = ""
    keep = ".tif" if keep in ("", ".png") else keep
    return f"{base}_prob{'' if k is None else k}{keep}"


class _Real:
    """Where a path's directory entry really is: the real path of its folder (symlinks resolved,
    cached per folder) plus its own name, so a symlinked output folder that is the input folder is
    caught, while an entry that is itself a symlink stays that entry (a rename replaces the link)."""

    def __init__(self) -> None:
        self._dirs: Dict[str, str] = {}

    def __call__(self, path: str) -> str:
        path = os.path.abspath(os.fspath(path).rstrip("/\\") or os.sep)
        folder, name = os.path.split(path)
        if folder not in self._dirs:
            self._dirs[folder] = os.path.normcase(os.path.realpath(folder))
        return os.path.join(self._dirs[folder], os.path.normcase(name)) if name else self._dirs[folder]


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_folder_output(path: str) -> bool:
    """``write_em`` writes a folder of slices for a name without a suffix."""
    return os.path.splitext(os.path.basename(path))[1] == ""


def check_outputs(
    plan: Mapping[str, Sequence[str]], inputs: Sequence[str] = (), overwrite: bool = False, hint: str = ""
) -> None:
    """Refuse, before anything is written, a set of outputs that would lose data.

    Args:
        plan: input -> the output paths it will write.
        inputs: every input file or folder (also those that will not be processed): none may be
            written over, written into (a folder volume), or be inside a folder output.
        overwrite: existing outputs may be replaced (never an input; a folder output only when it
            holds nothing but image slices, see :func:`custom.io.slice_folder_problem`).
        hint: how to choose other names, e.g. ``" or a non-empty --output_postfix"`` (appended to
            "choose another --output_dir").

    Raises:
        custom.errors.OutputError: one line, ``"<output path>: <problem>"``: an output that is an
            input or lands in or around one; outputs shared by several inputs (the colliding pairs
            listed); an existing output without ``overwrite``; an existing output of the other kind
            (file / folder) or a folder holding more than image slices, even with ``overwrite``.
    """
    real = _Real()
    choose = f"choose another --output_dir{hint}"
    sources = list(dict.fromkeys([os.fspath(p) for p in inputs] + [os.fspath(p) for p in plan]))
    real_inputs = {real(p): p for p in sources}
    folder_inputs = [(r, p) for r, p in real_inputs.items() if os.path.isdir(p)]
    outputs = [(src, os.fspath(out), real(out)) for src, outs in plan.items() for out in outs]
    # 1. never onto, into or around an input (overwrite or not)
    for _, out, ro in outputs:
        if ro in real_inputs:
            raise OutputError(f"{out}: output would be written over the input {real_inputs[ro]}; {choose}")
        for ri, inp in folder_inputs:
            if _inside(ro, ri):
                raise OutputError(f"{out}: output would be written into the input folder {inp}; {choose}")
    folder_outputs = {ro: out for _, out, ro in outputs if _is_folder_output(out)}
    if folder_outputs:
        for ri, inp in real_inputs.items():
            parent = os.path.dirname(ri)
            while parent and parent not in folder_outputs and os.path.dirname(parent) != parent:
                parent = os.path.dirname(parent)
            if parent in folder_outputs:
                raise OutputError(
                    f"{folder_outputs[parent]}: output folder would replace a folder holding the input {inp}; {choose}"
                )
    # 2. one output per input: no two inputs (or two outputs of one input) on one name
    owners: Dict[str, List[Tuple[str, str]]] = {}
    for src, out, ro in outputs:
        owners.setdefault(ro, []).append((src, out))
    shared = [(found[0][1], [s for s, _ in found]) for found in owners.values() if len(found) > 1]
    if shared:
        pairs = "; ".join(f"{' and '.join(srcs)} -> {out}" for out, srcs in shared[:5])
        more = f" (and {len(shared) - 5} more)" if len(shared) > 5 else ""
        raise OutputError(
            f"{shared[0][0]}: {len(shared)} output name(s) would be written for more than one input: {pairs}{more}; "
            "rename one input of each pair (e.g. x.tif next to x.tiff, same stem in one folder)"
        )
    # 3. existing files
    existing = [out for _, out, _ in outputs if os.path.lexists(out)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more: {_short(existing[1:])})" if len(existing) > 1 else ""
        raise OutputError(
            f"{existing[0]}: output already exists{more}; not replaced: pass --overwrite True to replace "
            f"{'them' if len(existing) > 1 else 'it'}, or {choose}"
        )
    for out in existing:
        if _is_folder_output(out):
            if not os.path.isdir(out) or os.path.islink(out):
                raise OutputError(
                    f"{out}: exists and is not a folder; not replaced by a folder of slices even with --overwrite True"
                )
            problem = slice_folder_problem(out)
            if problem is not None:
                raise OutputError(f"{out}: exists and {problem}; not replaced even with --overwrite True")
        elif os.path.isdir(out):
            raise OutputError(f"{out}: exists and is a folder; not replaced by a file even with --overwrite True")


def plan_outputs(
    inputs: Sequence[str],
    output_dir: str,
    output_ext: str = "",
    postfix: str = "seg",
    root: Optional[str] = None,
    overwrite: bool = False,
    probabilities: int = 0,
) -> Dict[str, List[str]]:
    """Every output path of every input, checked by :func:`check_outputs` before anything is written.

    Args:
        inputs: the inputs (:func:`list_inputs`).
        output_dir, output_ext, postfix, root: as in :func:`output_path`.
        overwrite: allow replacing existing outputs.
        probabilities: probability files per input besides the labels: 0 (none), 1 (binary:
            ``<label>_prob``), k > 1 (``<label>_prob0`` ... ``_prob{k-1}``).

    Returns:
        input -> [label path, probability paths...].

    Raises:
        custom.errors.ConfigError: ``output_ext`` is not a supported format.
        custom.errors.OutputError: see :func:`check_outputs`.
    """
    ext = output_ext or ""
    if not isinstance(ext, str) or (ext if ext.startswith(".") or not ext else "." + ext).lower() not in OUTPUT_EXTS:
        raise ConfigError(
            f"output_ext: expected one of {', '.join(repr(e) for e in OUTPUT_EXTS)}, got {output_ext!r}; "
            "'' keeps each input's format"
        )
    plan: Dict[str, List[str]] = {}
    for src in inputs:
        src = os.fspath(src)
        label = output_path(src, output_dir, ext, postfix, root)
        if not ext and em_format(src) == "dir" and not _is_folder_output(label):
            suffix = os.path.splitext(os.path.basename(label))[1]
            raise OutputError(
                f"{label}: a folder of slices cannot have a name with a suffix ({suffix!r}, from the input folder's "
                "name); pass --output_ext .tif to write a TIFF stack instead"
            )
        probs = [_probability_path(label, None)] if probabilities == 1 else [
            _probability_path(label, k) for k in range(probabilities)
        ]
        plan[src] = [label, *probs]
    check_outputs(plan, inputs, overwrite, hint=" or --output_postfix")
    return plan


# --------------------------------------------------------------------------------------
# the inference engine
# --------------------------------------------------------------------------------------
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
    ) -> None:
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
        return self.outputs

    def predict(self, i: int) -> List[str]:
        """Process item ``i``; returns the written paths (raises on any problem)."""
        src = self._source(i)
        paths = self.plan()[src]
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
