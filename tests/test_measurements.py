"""custom.measurements: the objects/summary CSVs against objects placed by hand and an independent flood fill."""

from __future__ import annotations

import csv
import itertools
from collections import deque

import numpy as np
import pytest

from custom.errors import OutputError
from custom.measurements import (
    measure,
    measure_blocks,
    object_columns,
    summarize_objects,
    write_measurements,
)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def flood_fill(labels: np.ndarray, cls: int, diagonal: bool) -> list[set]:
    """Brute force: the voxel sets of the components of ``cls`` (BFS over face or all neighbours)."""
    offsets = [d for d in itertools.product((-1, 0, 1), repeat=labels.ndim) if any(d)]
    if not diagonal:
        offsets = [d for d in offsets if sum(map(abs, d)) == 1]
    seen = np.zeros(labels.shape, bool)
    comps = []
    for start in zip(*np.nonzero(labels == cls)):
        if seen[start]:
            continue
        seen[start] = True
        comp, todo = set(), deque([start])
        while todo:
            p = todo.popleft()
            comp.add(p)
            for d in offsets:
                q = tuple(a + b for a, b in zip(p, d))
                if all(0 <= c < s for c, s in zip(q, labels.shape)) and not seen[q] and labels[q] == cls:
                    seen[q] = True
                    todo.append(q)
        comps.append(comp)
    return comps


def test_objects_placed_by_hand():
    """Two boxes of class 1, a one-voxel object of class 2, a U of class 1 whose arms meet only at its base."""
    v = np.zeros((10, 12, 14), np.uint8)
    v[1:4, 2:5, 3:9] = 1  # 3*3*6 = 54 voxels
    v[6:9, 7:11, 10:12] = 1  # 3*4*2 = 24
    v[5, 0, 0] = 2
    v[0:3, 9, 0] = 1  # a U: two arms and a base (7 voxels)
    v[0:3, 11, 0] = 1
    v[2, 10, 0] = 1
    rows = measure(v, spacing=(40.0, 4.0, 4.0), class_names=["background", "mito", "er"])
    assert [(r["class_name"], r["component"], r["voxels"]) for r in rows] == [
        ("mito", 1, 7), ("mito", 2, 54), ("mito", 3, 24), ("er", 1, 1)]
    u, box = rows[0], rows[1]
    assert (u["bbox_z0"], u["bbox_y0"], u["bbox_x0"], u["bbox_z1"], u["bbox_y1"], u["bbox_x1"]) == (0, 9, 0, 3, 12, 1)
    assert box["volume"] == pytest.approx(54 * 40 * 4 * 4)
    assert (box["centroid_z"], box["centroid_y"], box["centroid_x"]) == pytest.approx((2 * 40, 3 * 4, 5.5 * 4))
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    summary = summarize_objects(rows, v.size, ["background", "mito", "er"])
    assert [(s["class_name"], s["count"], s["voxels"]) for s in summary] == [("mito", 3, 85), ("er", 1, 1)]
    assert summary[0]["mean_volume"] == pytest.approx(85 * 640 / 3)
    assert summary[0]["volume_fraction"] == pytest.approx(85 / v.size)


@pytest.mark.parametrize("connectivity", [1, 3])
def test_matches_flood_fill(connectivity):
    rng = np.random.default_rng(connectivity)
    v = ((rng.random((9, 11, 10)) < 0.3) * rng.integers(1, 3, (9, 11, 10))).astype(np.uint8)
    rows = measure(v, connectivity=connectivity)
    for cls in (1, 2):
        comps = flood_fill(v, cls, diagonal=connectivity == 3)
        mine = [r for r in rows if r["class"] == cls]
        assert len(mine) == len(comps) > 5
        # same objects: sizes, bounding boxes and centroids, in the order of their first voxel
        comps.sort(key=lambda c: min(c))
        for r, c in zip(mine, comps):
            pts = np.array(sorted(c))
            assert r["voxels"] == len(c)
            assert (r["bbox_z0"], r["bbox_y0"], r["bbox_x0"]) == tuple(pts.min(0))
            assert (r["bbox_z1"], r["bbox_y1"], r["bbox_x1"]) == tuple(pts.max(0) + 1)
            assert (r["centroid_z"], r["centroid_y"], r["centroid_x"]) == pytest.approx(tuple(pts.mean(0)))


def test_2d_matches_flood_fill():
    rng = np.random.default_rng(7)
    img = (rng.random((30, 40)) < 0.4).astype(np.int32)
    rows = measure(img, spacing=0.5)
    comps = flood_fill(img, 1, diagonal=False)
    assert sorted(r["voxels"] for r in rows) == sorted(len(c) for c in comps)
    assert "centroid_z" not in rows[0] and set(rows[0]) == set(object_columns(2))
    assert rows[0]["volume"] == rows[0]["voxels"] * 0.25


@pytest.mark.parametrize("connectivity,block", [(1, 1), (1, 4), (2, 3), (3, 5), (3, 64)])
def test_streamed_equals_whole(tmp_path, connectivity, block):
    """Blocks of sections of a real zarr array, merged across faces, give the whole-volume table exactly."""
    import zarr

    rng = np.random.default_rng(block)
    v = ((rng.random((23, 17, 19)) < 0.35) * rng.integers(1, 4, (23, 17, 19))).astype(np.uint8)
    v[:, 3, 3] = 2  # one object running through every block face
    z = zarr.open(str(tmp_path / "labels.zarr"), mode="w", shape=v.shape, chunks=(4, 17, 19), dtype="uint8")
    z[:] = v
    whole = measure(v, (30.0, 5.0, 5.0), connectivity=connectivity)
    streamed = measure_blocks(zarr.open(str(tmp_path / "labels.zarr"), mode="r"), (30.0, 5.0, 5.0),
                              connectivity=connectivity, block=block)
    assert len(whole) == len(streamed) > 20
    for a, b in zip(whole, streamed):
        assert a == pytest.approx(b)
    column = next(r for r in whole if r["class"] == 2 and r["bbox_z0"] == 0 and r["bbox_z1"] == 23)
    assert column["voxels"] >= 23


def test_write_measurements_files_and_no_overwrite(tmp_path):
    import zarr

    v = np.zeros((12, 8, 8), np.uint8)
    v[0:12, 2:4, 2:4] = 1  # one object across all blocks
    v[5:7, 6:8, 0:2] = 2
    path = str(tmp_path / "seg.zarr")
    zarr.open(path, mode="w", shape=v.shape, chunks=(3, 8, 8), dtype="uint8")[:] = v
    objects, summary = write_measurements(path, spacing=(10, 2, 2), class_names=["bg", "mito", "er"], block=5)
    assert objects == str(tmp_path / "seg_objects.csv") and summary == str(tmp_path / "seg_summary.csv")
    rows, sums = read_csv(objects), read_csv(summary)
    assert list(rows[0]) == object_columns(3)
    assert [(r["class_name"], int(r["voxels"]), float(r["volume"])) for r in rows] == [("mito", 48, 1920.0), ("er", 8, 320.0)]
    assert [(s["class_name"], int(s["count"]), float(s["volume_fraction"])) for s in sums] == [
        ("mito", 1, 48 / v.size), ("er", 1, 8 / v.size)]
    with open(objects) as f:
        before = f.read()
    with pytest.raises(OutputError, match="exists already"):
        write_measurements(path, spacing=(10, 2, 2))
    with open(objects) as f:
        assert f.read() == before
    # an array needs a prefix; a whole-volume pass (block=None) writes the same table
    other = write_measurements(v, spacing=(10, 2, 2), out_prefix=tmp_path / "arr", class_names=["bg", "mito", "er"], block=None)
    assert read_csv(other[0]) == rows


def test_voxel_size_read_from_an_ome_zarr(tmp_path):
    """An OME-Zarr label volume (written by custom.io) is streamed lazily and its NGFF scale is the voxel size."""
    from custom.io.zarrs import create_ngff

    v = np.zeros((6, 5, 5), np.uint8)
    v[1:5, 1:3, 1:4] = 1  # 24 voxels
    out = create_ngff(tmp_path / "seg.ome.zarr", v.shape, v.dtype, (2, 5, 5), spacing=(30.0, 4.0, 4.0),
                      units=("nanometer",) * 3)
    out[:] = v
    objects, _ = write_measurements(tmp_path / "seg.ome.zarr", block=2)
    (row,) = read_csv(objects)
    assert float(row["volume"]) == 24 * 30 * 4 * 4
    assert (float(row["centroid_z"]), float(row["centroid_y"])) == (2.5 * 30, 1.5 * 4)


# ------------------------------------------------------------------------------------------
# inference.json --measure True: the tables written next to each label volume
def _measured_inference(tmp_path, **overrides):
    """``inference.json`` in-process with ``--measure True``: tiny network (seeded random weights), one OME-Zarr volume."""
    import torch
    from monai.bundle import ConfigWorkflow

    from custom.io import write_em
    from custom.networks import transunet_from_preset
    from tests.helpers import FT

    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(transunet_from_preset("tiny", img_size=64).state_dict(), root / "models" / "model.pt")
    vol = np.random.default_rng(0).integers(0, 256, size=(4, 32, 40), dtype=np.uint8)
    src = write_em(tmp_path / "v.ome.zarr", vol, spacing=(40.0, 4.0, 4.0), units=("nanometer",) * 3)
    wf = ConfigWorkflow(config_file=str(FT / "configs" / "inference.json"), meta_file=str(FT / "configs" / "metadata.json"),
                        logging_file=False, input=str(src), preset="tiny", crop_size=64, overlap=0.25, progress=False,
                        output_dir=str(tmp_path / "out"), bundle_root=str(root), measure=True, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.mark.parametrize("streaming", [True, False])
def test_inference_writes_tables_that_match_a_flood_fill_of_its_labels(tmp_path, streaming):
    from custom.io import read_em

    wf = _measured_inference(tmp_path, streaming=streaming)
    out = tmp_path / "out"
    labels = np.asarray(read_em(str(out / "v_seg.ome.zarr")))
    objects, summary = read_csv(out / "v_seg_objects.csv"), read_csv(out / "v_seg_summary.csv")
    assert str(out / "v_seg_objects.csv") in wf.parser.get_parsed_content("evaluator").written
    comps = flood_fill(labels, 1, diagonal=False)
    assert len(comps) > 0 and len(objects) == len(comps)
    assert sorted(int(r["voxels"]) for r in objects) == sorted(len(c) for c in comps)
    # physical volume in the file's own units: 40 x 4 x 4 nm per voxel
    for r in objects:
        assert float(r["volume"]) == pytest.approx(int(r["voxels"]) * 640.0)
    assert {r["class_name"] for r in objects} == {"mitochondrion"}
    assert int(summary[0]["count"]) == len(comps)


def test_inference_refuses_existing_tables_before_writing_anything(tmp_path):
    import shutil

    from custom.errors import OutputError

    _measured_inference(tmp_path)
    out = tmp_path / "out"
    shutil.rmtree(out / "v_seg.ome.zarr")  # the labels are gone, the tables stay: they are still refused
    before = (out / "v_seg_objects.csv").read_bytes()
    with pytest.raises(Exception) as err:  # MONAI wraps an error of initialize in a RuntimeError
        _measured_inference(tmp_path)
    cause = err.value if isinstance(err.value, OutputError) else err.value.__cause__
    assert isinstance(cause, OutputError) and "v_seg_objects.csv: output already exists" in str(cause)
    assert not (out / "v_seg.ome.zarr").exists() and (out / "v_seg_objects.csv").read_bytes() == before


def test_inference_with_overwrite_replaces_its_tables(tmp_path):
    """``--overwrite True`` replaces the label volume and its tables (the tables are written again, not refused)."""
    _measured_inference(tmp_path)
    table = tmp_path / "out" / "v_seg_objects.csv"
    table.write_text("stale\n")
    _measured_inference(tmp_path, overwrite=True)
    assert read_csv(table) and table.read_text() != "stale\n"
