"""Inference at scale (issue 13): lazy volumes, block-by-block outputs, the Dask path, resume, voxel size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigWorkflow

from custom.io import read_em, write_em
from custom.io.formats import open_volume, voxel_of
from custom.io.lazy import to_unit
from custom.networks import transunet_from_preset
from tests.helpers import FT, REPO, run_workflow

CONFIG = FT / "configs" / "inference.json"
#: inference.json settings of these tests: tiny preset, 64 px windows, no progress bars
DEFAULTS = {"preset": "tiny", "crop_size": 64, "overlap": 0.25, "progress": False}
NM = ("nanometer",) * 3


def _bundle_root(tmp_path: Path, num_classes: int = 1) -> Path:
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(transunet_from_preset("tiny", img_size=64, out_channels=num_classes).state_dict(),
               root / "models" / "model.pt")
    return root


def _settings(root: Path, out: str, **overrides) -> dict:
    return {**DEFAULTS, "output_dir": out, "bundle_root": str(root), **overrides}


def run_inference(root: Path, input_path, out: str, **overrides) -> ConfigWorkflow:
    """inference.json in-process (:func:`tests.helpers.run_workflow`) with :data:`DEFAULTS`, writing to ``out``."""
    return run_workflow(FT, ["inference"], root, input=str(input_path), **{**DEFAULTS, "output_dir": out, **overrides})


def _volume(shape=(6, 48, 56), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _um(path) -> tuple:
    v = voxel_of(path)
    return to_unit(v["spacing"], v["units"], "micrometer")


# ------------------------------------------------------------------------------------------
def test_lazy_reads_equal_eager_reads(tmp_path):
    """Every lazily opened format gives read_em's pixels, slab by slab, and reads no more than asked."""
    import zarr

    vol = _volume()
    paths = {
        "ome": write_em(tmp_path / "a.ome.zarr", vol, spacing=(40.0, 4.0, 4.0), units=NM),
        "h5": write_em(tmp_path / "a.h5", vol, key="raw", spacing=(40.0, 4.0, 4.0), units=NM),
        "tif": write_em(tmp_path / "a.tif", vol, spacing=(40.0, 4.0, 4.0), units=NM),
        "tif_zlib": write_em(tmp_path / "z.tif", vol, compression="zlib"),
        "nii": write_em(tmp_path / "a.nii.gz", vol),
    }
    v2 = zarr.open_array(str(tmp_path / "v2.zarr"), mode="w", shape=(1, *vol.shape), chunks=(1, 2, 48, 56),
                         dtype="uint8", zarr_format=2)
    v2[0] = vol
    paths["zarr_v2_czyx"] = str(tmp_path / "v2.zarr")
    for name, path in paths.items():
        with open_volume(path) as lazy:
            assert lazy.shape == vol.shape, name
            np.testing.assert_array_equal(lazy[2:5], read_em(path)[2:5], err_msg=name)
            np.testing.assert_array_equal(lazy[:, 3:9, 10:], vol[:, 3:9, 10:], err_msg=name)
            assert lazy.lazy == (name != "nii"), name
    assert type(open_volume(paths["tif"]).array).__name__ == "memmap"  # uncompressed: memory-mapped
    assert type(open_volume(paths["tif_zlib"]).array).__name__ == "Array"  # compressed: tifffile's zarr view
    for name in ("ome", "h5", "tif"):
        np.testing.assert_allclose(_um(paths[name]), (0.04, 0.004, 0.004), rtol=1e-6, err_msg=name)
    n5 = tmp_path / "b.n5"
    n5.mkdir()
    (n5 / "attributes.json").write_text('{"n5": "2.0.0"}')
    with pytest.raises(Exception, match="N5 cannot be read with zarr 3"):
        open_volume(n5)


def test_streamed_output_equals_in_memory_and_lazy_equals_eager(tmp_path):
    """Written block by block (2-section slabs) = the in-memory result; a zarr input = the same TIFF read eagerly."""
    root = _bundle_root(tmp_path)
    vol = _volume()
    tif = write_em(tmp_path / "v.tif", vol)
    zin = write_em(tmp_path / "v.ome.zarr", vol)
    run_inference(root, tif, str(tmp_path / "mem"), streaming=False, save_probabilities=True)
    run_inference(root, tif, str(tmp_path / "blk"), streaming=True, block_shape=[2, None, None],
                  save_probabilities=True)
    run_inference(root, zin, str(tmp_path / "zarr"), save_probabilities=True)  # auto: a zarr input streams
    mem = read_em(tmp_path / "mem" / "v_seg.tif")
    assert mem.shape == vol.shape and read_em(tmp_path / "mem" / "v_seg_prob.tif").std() > 1e-4
    np.testing.assert_array_equal(read_em(tmp_path / "blk" / "v_seg.tif"), mem)
    np.testing.assert_allclose(read_em(tmp_path / "blk" / "v_seg_prob.tif"), read_em(tmp_path / "mem" / "v_seg_prob.tif"),
                               atol=1e-5)
    np.testing.assert_array_equal(read_em(tmp_path / "zarr" / "v_seg.ome.zarr"), mem)
    assert sorted(os.listdir(tmp_path / "zarr")) == ["v_seg.ome.zarr", "v_seg_prob.ome.zarr"]  # no temporaries left


def test_orthoplane_blocks(tmp_path):
    """Orthoplane block by block: one block = the in-memory result; small blocks with a halo stay close."""
    root = _bundle_root(tmp_path)
    vol = _volume((16, 32, 32), seed=3)
    src = write_em(tmp_path / "v.ome.zarr", vol)
    common = dict(planes="orthoplane", save_probabilities=True)
    run_inference(root, src, str(tmp_path / "mem"), streaming=False, **common)
    run_inference(root, src, str(tmp_path / "one"), block_shape=[16, 32, 32], **common)
    run_inference(root, src, str(tmp_path / "halo"), block_shape=[8, 16, 16], block_halo=8,
                  probability_dtype="float16", **common)
    mem = read_em(tmp_path / "mem" / "v_seg_prob.ome.zarr")
    np.testing.assert_allclose(read_em(tmp_path / "one" / "v_seg_prob.ome.zarr"), mem, atol=1e-5)
    halo = read_em(tmp_path / "halo" / "v_seg_prob.ome.zarr")
    assert halo.dtype == np.float16 and halo.shape == vol.shape
    assert np.abs(halo.astype(np.float32) - mem).mean() < 0.05


@pytest.mark.parametrize("ext", [".ome.zarr", ".h5", ".tif", ".nii.gz"])
@pytest.mark.parametrize("streaming", [True, False])
def test_voxel_size_survives_inference(tmp_path, ext, streaming):
    root = _bundle_root(tmp_path)
    vol = _volume((4, 32, 40))
    if ext == ".nii.gz":
        affine = np.diag([0.004, 0.004, 0.04, 1.0])
        img = nib.Nifti1Image(vol.T.copy(), affine)
        img.header.set_xyzt_units("micron")
        nib.save(img, tmp_path / f"v{ext}")
        src = str(tmp_path / f"v{ext}")
    else:
        src = write_em(tmp_path / f"v{ext}", vol, key="raw", spacing=(40.0, 4.0, 4.0), units=NM)
    want = _um(src)
    np.testing.assert_allclose(want, (0.04, 0.004, 0.004), rtol=1e-6)
    run_inference(root, src, str(tmp_path / "out"), streaming=streaming, save_probabilities=True)
    for name in (f"v_seg{ext}", f"v_seg_prob{ext}"):
        np.testing.assert_allclose(_um(tmp_path / "out" / name), want, rtol=1e-6, err_msg=name)
    if ext == ".tif":
        with tifffile.TiffFile(tmp_path / "out" / "v_seg.tif") as tif:  # ImageJ reads it as a z-stack in nm
            assert tif.imagej_metadata["spacing"] == 40.0 and tif.imagej_metadata["unit"] == "nm"
            assert tif.series[0].axes == "ZYX"


# ------------------------------------------------------------------------------------------
# Dask
@pytest.mark.slow
def test_dask_equals_single_process(tmp_path):
    """(~50 s: two worker processes start torch) A LocalCluster of 2 worker processes writes the single-process streaming result voxel for voxel."""
    from custom.inference.dask import run_dask

    root = _bundle_root(tmp_path)
    src = write_em(tmp_path / "v.ome.zarr", _volume((8, 48, 48), seed=5), spacing=(30.0, 5.0, 5.0), units=NM)
    blocks = dict(block_shape=[2, 32, 32], block_halo=[0, 16, 16], save_probabilities=True)
    run_inference(root, src, str(tmp_path / "one"), **blocks)
    overrides = dict(_settings(root, str(tmp_path / "dask"), **blocks), input=src)
    written = run_dask([str(CONFIG)], overrides, n_workers=2, threads_per_worker=1, processes=True)
    assert [os.path.basename(p) for p in written] == ["v_seg.ome.zarr", "v_seg_prob.ome.zarr"]
    for name in ("v_seg.ome.zarr", "v_seg_prob.ome.zarr"):
        one, dsk = read_em(tmp_path / "one" / name), read_em(tmp_path / "dask" / name)
        if name == "v_seg.ome.zarr":
            np.testing.assert_array_equal(dsk, one)
        else:
            np.testing.assert_allclose(dsk, one, atol=1e-6)
            assert one.std() > 1e-4
        np.testing.assert_allclose(_um(tmp_path / "dask" / name), (0.03, 0.005, 0.005), rtol=1e-6)
    assert sorted(os.listdir(tmp_path / "dask")) == ["v_seg.ome.zarr", "v_seg_prob.ome.zarr"]


@pytest.mark.slow
def test_killed_dask_run_resumes(tmp_path):
    """SIGKILL after some blocks; the rerun computes only the missing ones and gives the uninterrupted result."""
    root = _bundle_root(tmp_path)
    src = write_em(tmp_path / "v.ome.zarr", _volume((24, 128, 128), seed=7))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "infer_dask.py"), "--input", src, "--output_dir", str(out),
           "--bundle_root", str(root), "--processes", "False", "--n_workers", "1", "--preset", "tiny",
           "--crop_size", "64", "--overlap", "0.7", "--progress", "False", "--block_shape", "[1,None,None]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    marks = out / ".partial-v_seg.ome.zarr" / ".retina-blocks"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and (not marks.is_dir() or len(os.listdir(marks)) < 4):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in marks.iterdir() if p.name != "run.json"}
    assert 3 <= len(before) < 24, before
    assert not (out / "v_seg.ome.zarr").exists()
    rerun = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"24 block(s), {len(before)} done earlier, {24 - len(before)} to compute" in rerun.stdout
    run_inference(root, src, str(tmp_path / "ref"), overlap=0.7, block_shape=[1, None, None])
    np.testing.assert_array_equal(read_em(out / "v_seg.ome.zarr"), read_em(tmp_path / "ref" / "v_seg.ome.zarr"))
    assert sorted(os.listdir(out)) == ["v_seg.ome.zarr"]


# ------------------------------------------------------------------------------------------
# peak memory
_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mb(root: Path, src: str, out: Path) -> float:
    """Peak resident memory (MB) of ``python -m monai.bundle run`` of inference.json on ``src``."""
    cmd = [sys.executable, "-c", _RSS, sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG),
           "--bundle_root", str(root), "--input", src, "--output_dir", str(out), "--preset", "tiny",
           "--crop_size", "64", "--overlap", "0.25", "--progress", "False", "--sw_batch_size", "16",
           "--block_shape", "[4,None,None]"]  # both volumes span several blocks: memory is one block's
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=FT)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_peak_memory_flat_in_sections(tmp_path):
    """8 vs 32 sections of 512x512 (OME-Zarr in and out): peak RSS grows by less than a tenth of the 4x more data."""
    import zarr

    root = _bundle_root(tmp_path)
    peaks = {}
    for n in (8, 32):
        src = tmp_path / f"v{n}.ome.zarr"
        arr = zarr.open_array(str(src), mode="w", shape=(n, 512, 512), chunks=(1, 512, 512), dtype="uint8")
        for z in range(n):
            arr[z] = _volume((1, 512, 512), seed=z)[0]
        peaks[n] = peak_rss_mb(root, str(src), tmp_path / f"out{n}")
    print(f"peak RSS: {peaks}")
    # the in-memory path would add ~13 bytes a voxel: 24 more sections of 512x512 = ~80 MB
    assert peaks[32] - peaks[8] < 30, peaks
