"""Per-object measurements of a label volume: connected components per class, and a per-class summary.

:func:`measure` labels a whole 2D image or 3D volume in memory; :func:`measure_blocks` streams a 3D volume
(numpy, memmap, zarr or HDF5 array) in blocks of sections along the first axis and gives the same table:
each block is labelled on its own (``scipy.ndimage.label``), components touching across a block face
are merged as a graph (``scipy.sparse.csgraph.connected_components`` over the touching label pairs), and
their statistics (voxel counts, coordinate sums, bounding boxes) are added up. :func:`write_measurements`
writes both tables as CSV next to an inference output, never over an existing file.

Objects table (one row per component; ``id`` runs over the whole file, ``component`` within its class,
both in the order of each component's first voxel in C order, as ``scipy.ndimage.label`` numbers them)::

    id, class, class_name, component, voxels, volume, centroid_z, centroid_y, centroid_x,
    bbox_z0, bbox_y0, bbox_x0, bbox_z1, bbox_y1, bbox_x1

``volume`` is ``voxels * prod(spacing)`` and centroids are physical (index * spacing along each axis);
bounding boxes are voxel indices, ``[start, stop)``. 2D images have no ``z`` columns.

Summary table (one row per class present, background 0 excluded)::

    class, class_name, count, voxels, total_volume, mean_volume, volume_fraction
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

__all__ = ["OBJECT_COLUMNS", "SUMMARY_COLUMNS", "measure", "measure_blocks", "summarize_objects", "measurement_paths",
           "label_prefix", "write_measurements"]

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["class", "class_name", "count", "voxels", "total_volume", "mean_volume", "volume_fraction"]


def object_columns(ndim: int) -> list[str]:
    """The objects table's header for 2D (``ndim=2``: y, x) or 3D (z, y, x) labels."""
    axes = "zyx"[3 - ndim:]
    return (["id", "class", "class_name", "component", "voxels", "volume"] + [f"centroid_{a}" for a in axes]
            + [f"bbox_{a}0" for a in axes] + [f"bbox_{a}1" for a in axes])


OBJECT_COLUMNS = object_columns(3)


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    s = np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)) if np.ndim(spacing) == 0 else np.asarray(spacing, float)
    if s.shape != (ndim,) or not np.all(s > 0):
        raise ValueError(f"spacing must be one positive number or {ndim} of them, got {spacing!r}")
    return s


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not 1 <= connectivity <= ndim:
        raise ValueError(f"connectivity must be 1..{ndim} (1: faces only), got {connectivity!r}")
    return ndimage.generate_binary_structure(ndim, connectivity)


def _component_stats(lab: np.ndarray, n: int, offset: Sequence[int]) -> dict[str, np.ndarray]:
    """Per component 1..n of ``lab`` (shape (..)): voxel count, coordinate sums, bbox [lo, hi) in global indices."""
    flat = lab.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:]
    sums = np.empty((n, lab.ndim))
    for ax in range(lab.ndim):
        coord = np.arange(lab.shape[ax], dtype=float) + offset[ax]
        shape = [1] * lab.ndim
        shape[ax] = -1
        sums[:, ax] = np.bincount(flat, weights=np.broadcast_to(coord.reshape(shape), lab.shape).ravel(), minlength=n + 1)[1:]
    lo = np.empty((n, lab.ndim), dtype=np.int64)
    hi = np.empty((n, lab.ndim), dtype=np.int64)
    for i, box in enumerate(ndimage.find_objects(lab, max_label=n)):
        lo[i] = [b.start + o for b, o in zip(box, offset)]
        hi[i] = [b.stop + o for b, o in zip(box, offset)]
    return {"voxels": counts, "sums": sums, "lo": lo, "hi": hi}


def _rows(cls: int, stats: Mapping[str, np.ndarray], spacing: np.ndarray, name: str) -> list[dict[str, Any]]:
    ndim = spacing.size
    axes = "zyx"[3 - ndim:]
    voxel_volume = float(np.prod(spacing))
    rows = []
    for k in range(len(stats["voxels"])):
        n = int(stats["voxels"][k])
        row: dict[str, Any] = {"class": cls, "class_name": name, "component": k + 1, "voxels": n, "volume": n * voxel_volume}
        for a, ax in enumerate(axes):
            row[f"centroid_{ax}"] = float(stats["sums"][k, a] / n * spacing[a])
            row[f"bbox_{ax}0"] = int(stats["lo"][k, a])
            row[f"bbox_{ax}1"] = int(stats["hi"][k, a])
        rows.append(row)
    return rows


def _name(cls: int, class_names: Any) -> str:
    from custom.utils import class_name

    return class_name(cls, class_names, fallback="class{}")


def _numbered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, row in enumerate(rows, start=1):
        row["id"] = i
    return rows


def measure(
    labels: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    connectivity: int = 1,
) -> list[dict[str, Any]]:
    """The objects table (list of row dicts, columns ``object_columns(labels.ndim)``) of a whole label array.

    Args:
        labels: (Z, Y, X) or (Y, X) integer class indices, 0 = background.
        spacing: voxel size per axis (same order), or one number; default 1 (voxel units).
        class_names: names by class index: a sequence, or a mapping with int or str keys (a config's
            ``label_names``); default ``class<c>``.
        connectivity: 1 = neighbours share a face (6 in 3D), up to ``ndim`` = any touching voxel (26).
    """
    labels = np.asarray(labels)
    _check_labels(labels)
    sp, structure = _spacing(spacing, labels.ndim), _structure(labels.ndim, connectivity)
    rows: list[dict[str, Any]] = []
    for cls in _classes(labels):
        lab, n = ndimage.label(labels == cls, structure=structure)
        rows += _rows(cls, _component_stats(lab, n, [0] * labels.ndim), sp, _name(cls, class_names))
    return _numbered(rows)


def _check_labels(labels: Any) -> None:
    if labels.ndim not in (2, 3) or not np.issubdtype(np.dtype(labels.dtype), np.integer) and labels.dtype != bool:
        raise ValueError(f"labels must be a 2D or 3D integer array, got {labels.ndim}D {labels.dtype}")


def _classes(labels: np.ndarray) -> list[int]:
    return [int(c) for c in np.unique(labels) if c > 0]


def _face_pairs(prev: np.ndarray, nxt: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Pairs (label in ``prev``, label in ``nxt``) of the two (Y, X) sections that touch across their face.

    The offsets are the structure's next plane (faces only: the same (y, x); full: its 8 neighbours too)."""
    pairs = []
    h, w = prev.shape
    for dy, dx in np.argwhere(structure[2]) - 1:
        a = prev[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        b = nxt[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        both = (a > 0) & (b > 0)
        pairs.append(np.stack([a[both], b[both]], axis=1))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), dtype=np.int64)


class _ClassBlocks:
    """The components of one class over the blocks seen so far: per-block stats, face pairs, last section."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []
        self.offsets: list[int] = [0]  # global part number of each block's first component
        self.edges: list[np.ndarray] = []
        self.last: np.ndarray | None = None

    def add(self, lab: np.ndarray, n: int, z0: int, structure: np.ndarray) -> None:
        base = self.offsets[-1]
        if self.last is not None and n > 0:
            pairs = _face_pairs(self.last, lab[0], structure)
            prev_base = self.offsets[-2]
            self.edges.append(np.stack([pairs[:, 0] - 1 + prev_base, pairs[:, 1] - 1 + base], axis=1))
        self.parts.append(_component_stats(lab, n, [z0, 0, 0]))
        self.offsets.append(base + n)
        self.last = lab[-1]

    def merged(self) -> dict[str, np.ndarray]:
        """Stats of the merged components, ordered by each one's first part (= first voxel in C order)."""
        total = self.offsets[-1]
        edges = np.concatenate(self.edges) if self.edges else np.empty((0, 2), dtype=np.int64)
        graph = sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(total, total))
        _, comp = connected_components(graph, directed=False)
        # renumber components by their first (lowest) part: block order, then scipy's order within a block
        first = np.full(comp.max() + 1 if total else 0, total, dtype=np.int64)
        np.minimum.at(first, comp, np.arange(total))
        rank = np.empty_like(first)
        rank[np.argsort(first)] = np.arange(first.size)
        comp = rank[comp]
        cat = {k: np.concatenate([p[k] for p in self.parts]) for k in ("voxels", "sums", "lo", "hi")}
        m = first.size
        out = {"voxels": np.bincount(comp, weights=cat["voxels"], minlength=m).astype(np.int64),
               "sums": np.stack([np.bincount(comp, weights=cat["sums"][:, a], minlength=m) for a in range(3)], 1),
               "lo": np.full((m, 3), np.iinfo(np.int64).max), "hi": np.full((m, 3), -1, dtype=np.int64)}
        np.minimum.at(out["lo"], comp, cat["lo"])
        np.maximum.at(out["hi"], comp, cat["hi"])
        return out


def measure_blocks(
    labels: Any,
    spacing: float | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    connectivity: int = 1,
    block: int = 64,
    classes: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure` of a 3D label array read ``block`` sections at a time (``labels[z0:z1]``), same rows.

    ``labels`` is anything with ``shape``, ``dtype`` and slicing along the first axis (numpy, memmap, zarr,
    h5py). Memory: one block and one section per class, plus a few numbers per component. ``classes``:
    the class indices to measure (default: those found while reading).
    """
    if len(labels.shape) != 3:
        raise ValueError(f"measure_blocks needs a 3D (Z, Y, X) label array, got shape {tuple(labels.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1 section, got {block!r}")
    sp, structure = _spacing(spacing, 3), _structure(3, connectivity)
    per_class: dict[int, _ClassBlocks] = {}
    wanted = None if classes is None else {int(c) for c in classes}
    from custom.utils import progress

    for z0 in progress(range(0, labels.shape[0], block), "measuring objects", total=-(-labels.shape[0] // block)):
        chunk = np.asarray(labels[z0:z0 + block])
        _check_labels(chunk)
        found = set(_classes(chunk)) if wanted is None else wanted
        for cls in sorted(found | set(per_class)):
            lab, n = ndimage.label(chunk == cls, structure=structure)
            per_class.setdefault(cls, _ClassBlocks()).add(lab, n, z0, structure)
    rows: list[dict[str, Any]] = []
    for cls in sorted(per_class):
        rows += _rows(cls, per_class[cls].merged(), sp, _name(cls, class_names))
    return _numbered(rows)


def summarize_objects(
    rows: Sequence[Mapping[str, Any]], total_voxels: int, class_names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The per-class summary of an objects table; ``volume_fraction`` = class voxels / ``total_voxels``."""
    out = []
    for cls in sorted({int(r["class"]) for r in rows}):
        mine = [r for r in rows if int(r["class"]) == cls]
        vox = sum(int(r["voxels"]) for r in mine)
        vol = sum(float(r["volume"]) for r in mine)
        out.append({"class": cls, "class_name": _name(cls, class_names), "count": len(mine), "voxels": vox,
                    "total_volume": vol, "mean_volume": vol / len(mine), "volume_fraction": vox / total_voxels})
    return out


def _write_csv(path: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]], replace: bool = False) -> None:
    from custom.utils import atomic_path

    with atomic_path(path, replace=replace) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _measure_any(array: Any, spacing: Any, class_names: Any, connectivity: int, block: int | None) -> tuple[list, tuple]:
    """The objects table of an array-like (3D streamed ``block`` sections at a time) and its shape."""
    shape = tuple(array.shape)
    if len(shape) == 3 and block is not None:
        return measure_blocks(array, spacing, class_names, connectivity, block), shape
    return measure(np.asarray(array), spacing, class_names, connectivity), shape


def measurement_paths(out_prefix: str | os.PathLike) -> tuple[str, str]:
    """The two tables :func:`write_measurements` writes for ``out_prefix``: ``(<prefix>_objects.csv, <prefix>_summary.csv)``."""
    return f"{os.fspath(out_prefix)}_objects.csv", f"{os.fspath(out_prefix)}_summary.csv"


def label_prefix(label_path: str | os.PathLike) -> str:
    """The tables' prefix next to a label file: ``out/vol_seg.ome.zarr`` -> ``out/vol_seg``."""
    from custom.utils import file_stem

    return os.path.join(os.path.dirname(os.fspath(label_path).rstrip("/\\")), file_stem(label_path))


def write_measurements(
    labels: Any,
    spacing: float | Sequence[float] | None = None,
    out_prefix: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    connectivity: int = 1,
    block: int | None = 64,
    overwrite: bool = False,
) -> tuple[str, str]:
    """Write ``<out_prefix>_objects.csv`` and ``<out_prefix>_summary.csv`` of a label volume; returns both paths.

    Args:
        labels: a label file (opened by ``custom.io.formats.open_volume``: zarr / OME-Zarr, HDF5 and TIFF
            read lazily, others whole) or an array (numpy, zarr, h5py). 3D labels are streamed ``block``
            sections at a time (None: whole).
        spacing: voxel size per axis (z, y, x) or one number; default: the file's own voxel size
            (OME-Zarr scale, HDF5 ``element_size_um``, TIFF resolution, NIfTI zooms), else 1.
        out_prefix: path prefix of the tables (default: the label file's path without its suffix).
        class_names: names by class index.
        overwrite: replace existing tables (inference's ``--overwrite True``); default refuse them.

    Raises:
        custom.errors.OutputError: a table exists already and not ``overwrite`` (nothing is written then).
    """
    from custom.errors import OutputError
    if out_prefix is None:
        if not isinstance(labels, (str, os.PathLike)):
            raise ValueError("out_prefix is needed when labels is an array")
        out_prefix = label_prefix(labels)
    paths = measurement_paths(out_prefix)
    for p in paths:
        if os.path.lexists(p) and not overwrite:
            raise OutputError(f"{p}: exists already; measurements never replace a file (remove it or choose another out_prefix)")
    if isinstance(labels, (str, os.PathLike)):
        from custom.io.formats import open_volume

        with open_volume(labels, role="label") as vol:  # read lazily where the format allows (zarr, HDF5, TIFF)
            spacing = vol.spacing if spacing is None else spacing
            source = vol if vol.lazy and len(vol.shape) == 3 else vol.read()
            rows, shape = _measure_any(source, spacing, class_names, connectivity, block)
    else:
        rows, shape = _measure_any(labels, spacing, class_names, connectivity, block)
    summary = summarize_objects(rows, int(np.prod(shape)), class_names)
    os.makedirs(os.path.dirname(os.path.abspath(paths[0])), exist_ok=True)
    _write_csv(paths[0], object_columns(len(shape)), rows, replace=overwrite)
    _write_csv(paths[1], SUMMARY_COLUMNS, summary, replace=overwrite)
    logger.info("[retina] measured %d objects in %d classes: %s, %s", len(rows), len(summary), *paths)
    return paths
