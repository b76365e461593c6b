"""Slice-wise inference (custom/inference.py) and the fine-tuning bundle's inference.json over EM formats."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.inferers import SlidingWindowInferer

from custom.errors import ConfigError, OutputError
from custom.inference import InferenceError, SliceWiseInferer, list_inputs, output_path
from custom.io import read_em, write_em
from custom.networks import transunet_from_preset
from custom.utils import plane_list
from tests.helpers import FT, run_workflow


class _Conv(torch.nn.Module):
    """A fixed, orientation-sensitive stand-in for the 2D network (3x3 conv, 1 -> ``out`` channels)."""

    def __init__(self, out: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, out, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_plane_list():
    assert plane_list("xy") == ["xy"]
    assert plane_list("orthoplane") == ["xy", "xz", "yz"]
    with pytest.raises(ValueError):
        plane_list("xx")


def test_xy_inference_equals_per_slice_sliding_window():
    net = _Conv(out=2).eval()
    vol = torch.rand(1, 1, 3, 20, 24)
    with torch.no_grad():
        got = SliceWiseInferer(roi_size=16, overlap=0.5, sw_batch_size=5)(vol, net)
        sw = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5, sw_batch_size=5)
        want = torch.stack([torch.softmax(sw(vol[:, :, z], net), 1) for z in range(3)], dim=2)
    assert got.shape == (1, 2, 3, 20, 24)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(1, 3, 20, 24))


def test_orthoplane_averages_three_planes():
    net = _Conv(out=1).eval()
    vol = torch.rand(1, 1, 6, 10, 12)
    sw = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5)
    with torch.no_grad():
        got = SliceWiseInferer(roi_size=16, planes="orthoplane")(vol, net)
        xy = torch.stack([sw(vol[:, :, i], net) for i in range(6)], dim=2)
        xz = torch.stack([sw(vol[:, :, :, i], net) for i in range(10)], dim=3)
        yz = torch.stack([sw(vol[:, :, :, :, i], net) for i in range(12)], dim=4)
        want = (torch.sigmoid(xy) + torch.sigmoid(xz) + torch.sigmoid(yz)) / 3
        xy_only = SliceWiseInferer(roi_size=16, planes="xy")(vol, net)
    assert got.shape == vol.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, xy_only)
    assert float(got.min()) >= 0 and float(got.max()) <= 1


def test_2d_input_and_argument_checks():
    net = _Conv(out=3).eval()
    with torch.no_grad():
        out = SliceWiseInferer(roi_size=16, overlap=0.5)(torch.rand(2, 1, 30, 17), net)
    assert out.shape == (2, 3, 30, 17)
    with pytest.raises(ValueError):
        SliceWiseInferer(activation="none", planes="orthoplane")
    with pytest.raises(ValueError):
        SliceWiseInferer()(torch.rand(1, 1, 4), net)


def test_output_path_keeps_format(tmp_path):
    assert output_path("/d/v.tiff", "/o") == "/o/v_seg.tif"
    assert output_path("/d/v.nii.gz", "/o") == "/o/v_seg.nii.gz"
    assert output_path("/d/v.hdf5", "/o") == "/o/v_seg.h5"
    assert output_path("/d/v.jpg", "/o", postfix="") == "/o/v.png"
    assert output_path("/d/v.nrrd", "/o", output_ext="nii.gz") == "/o/v_seg.nii.gz"
    folder = tmp_path / "slices"
    folder.mkdir()
    assert output_path(str(folder), "/o") == "/o/slices_seg"
    write_em(folder / "0.png", np.zeros((4, 4), np.uint8))
    assert list_inputs(str(folder), slices_as_volume=True) == [str(folder)]
    assert list_inputs(str(folder)) == [str(folder / "0.png")]  # one image is not a stack
    write_em(folder / "1.png", np.zeros((4, 4), np.uint8))
    assert list_inputs(str(folder)) == [str(folder)]  # "auto": numbered same-shaped 2D slices are one volume
    assert list_inputs(str(folder), slices_as_volume=False) == [str(folder / "0.png"), str(folder / "1.png")]
    with pytest.raises(ConfigError, match="slices_as_volume: expected True, False or 'auto', got 'false'"):
        list_inputs(str(folder), slices_as_volume="false")
    # the input's sub-folder below --input is kept
    assert output_path("/in/a/b/v.tif", "/o", root="/in") == "/o/v_seg.tif"  # /in does not exist: no sub-folder
    (tmp_path / "in" / "a").mkdir(parents=True)
    assert output_path(str(tmp_path / "in" / "a" / "v.tif"), "/o", root=str(tmp_path / "in")) == "/o/a/v_seg.tif"
    assert output_path(str(tmp_path / "in" / "a" / "v.tif"), "/o", root=str(tmp_path / "in" / "a" / "v.tif")) == "/o/v_seg.tif"


# ------------------------------------------------------------------------------------------
# the bundle's inference.json


def _bundle_root(tmp_path: Path, num_classes: int = 1, seed: int = 0) -> Path:
    """A bundle root holding a randomly initialised tiny model as models/model.pt."""
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = transunet_from_preset("tiny", img_size=64, out_channels=num_classes)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def run_inference(root: Path, input_path, **overrides) -> ConfigWorkflow:
    """Run inference.json (tiny preset, 64 px windows) in-process, as ``monai.bundle run`` would
    (:func:`tests.helpers.run_workflow` with these defaults)."""
    args = {"preset": "tiny", "crop_size": 64, "overlap": 0.25, "progress": False, "output_dir": str(root / "out")}
    args.update(overrides)
    return run_workflow(FT, ["inference"], root, input=str(input_path), **args)


def _volume(shape=(4, 40, 56), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_inference_reads_and_writes_every_format(tmp_path):
    root = _bundle_root(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    vol = _volume()
    write_em(src / "stack.tif", vol)
    write_em(src / "vol.h5", vol, key="raw")
    affine = np.diag([2.0, 3.0, 40.0, 1.0])
    affine[:3, 3] = [5, 6, 7]
    nib.save(nib.Nifti1Image(vol.T.copy(), affine), src / "vol.nii.gz")
    write_em(src / "image.png", vol[0])
    run_inference(root, src)
    out = root / "out"
    assert sorted(os.listdir(out)) == ["image_seg.png", "stack_seg.tif", "vol_seg.h5", "vol_seg.nii.gz"]
    for name in ("stack_seg.tif", "vol_seg.h5", "vol_seg.nii.gz"):
        labels = read_em(out / name, role="label")
        assert labels.shape == vol.shape and labels.dtype == np.uint8, name
        assert set(np.unique(labels)) <= {0, 1}
    assert read_em(out / "image_seg.png").shape == vol.shape[1:]
    np.testing.assert_allclose(nib.load(out / "vol_seg.nii.gz").affine, affine)
    # the same input gives the same labels whatever its format
    np.testing.assert_array_equal(read_em(out / "stack_seg.tif"), read_em(out / "vol_seg.nii.gz"))


def test_inference_png_folder_volume(tmp_path):
    root = _bundle_root(tmp_path)
    folder = tmp_path / "slices"
    vol = _volume((3, 36, 50), seed=1)
    write_em(folder, vol)  # 0000.png, 0001.png, ...
    run_inference(root, folder, slices_as_volume=True, save_probabilities=True)
    labels = read_em(root / "out" / "slices_seg")
    assert labels.shape == vol.shape
    probs = read_em(root / "out" / "slices_seg_prob.tif")
    assert probs.shape == vol.shape and probs.dtype == np.float32
    np.testing.assert_array_equal(labels, (probs > 0.5).astype(np.uint8))


def _cause(exc: BaseException, cls: type) -> BaseException | None:
    while exc is not None and not isinstance(exc, cls):
        exc = exc.__cause__ or exc.__context__
    return exc


def test_inference_refuses_existing_outputs_unless_overwrite(tmp_path):
    """A second run into the same output folder is refused before any volume (the first run's labels stay);
    ``overwrite=True`` replaces them."""
    root = _bundle_root(tmp_path)
    src = tmp_path / "v.tif"
    write_em(src, _volume((2, 32, 32)))
    run_inference(root, src, save_probabilities=True)
    out = root / "out"
    first = {p: (out / p).read_bytes() for p in ("v_seg.tif", "v_seg_prob.tif")}
    (out / "v_seg.tif").write_bytes(b"edited by hand")
    with pytest.raises(Exception) as excinfo:
        run_inference(root, src, save_probabilities=True)
    err = _cause(excinfo.value, OutputError)
    assert err is not None and str(err).startswith(f"{out / 'v_seg.tif'}: output already exists (and 1 more"), excinfo.value
    assert (out / "v_seg.tif").read_bytes() == b"edited by hand"
    assert (out / "v_seg_prob.tif").read_bytes() == first["v_seg_prob.tif"]
    run_inference(root, src, save_probabilities=True, overwrite=True)
    assert (out / "v_seg.tif").read_bytes() == first["v_seg.tif"]


def test_inference_multiclass_argmax(tmp_path):
    root = _bundle_root(tmp_path, num_classes=3)
    src = tmp_path / "v.tif"
    write_em(src, _volume((2, 32, 32)))
    run_inference(root, src, num_classes=3, save_probabilities=True)
    labels = read_em(root / "out" / "v_seg.tif")
    probs = np.stack([read_em(root / "out" / f"v_seg_prob{k}.tif") for k in range(3)])
    np.testing.assert_array_equal(labels, probs.argmax(0))
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_failing_volume_is_reported_and_others_written(tmp_path):
    root = _bundle_root(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    write_em(src / "a_good.tif", _volume((2, 32, 32)))
    (src / "b_bad.tif").write_bytes(b"this is not a tiff")
    write_em(src / "c_good.h5", _volume((2, 32, 32)), key="raw")
    with pytest.raises(Exception) as excinfo:
        run_inference(root, src)
    err = excinfo.value
    while err is not None and not isinstance(err, InferenceError):
        err = err.__cause__
    assert isinstance(err, InferenceError), excinfo.value
    assert "1 of 3 input(s) failed" in str(err) and "b_bad.tif" in str(err)
    assert sorted(os.listdir(root / "out")) == ["a_good_seg.tif", "c_good_seg.h5"]


def test_orthoplane_on_isotropic_fibsem(tmp_path, shared_dir):
    """Orthoplane inference on fibsem_isotropic/test.h5 writes the input's shape and differs from xy only."""
    src = shared_dir / "data" / "fibsem_isotropic" / "test.h5"
    if not src.is_file():
        pytest.skip(f"{src} not present")
    root = _bundle_root(tmp_path)
    shape = read_em(src).shape
    for planes in ("xy", "orthoplane"):
        run_inference(root, src, planes=planes, save_probabilities=True, output_dir=str(root / planes), sw_batch_size=16)
    xy = read_em(root / "xy" / "test_seg_prob.h5", key="label")
    ortho = read_em(root / "orthoplane" / "test_seg_prob.h5", key="label")
    labels = read_em(root / "orthoplane" / "test_seg.h5", key="label")
    assert labels.shape == shape == ortho.shape == xy.shape
    assert np.abs(ortho - xy).max() > 1e-3
    np.testing.assert_array_equal(labels, (ortho > 0.5).astype(np.uint8))
