"""Tests for custom/synthetic.py: the deterministic EM-like demo generator."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from custom import io as D
from custom import synthetic as S


def test_em_image_deterministic_uint8():
    a = S.em_image((96, 112), seed=3)
    assert a.shape == (96, 112) and a.dtype == np.uint8
    assert a.tobytes() == S.em_image((96, 112), seed=3).tobytes()
    assert a.tobytes() != S.em_image((96, 112), seed=4).tobytes()
    assert 20 < a.std() < 80  # textured, not flat and not pure noise
    with pytest.raises(ValueError):
        S.em_image((4, 96, 96), seed=0)


def test_em_volume_shape_labels_and_determinism():
    img, lab = S.em_volume((6, 80, 96), seed=1)
    assert img.shape == lab.shape == (6, 80, 96)
    assert img.dtype == lab.dtype == np.uint8
    assert set(np.unique(lab)) <= {0, 1}
    img2, lab2 = S.em_volume((6, 80, 96), seed=1)
    assert img.tobytes() == img2.tobytes() and lab.tobytes() == lab2.tobytes()
    _, lab3 = S.em_volume((6, 80, 96), seed=1, num_classes=3)
    assert set(np.unique(lab3)) == {0, 1, 2}
    np.testing.assert_array_equal(lab3 == 1, lab == 1)  # membrane class added, mitochondria unchanged
    with pytest.raises(ValueError):
        S.em_volume((6, 80, 96), seed=1, num_classes=5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mitochondria_fraction_and_contrast(seed):
    img, lab = S.em_volume((12, 160, 160), seed=seed, num_classes=3)
    mito = lab == 1
    assert 0.10 <= mito.mean() <= 0.20
    assert 0.02 <= (lab == 2).mean() <= 0.2
    assert img[mito].mean() < img[lab == 0].mean() - 30  # mitochondria darker than cytoplasm
    assert img[lab == 2].mean() < img[lab == 0].mean() - 15  # membranes darker too
    two_d = S.em_image((160, 160), seed=seed)
    assert two_d.dtype == np.uint8


def test_volume_changes_smoothly_along_z():
    img, lab = S.em_volume((8, 96, 96), seed=5)
    a, b = lab[:-1] == 1, lab[1:] == 1
    iou_next = (a & b).sum() / max((a | b).sum(), 1)
    assert iou_next > 0.5  # neighbouring sections share most mitochondria
    img_corr = np.corrcoef(img[0].ravel().astype(float), img[1].ravel().astype(float))[0, 1]
    far_corr = np.corrcoef(img[0].ravel().astype(float), S.em_image((96, 96), 99).ravel().astype(float))[0, 1]
    assert img_corr > far_corr + 0.2


def test_unlabelled_demo_idempotent(tmp_path):
    start = time.perf_counter()
    files = S.write_unlabelled_demo(tmp_path / "u", n_images=4, size=64, n_stacks=1, seed=0)
    assert time.perf_counter() - start < 10
    assert len(files) == 5 and all(os.path.isfile(f) for f in files)
    assert sorted(D.find_em_files(tmp_path / "u")) == sorted(files)
    stack = [f for f in files if f.endswith(".tif")][0]
    assert D.em_shape(stack) == (8, 64, 64)
    assert D.read_em(files[0]).shape == (64, 64)
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    assert S.write_unlabelled_demo(tmp_path / "u", n_images=4, size=64, n_stacks=1, seed=0) == files
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes  # skipped
    other = S.write_unlabelled_demo(tmp_path / "v", n_images=4, size=64, n_stacks=1, seed=0)
    assert [open(f, "rb").read() for f in other] == [open(f, "rb").read() for f in files]  # same bytes
    os.remove(files[1])
    S.write_unlabelled_demo(tmp_path / "u", n_images=4, size=64, n_stacks=1, seed=0)
    assert os.path.isfile(files[1])  # a missing file is regenerated


def test_labelled_demo_idempotent_and_valid(tmp_path):
    items = S.write_labelled_demo(tmp_path, shape=(6, 96, 96), seed=0, num_classes=3)
    assert set(items) == {"train", "val"}
    assert items["train"][0]["image"].endswith(os.path.join("train", "images", "vol0.tif"))
    assert items["val"][0]["label"].endswith(os.path.join("val", "labels", "vol0.tif"))
    D.validate_items(items["train"] + items["val"], num_classes=3)
    img = D.read_em(items["train"][0]["image"])
    assert img.shape == (6, 96, 96) and img.dtype == np.uint8
    assert D.read_em(items["train"][0]["image"]).tobytes() != D.read_em(items["val"][0]["image"]).tobytes()
    paths = [p for split in items.values() for it in split for p in it.values()]
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    assert S.write_labelled_demo(tmp_path, shape=(6, 96, 96), seed=0, num_classes=3) == items
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
    S.write_labelled_demo(tmp_path, shape=(6, 96, 96), seed=0, num_classes=2)  # other parameters: rewritten
    assert set(np.unique(D.read_em(items["train"][0]["label"]))) <= {0, 1}
    assert not [p for p in tmp_path.rglob(".tmp-*")]
