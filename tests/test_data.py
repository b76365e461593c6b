"""Tests for custom/io/: EM file discovery, readers, writers, slicing and validation."""

from __future__ import annotations

import logging
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from custom import io as D
from custom.io import DatasetError
from custom.io import formats as F
from custom.io import slicing as S

RNG = np.random.default_rng(0)
VOL = RNG.integers(0, 256, (5, 12, 17), dtype=np.uint8)  # (Z, Y, X), all sides distinct
LAB = (VOL > 128).astype(np.uint8)


def _one_line_error(excinfo, path) -> str:
    msg = str(excinfo.value)
    assert os.fspath(path) in msg, msg
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["v.tif", "v.tiff", "v.nii.gz", "v.nii", "v.h5", "v.nrrd", "v.mrc", "v.mha", "slices"])
def test_round_trip_3d(tmp_path, name):
    path = tmp_path / name
    D.write_em(path, VOL)
    back = D.read_em(path)
    assert back.shape == VOL.shape
    np.testing.assert_array_equal(back, VOL)
    if name != "v.mrc":  # mrcfile stores uint8 as uint16 (MRC mode 6)
        assert back.dtype == np.uint8
    assert D.em_shape(path) == VOL.shape


@pytest.mark.parametrize("name", ["i.png", "i.tif", "i.nii.gz", "i.h5", "i.nrrd", "i.mha"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_round_trip_2d(tmp_path, name, dtype):
    arr = RNG.integers(0, np.iinfo(dtype).max, (9, 14)).astype(dtype)
    path = tmp_path / name
    D.write_em(path, arr)
    back = D.read_em(path)
    assert back.dtype == dtype and back.shape == (9, 14)
    np.testing.assert_array_equal(back, arr)
    assert D.em_shape(path) == (9, 14)


def test_jpeg_and_palette_png(tmp_path):
    Image.fromarray(VOL[0]).save(tmp_path / "a.jpg", quality=95)
    jpg = D.read_em(tmp_path / "a.jpg")
    assert jpg.shape == (12, 17) and jpg.dtype == np.uint8
    assert np.abs(jpg.astype(int) - VOL[0]).mean() < 10
    mask = Image.fromarray((LAB[0] * 2).astype(np.uint8), mode="P")
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # colour palette: indices are classes
    mask.save(tmp_path / "mask.png")
    np.testing.assert_array_equal(D.read_em(tmp_path / "mask.png"), LAB[0] * 2)


def test_round_trip_float_and_torch(tmp_path):
    arr = RNG.random((3, 8, 6)).astype(np.float32)
    for name in ("f.tif", "f.h5", "f.nii.gz"):
        D.write_em(tmp_path / name, torch.from_numpy(arr))
        np.testing.assert_array_equal(D.read_em(tmp_path / name), arr)


def test_single_slice_volume_keeps_its_z_axis(tmp_path):
    D.write_em(tmp_path / "one.tif", VOL[:1])
    assert D.read_em(tmp_path / "one.tif").shape == (1, 12, 17)


def test_h5_keys(tmp_path):
    path = tmp_path / "both.h5"
    D.write_em(path, VOL, key="raw")
    D.write_em(path, LAB)  # default dataset "label", keeps "raw"
    np.testing.assert_array_equal(D.read_em(path), VOL)  # images default to "raw"
    np.testing.assert_array_equal(D.read_em(path, role="label"), LAB)
    np.testing.assert_array_equal(D.read_em(path, key="label"), LAB)
    with pytest.raises(DatasetError, match="no dataset 'nope'"):
        D.read_em(path, key="nope")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["group/stack"] = VOL
    np.testing.assert_array_equal(D.read_em(tmp_path / "other.h5"), VOL)  # only dataset


def test_nifti_geometry_preserved(tmp_path):
    affine = np.array([[0, 0, 2.0, 10], [0, 3.0, 0, -5], [1.5, 0, 0, 7], [0, 0, 0, 1]])
    xyz = RNG.integers(0, 4, (7, 6, 5)).astype(np.int16)  # stored (x, y, z)
    ref = tmp_path / "ref.nii.gz"
    img = nib.Nifti1Image(xyz, affine)
    img.header.set_zooms((1.5, 3.0, 2.0))
    nib.save(img, ref)
    zyx = D.read_em(ref)
    assert zyx.shape == (5, 6, 7)
    np.testing.assert_array_equal(zyx, xyz.T)
    assert D.em_shape(ref) == (5, 6, 7)
    out = tmp_path / "pred.nii.gz"
    D.write_em(out, (zyx > 1).astype(np.uint8), reference=ref)
    back = nib.load(out)
    assert back.shape == xyz.shape
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_allclose(back.header.get_zooms(), (1.5, 3.0, 2.0))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), (xyz > 1).astype(np.uint8))
    assert back.get_data_dtype() == np.uint8


@pytest.mark.parametrize("name", ["v.mha", "v.mhd", "v.gipl"])
def test_metaimage_through_itk_keeps_spacing(tmp_path, name):
    """MetaImage/GIPL (ITK's formats) read through MONAI's ITKReader as (Z, Y, X), shapes from the
    header, and written as .mha with the spacing, origin and direction of the reference."""
    import itk

    src = tmp_path / name
    img = itk.image_from_array(VOL.copy())  # ITK takes a (z, y, x) array; its sizes and spacing are (x, y, z)
    img.SetSpacing([0.5, 0.25, 2.0])
    img.SetOrigin([1.0, 2.0, 3.0])
    itk.imwrite(img, str(src))
    assert D.em_format(src) == "itk" and D.em_shape(src) == VOL.shape
    np.testing.assert_array_equal(D.read_em(src), VOL)
    np.testing.assert_array_equal(D.read_em_slice(src, "yz", 3), VOL[:, :, 3])
    assert [f for f in D.find_em_files(tmp_path)] == [str(src)]  # a .mhd's .raw pixels are no image of their own
    out = D.write_em(tmp_path / "pred.mha", LAB, reference=src)
    back = itk.imread(out)
    np.testing.assert_allclose(tuple(back.GetSpacing()), (0.5, 0.25, 2.0))
    np.testing.assert_allclose(tuple(back.GetOrigin()), (1.0, 2.0, 3.0))
    np.testing.assert_array_equal(D.read_em(out), LAB)
    meta = D.EMReader().get_data(D.EMReader().read(out))[1]
    assert meta["em_format"] == "itk" and tuple(meta["spatial_shape"]) == LAB.shape
    with pytest.raises(DatasetError, match="write .mha"):
        D.write_em(tmp_path / "pred.mhd", LAB)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_nrrd_reference_space_copied(tmp_path):
    import nrrd

    ref = tmp_path / "ref.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.5, 2.0]), "space origin": np.array([1.0, 2.0, 3.0])}
    nrrd.write(str(ref), VOL, header=header, index_order="C")
    D.write_em(tmp_path / "out.nrrd", LAB, reference=ref)
    back = nrrd.read_header(str(tmp_path / "out.nrrd"))
    np.testing.assert_allclose(back["space directions"], header["space directions"])
    np.testing.assert_array_equal(D.read_em(tmp_path / "out.nrrd"), LAB)


def test_writer_refuses_bad_requests(tmp_path):
    with pytest.raises(DatasetError, match="PNG is 2D"):
        D.write_em(tmp_path / "v.png", VOL)
    with pytest.raises(DatasetError, match="2D .* or 3D"):
        D.write_em(tmp_path / "v.tif", np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(DatasetError, match="unsupported output"):
        D.write_em(tmp_path / "v.xyz", VOL)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_folder_writer_pattern_and_natural_order(tmp_path):
    D.write_em(tmp_path / "vol", np.stack([VOL[0]] * 12), pattern="s{}.png")
    assert (tmp_path / "vol" / "s11.png").is_file()
    folder = tmp_path / "nat"
    folder.mkdir()
    for z in range(12):
        Image.fromarray(np.full((4, 5), z, np.uint8)).save(folder / f"slice{z}.png")
    vol = D.read_em(folder)
    assert vol.shape == (12, 4, 5)
    np.testing.assert_array_equal(vol[:, 0, 0], np.arange(12))  # slice2 before slice10
    assert D.em_shape(folder) == (12, 4, 5)


# ----------------------------------------------------------------------------- cheap shapes
def test_em_shape_reads_headers_only(tmp_path, monkeypatch):
    paths = {}
    for name in ("v.tif", "v.h5", "v.nii.gz", "v.nrrd", "v.mrc", "slices"):
        paths[name] = D.write_em(tmp_path / name, VOL)
    paths["i.png"] = D.write_em(tmp_path / "i.png", VOL[0])

    def boom(*a, **k):
        raise AssertionError("pixel data read")

    import nrrd
    from nibabel.arrayproxy import ArrayProxy

    monkeypatch.setattr(tifffile.TiffFile, "asarray", boom)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", boom)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", boom)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", boom)
    monkeypatch.setattr(ArrayProxy, "__array__", boom)
    monkeypatch.setattr(ArrayProxy, "__getitem__", boom)
    monkeypatch.setattr(nrrd, "read", boom)
    monkeypatch.setattr(Image.Image, "load", boom)
    for name, path in paths.items():
        assert D.em_shape(path) == (VOL.shape[1:] if name == "i.png" else VOL.shape), name


# ----------------------------------------------------------------------------- grayscale
def test_rgb_png_converted_with_warning(tmp_path, caplog):
    rgb = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    path = tmp_path / "colour.png"
    Image.fromarray(rgb).save(path)
    with caplog.at_level(logging.WARNING, logger="custom.io"):
        gray = D.read_em(path)
    assert gray.shape == (6, 7) and gray.dtype == np.uint8
    expected = np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    assert np.abs(gray.astype(int) - expected).max() <= 1
    assert any(str(path) in r.getMessage() and "grayscale" in r.getMessage() for r in caplog.records)
    assert D.em_shape(path) == (6, 7)


def test_rgba_and_gray_rgb_tiff(tmp_path):
    gray = RNG.integers(0, 256, (4, 6, 7), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # identical channels: exact
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(D.read_em(tmp_path / "rgb.tif"), gray)
    assert D.em_shape(tmp_path / "rgb.tif") == (4, 6, 7)
    rgba = np.concatenate([rgb[0], np.full((6, 7, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(D.read_em(tmp_path / "rgba.png"), gray[0])


def test_lzw_tiff_without_imagecodecs(tmp_path):
    frames = [Image.fromarray(s) for s in VOL]
    path = tmp_path / "lzw.tif"
    try:
        frames[0].save(path, save_all=True, append_images=frames[1:], compression="tiff_lzw")
    except Exception as exc:  # PIL built without libtiff
        pytest.skip(f"PIL cannot write LZW TIFF here: {exc}")
    np.testing.assert_array_equal(D.read_em(path), VOL)
    np.testing.assert_array_equal(D.read_em_slice(path, "xy", 2), VOL[2])


def test_to_unit_range():
    np.testing.assert_allclose(D.to_unit_range(np.array([0, 255], np.uint8)), [0, 1])
    np.testing.assert_allclose(D.to_unit_range(np.array([0, 65535], np.uint16)), [0, 1])
    np.testing.assert_allclose(D.to_unit_range(np.array([False, True])), [0, 1])
    np.testing.assert_allclose(D.to_unit_range(np.array([-32768, 32767], np.int16)), [0, 1])
    f = np.array([0.25, 2.0], np.float64)
    out = D.to_unit_range(f)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, f)  # floats unchanged
    assert D.to_unit_range(np.zeros((2, 3), np.uint8)).shape == (2, 3)


# ----------------------------------------------------------------------------- discovery
def test_find_em_files(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        D.find_em_files(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no readable EM images"):
        D.find_em_files(tmp_path)
    D.write_em(tmp_path / "b" / "img10.png", VOL[0])
    D.write_em(tmp_path / "b" / "img2.png", VOL[0])
    D.write_em(tmp_path / "a.nii.gz", VOL)
    D.write_em(tmp_path / ".hidden" / "x.tif", VOL)
    (tmp_path / "._a.tif").write_bytes(b"AppleDouble")
    os.symlink(tmp_path, tmp_path / "b" / "loop")  # a cycle must not hang or duplicate
    found = [os.path.relpath(p, tmp_path) for p in D.find_em_files(tmp_path)]
    assert found == ["a.nii.gz", os.path.join("b", "img2.png"), os.path.join("b", "img10.png")]


def test_pair_images_labels(tmp_path):
    for name in ("v1", "v2"):
        D.write_em(tmp_path / "img" / f"{name}.tif", VOL)
        D.write_em(tmp_path / "lab" / f"{name}.h5", LAB)
    pairs = D.pair_images_labels(tmp_path / "img", tmp_path / "lab")
    assert [(os.path.basename(p["image"]), os.path.basename(p["label"])) for p in pairs] == [
        ("v1.tif", "v1.h5"),
        ("v2.tif", "v2.h5"),
    ]
    D.write_em(tmp_path / "lab2" / "v1_label.tif", LAB)
    D.write_em(tmp_path / "lab2" / "v2_mask.tif", LAB)
    assert len(D.pair_images_labels(tmp_path / "img", tmp_path / "lab2")) == 2
    D.write_em(tmp_path / "img" / "v3.tif", VOL)
    D.write_em(tmp_path / "lab" / "w9.tif", LAB)
    with pytest.raises(DatasetError) as exc:
        D.pair_images_labels(tmp_path / "img", tmp_path / "lab")
    msg = _one_line_error(exc, tmp_path / "img")
    assert "v3.tif" in msg and "w9.tif" in msg


# ----------------------------------------------------------------------------- slicing
def test_slice_items_counts(tmp_path):
    vol = D.write_em(tmp_path / "v.tif", VOL)
    img2d = D.write_em(tmp_path / "i.png", VOL[0])
    items = [{"image": vol, "label": vol}, img2d]
    xy = D.slice_items(items)
    assert len(xy) == 5 + 1
    assert xy[0] == {"image": vol, "label": vol, "plane": "xy", "index": 0}
    assert xy[-1] == {"image": img2d, "plane": "xy", "index": -1}
    ortho = D.slice_items(items, planes="orthoplane")
    assert len(ortho) == 5 + 12 + 17 + 1
    assert {p: sum(1 for i in ortho if i["plane"] == p) for p in D.PLANES} == {"xy": 6, "xz": 12, "yz": 17}
    assert len(D.slice_items([vol], planes=["xz"])) == 12
    with pytest.raises(ValueError):
        D.slice_items(items, planes="zz")


@pytest.mark.parametrize("name", ["v.tif", "v.h5", "v.nii.gz", "slices", "v.nrrd"])
def test_load_em_sliced_planes(tmp_path, name):
    img = D.write_em(tmp_path / "img" / name, VOL)
    lab = D.write_em(tmp_path / "lab" / name, LAB)
    loader = D.LoadEMSliced(keys=("image", "label"))
    for item in D.slice_items([{"image": img, "label": lab}], planes="orthoplane"):
        out = loader(item)
        expected = S._take(VOL, item["plane"], item["index"])
        assert out["image"].shape == (1, *expected.shape)
        assert out["image"].dtype == torch.float32
        np.testing.assert_allclose(out["image"][0].numpy(), expected / 255.0, atol=1e-6)
        assert out["label"].dtype == torch.int64
        np.testing.assert_array_equal(out["label"][0].numpy(), S._take(LAB, item["plane"], item["index"]))
        assert out["image"].meta["filename_or_obj"] == img
    # no cache: partial reads give the same slices
    loader = D.LoadEMSliced(keys="image", cache_size=0, as_tensor=False)
    for plane, index in (("xy", 3), ("xz", 11), ("yz", 16)):
        out = loader({"image": img, "plane": plane, "index": index})["image"]
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_allclose(out[0], S._take(VOL, plane, index) / 255.0, atol=1e-6)


def test_load_em_sliced_caches_volume(tmp_path, monkeypatch):
    path = D.write_em(tmp_path / "v.tif", VOL)
    calls = []
    real = F._read_raw
    monkeypatch.setattr(F, "_read_raw", lambda *a, **k: calls.append(a) or real(*a, **k))
    loader = D.LoadEMSliced(keys="image")
    for item in D.slice_items([path]):
        loader(item)
    assert len(calls) == 1
    # a pickled transform (data-loader worker) starts with an empty cache
    import pickle

    assert len(pickle.loads(pickle.dumps(loader))._cache) == 0


def test_load_em_sliced_2d_and_h5_keys(tmp_path):
    png = D.write_em(tmp_path / "i.png", VOL[0])
    out = D.LoadEMSliced(keys="image")({"image": png, "plane": "xy", "index": -1})
    assert out["image"].shape == (1, 12, 17)
    h5 = tmp_path / "both.h5"
    D.write_em(h5, VOL, key="em")
    D.write_em(h5, LAB * 2, key="truth")
    item = {"image": str(h5), "label": str(h5), "image_key": "em", "label_key": "truth", "plane": "xy", "index": 4}
    out = D.LoadEMSliced(keys=("image", "label"), label_dtype=np.uint8)(item)
    np.testing.assert_array_equal(out["label"][0].numpy(), LAB[4] * 2)
    assert out["label"].dtype == torch.uint8
    with pytest.raises(DatasetError, match=r"2D image of shape \(12, 17\) has no xz slice 3"):
        D.LoadEMSliced(keys="image")({"image": png, "plane": "xz", "index": 3})
    with pytest.raises(DatasetError, match="out of range"):
        D.LoadEMSliced(keys="image")({"image": str(h5), "image_key": "em", "plane": "yz", "index": 17})


# ----------------------------------------------------------------------------- EMReader
@pytest.mark.parametrize("name", ["v.tif", "v.h5", "v.nii.gz", "slices", "v.nrrd", "v.mrc"])
def test_em_reader_with_load_imaged(tmp_path, name):
    from monai.transforms import LoadImaged

    path = D.write_em(tmp_path / name, VOL)
    reader = D.EMReader()
    assert reader.verify_suffix(path)
    out = LoadImaged(keys="image", reader=reader)({"image": path})
    img = out["image"]
    assert tuple(img.shape) == VOL.shape
    np.testing.assert_array_equal(img.numpy(), VOL)
    assert img.meta["filename_or_obj"] == path
    assert tuple(img.meta["spatial_shape"]) == VOL.shape
    assert img.meta["original_channel_dim"] == "no_channel"
    out = LoadImaged(keys="image", reader=D.EMReader(), ensure_channel_first=True)({"image": path})
    assert tuple(out["image"].shape) == (1, *VOL.shape)


def test_em_reader_nifti_affine_and_errors(tmp_path):
    from monai.transforms import LoadImage

    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(VOL.T.copy(), affine), tmp_path / "a.nii.gz")
    img = LoadImage(reader=D.EMReader(), image_only=True)(str(tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(np.asarray(img.affine), affine[:, [2, 1, 0, 3]])  # columns follow (z, y, x)
    assert not D.EMReader().verify_suffix("notes.txt")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(DatasetError) as exc:
        LoadImage(reader=D.EMReader())(str(bad))
    _one_line_error(exc, bad)


# ----------------------------------------------------------------------------- validation
def _bad(tmp_path, items, path, match, **kw):
    with pytest.raises(DatasetError, match=match) as exc:
        D.validate_items(items, **kw)
    _one_line_error(exc, path)


def test_validate_items_accepts_good_data(tmp_path):
    img = D.write_em(tmp_path / "v.tif", VOL)
    lab = D.write_em(tmp_path / "l.tif", LAB)
    tiny = D.write_em(tmp_path / "tiny.png", VOL[0, :3, :4])  # smaller than any crop: fine
    items = [{"image": img, "label": lab}, {"image": tiny}]
    D.validate_items(items, num_classes=2)
    D.validate_items(D.slice_items(items), num_classes=2)
    float_lab = D.write_em(tmp_path / "fl.h5", LAB.astype(np.float32))
    D.validate_items([{"image": img, "label": float_lab}], num_classes=2)


def test_validate_unreadable_files(tmp_path):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\xff" * 60)
    _bad(tmp_path, [{"image": str(corrupt)}], corrupt, "cannot read")
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, RNG.integers(0, 256, (4, 64, 64), dtype=np.uint8), photometric="minisblack")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _bad(tmp_path, [{"image": str(truncated)}], truncated, "cannot read")
    empty_png = tmp_path / "empty.png"
    empty_png.write_bytes(b"")
    _bad(tmp_path, [{"image": str(empty_png)}], empty_png, "cannot read")
    png = tmp_path / "cut.png"
    Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:200])
    _bad(tmp_path, [{"image": str(png)}], png, "cannot read")
    _bad(tmp_path, [{"image": str(tmp_path / "gone.tif")}], tmp_path / "gone.tif", "no such file")
    h5 = tmp_path / "junk.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 10)
    _bad(tmp_path, [{"image": str(h5)}], h5, "cannot read")


def test_validate_shape_and_label_values(tmp_path):
    img = D.write_em(tmp_path / "v.tif", VOL)
    small = D.write_em(tmp_path / "small.tif", LAB[:, :10])
    _bad(tmp_path, [{"image": img, "label": small}], small, "differs from image shape")
    three = D.write_em(tmp_path / "three.tif", LAB * 3)
    _bad(tmp_path, [{"image": img, "label": three}], three, "num_classes is 2", num_classes=2)
    D.validate_items([{"image": img, "label": three}], num_classes=4)
    frac = D.write_em(tmp_path / "frac.tif", LAB.astype(np.float32) * 0.5)
    _bad(tmp_path, [{"image": img, "label": frac}], frac, "non-integer")
    neg = D.write_em(tmp_path / "neg.h5", LAB.astype(np.int16) - 1)
    _bad(tmp_path, [{"image": img, "label": neg}], neg, "negative")
    nan_lab = LAB.astype(np.float32)
    nan_lab[0, 0, 0] = np.nan
    nan_lab = D.write_em(tmp_path / "nanlab.tif", nan_lab)
    _bad(tmp_path, [{"image": img, "label": nan_lab}], nan_lab, "non-finite")


def test_validate_dimensions_and_non_finite(tmp_path):
    with h5py.File(tmp_path / "one_d.h5", "w") as f:
        f["raw"] = np.arange(10, dtype=np.uint8)
    _bad(tmp_path, [str(tmp_path / "one_d.h5")], tmp_path / "one_d.h5", "1D array")
    with h5py.File(tmp_path / "four_d.h5", "w") as f:
        f["raw"] = np.zeros((2, 3, 4, 5), np.uint8)
    _bad(tmp_path, [str(tmp_path / "four_d.h5")], tmp_path / "four_d.h5", "4D array")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3, 2), np.float32), np.eye(4)), tmp_path / "four_d.nii.gz")
    _bad(tmp_path, [str(tmp_path / "four_d.nii.gz")], tmp_path / "four_d.nii.gz", "4D array")
    with h5py.File(tmp_path / "squeeze.h5", "w") as f:  # (1, Z, Y, X): a singleton axis is dropped
        f["raw"] = VOL[None]
    assert D.em_shape(tmp_path / "squeeze.h5") == VOL.shape
    bad = VOL.astype(np.float32)
    bad[2, 3, 4] = np.inf
    path = D.write_em(tmp_path / "inf.tif", bad)
    _bad(tmp_path, [{"image": path}], path, "non-finite")
    D.validate_items([{"image": path}], check_data=False)  # headers only


# ----------------------------------------------------------------------------- real data
def test_shared_isbi_and_fibsem(shared_dir):
    isbi = shared_dir / "data" / "isbi2012" / "train-volume.tif"
    if not isbi.exists():
        pytest.skip(f"{isbi} not present")
    assert D.em_shape(isbi) == (30, 512, 512)
    vol = D.read_em(isbi)
    assert vol.shape == (30, 512, 512) and vol.dtype == np.uint8
    np.testing.assert_array_equal(D.read_em_slice(isbi, "xy", 7), vol[7])
    fib = shared_dir / "data" / "fibsem_isotropic" / "train.h5"
    assert D.em_shape(fib) == (50, 100, 200)
    assert D.em_shape(fib, role="label") == (50, 100, 200)
    D.validate_items([{"image": str(fib), "label": str(fib)}], num_classes=2)
    items = D.slice_items([{"image": str(fib), "label": str(fib)}], planes="orthoplane")
    assert len(items) == 50 + 100 + 200
    out = D.LoadEMSliced(keys=("image", "label"))(items[-1])
    assert out["image"].shape == (1, 50, 100) and set(np.unique(out["label"].numpy())) <= {0, 1}


def test_shared_uint16_and_unlabelled(shared_dir):
    guay = shared_dir / "data" / "guay_platelet_2d" / "images" / "slice24.tif"
    if not guay.exists():
        pytest.skip(f"{guay} not present")
    arr = D.read_em(guay)
    assert arr.dtype == np.uint16 and arr.shape == (800, 800)
    unit = D.to_unit_range(arr)
    assert unit.dtype == np.float32 and 0.0 <= unit.min() and unit.max() <= 1.0
    unlabeled = shared_dir / "data" / "unlabeled_2d"
    files = D.find_em_files(unlabeled)
    assert len(files) > 30
    assert D.em_shape(unlabeled / "celegans_volume.tif") == (21, 256, 256)
    items = D.slice_items(files)
    assert len(items) == len(files) - 1 + 21
