"""Where each result goes, and the refusals that keep every user file: no output on an input, on
another output or, unless ``overwrite``, on an existing file, checked before the first volume."""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError, OutputError
from ..io import FORMATS, em_format, slice_folder_problem
from ..io.writer import store_problem
from ..utils import file_stem, short_list

__all__ = ["OUTPUT_EXTS", "input_subfolder", "output_path", "check_outputs", "plan_outputs"]

logger = logging.getLogger(__name__)


OUTPUT_EXTS = ("", ".tif", ".tiff", ".png", ".h5", ".hdf5", ".nii", ".nii.gz", ".nrrd", ".mrc", ".mha", ".zarr", ".ome.zarr")


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
    for ext in (".nii.gz", ".ome.zarr", ".zarr", ".tiff", ".tif", ".png", ".hdf5", ".h5", ".nii", ".nrrd", ".mrc", ".mha"):
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
        more = f" (and {len(existing) - 1} more: {short_list(existing[1:])})" if len(existing) > 1 else ""
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
        elif em_format(out) not in (None, "dir") and FORMATS[em_format(out)].store:
            problem = store_problem(out)
            if problem is not None:
                raise OutputError(f"{out}: {problem}; not replaced even with --overwrite True")
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
