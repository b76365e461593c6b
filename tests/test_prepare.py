"""Tests of the benchmark preparation (``scripts/prepare.py`` and its package ``scripts/prepare/``).

Tiny fake sources are built in each dataset's published format (CREMI HDF5 with uint64 cleft
ids, Guay uint16 TIFF stacks, Kasthuri++/Lucchi++ per-slice PNGs, Perez PNG folders, UroCell
NIfTI volumes, CEM500K patches). Every sub-command runs once as ``__main__`` in a child process, all
at the same time. Importing ``custom.io`` (MONAI) costs several seconds per interpreter, so one
run starts a fresh interpreter (the command a user types) and the others are forked from
this process, which has imported it already. The remaining checks run in-process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from custom.io import DatasetError, pair_images_labels, read_em, write_em
from scripts.prepare import (
    CREMI_BACKGROUND_ID,
    OptionError,
    Reporter,
    binary_mask,
    check_cem500k,
    class_indices,
    cremi_cleft_mask,
    holdout_count,
    holdout_indices,
    image_to_uint8,
    prepare_cremi,
    prepare_guay,
    prepare_kasthuri,
    prepare_perez,
    prepare_urocell,
)
from tests.helpers import REPO

SCRIPTS = REPO / "scripts"
BG = np.uint64(CREMI_BACKGROUND_ID)
QUIET = Reporter("test", quiet=True)


# --------------------------------------------------------------------------------------
# fake sources in the published formats
# --------------------------------------------------------------------------------------
def make_cremi(root: Path, shape=(10, 20, 24)) -> dict[str, np.ndarray]:
    """sample_{A,B,C}_20160501.hdf as on cremi.org, plus a label-less padded test sample."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    truth = {}
    for i, s in enumerate("ABC"):
        raw = rng.integers(0, 256, shape, dtype=np.uint8)
        clefts = np.full(shape, BG, dtype=np.uint64)
        clefts[2:5, 4:8, 4 + i : 10 + i] = 7 + i
        clefts[-1, 1:3, 1:3] = 0  # id 0 is a cleft too; only 0xffffffffffffffff is background
        with h5py.File(root / f"sample_{s}_20160501.hdf", "w") as f:
            f.create_dataset("volumes/raw", data=raw).attrs["resolution"] = [40.0, 4.0, 4.0]
            f.create_dataset("volumes/labels/clefts", data=clefts)
        truth[s] = (raw, (clefts != BG).astype(np.uint8))
    with h5py.File(root / "sample_A+_20160601.hdf", "w") as f:
        f.create_dataset("volumes/raw", data=np.zeros((2, 4, 4), np.uint8))
    return truth


def make_guay(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """platelet_data/{train,eval,test}-{images,labels}.tif (uint16) + train-error-weights.tif."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    out = {}
    for split, z in (("train", 8), ("eval", 3), ("test", 4)):
        img = rng.integers(1000, 40000, (z, 20, 24), dtype=np.uint16)
        lab = rng.integers(0, 7, (z, 20, 24), dtype=np.uint16)
        tifffile.imwrite(root / f"{split}-images.tif", img, photometric="minisblack")
        tifffile.imwrite(root / f"{split}-labels.tif", lab, photometric="minisblack")
        out[split] = (img, lab)
    tifffile.imwrite(root / "train-error-weights.tif", np.ones((8, 20, 24), np.float32))
    return out


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_slices(root: Path, n_train=10, n_test=3, lucchi=False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Kasthuri++ (RGB 0/255 masks with padding value 37, same names) or Lucchi++ (gray masks
    named by slice number, images named mask0000.png) in Train_In/Train_Out/Test_In/Test_Out."""
    rng = np.random.default_rng(3)
    out = {}
    for split, n in (("Train", n_train), ("Test", n_test)):
        imgs = rng.integers(0, 256, (n, 20, 24), dtype=np.uint8)
        fg = np.zeros((n, 20, 24), bool)
        fg[:, 5:12, 6:15] = True
        masks = np.where(fg, 255, 0).astype(np.uint8)
        masks[:, :, -3:] = 37  # padding: not foreground
        for i in range(n):
            if lucchi:
                _png(root / f"{split}_In" / f"mask{i:04d}.png", imgs[i])
                _png(root / f"{split}_Out" / f"{i}.png", masks[i])
            else:
                _png(root / f"{split}_In" / f"slice{i:03d}.png", imgs[i])
                _png(root / f"{split}_Out" / f"slice{i:03d}.png", np.repeat(masks[i][..., None], 3, axis=-1))
        out[split.lower()] = (imgs, fg.astype(np.uint8))
    return out


def make_perez(root: Path, tasks=("lysosomes", "mitochondria", "nuclei", "nucleoli"), n_train=5, n_test=2):
    """supplemental_data/{training_images,training_labels,test_images,ground_truth}/<task>/ with
    differently prefixed names (<task>_orig.<n>.png vs <task>_gt.<n>.png) and image sizes."""
    rng = np.random.default_rng(4)
    base = root / "supplemental_data"
    truth = {}
    for task in tasks:
        for img_dir, lab_dir, n in (("training_images", "training_labels", n_train), ("test_images", "ground_truth", n_test)):
            for i in range(n):
                h, w = 16 + 2 * i, 20 + i
                img = rng.integers(0, 256, (h, w), dtype=np.uint8)
                mask = np.zeros((h, w), np.uint8)
                mask[3:9, 4:10] = 255
                _png(base / img_dir / task / f"{task}_orig.{100 + i}.png", img)
                _png(base / lab_dir / task / f"{task}_gt.{100 + i}.png", mask)
                truth[(task, img_dir, 100 + i)] = (img, (mask == 255).astype(np.uint8))
    return truth


def make_urocell(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """UroCell/{data,lyso,mito}/<name>.nii.gz (float images 0-255, binary label volumes)."""
    rng = np.random.default_rng(5)
    truth = {}
    for name, shape in (("fib1-0-0-0", (6, 30, 16)), ("fib1-1-0-3", (10, 60, 16)), ("fib1-3-2-1", (10, 24, 16))):
        img = rng.integers(0, 256, shape).astype(np.float32)
        lyso = np.zeros(shape, np.uint8)
        mito = np.zeros(shape, np.uint8)
        lyso[:, -8:-4, 2:6] = 1
        mito[:, -6:-2, 8:12] = 1
        mito[:, -8:-7, 3:4] = 1  # overlaps a lysosome: mitochondrion wins
        write_em(root / "data" / f"{name}.nii.gz", img)
        write_em(root / "lyso" / f"{name}.nii.gz", lyso)
        write_em(root / "mito" / f"{name}.nii.gz", mito)
        lab = np.where(mito > 0, 2, lyso).astype(np.uint8)
        truth[name] = (np.rint(img).astype(np.uint8), lab)
    write_em(root / "data" / "fib1-2-0-0.nii.gz", np.zeros((4, 8, 8), np.float32))  # unlabelled: skipped
    return truth


def make_cem500k(root: Path, corrupt: bool = False) -> None:
    rng = np.random.default_rng(6)
    (root / "a").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        tifffile.imwrite(root / "a" / f"patch{i}.tiff", rng.integers(0, 256, (224, 224), dtype=np.uint8))
    _png(root / "b" / "small.png", rng.integers(0, 256, (100, 120), dtype=np.uint8))
    if corrupt:
        (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


# --------------------------------------------------------------------------------------
# every script once, in subprocesses started together
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepare")
    truth = {
        "cremi": make_cremi(tmp / "src_cremi" / "3d"),
        "guay": make_guay(tmp / "src_guay" / "platelet_data"),
        "kasthuri": make_slices(tmp / "src_kasthuri" / "Kasthuri++"),
        "perez": make_perez(tmp / "src_perez", tasks=("mitochondria", "nucleoli")),
        "urocell": make_urocell(tmp / "src_urocell" / "UroCell"),
    }
    make_cem500k(tmp / "src_cem500k")
    (tmp / "src_wrong").mkdir()
    (tmp / "src_wrong" / "readme.txt").write_text("not a dataset")
    jobs = {
        "cremi": ["prepare.py", "cremi", tmp / "src_cremi", tmp / "out_cremi"],
        "guay": ["prepare.py", "guay", tmp / "src_guay", tmp / "out_guay"],
        "kasthuri": ["prepare.py", "kasthuri", tmp / "src_kasthuri", tmp / "out_kasthuri"],
        "perez": ["prepare.py", "perez", tmp / "src_perez", tmp / "out_perez", "--tasks", "mito,nucleoli", "--val_fraction", "0.4"],
        "urocell": ["prepare.py", "urocell", tmp / "src_urocell", tmp / "out_urocell", "--val_fraction", "0.2"],
        "cem500k": ["prepare.py", "cem500k", tmp / "src_cem500k", "--file_list", tmp / "cem_list.txt", "--relative"],
        "wrong": ["prepare.py", "guay", tmp / "src_wrong", tmp / "out_wrong"],
    }
    cold = "cremi"  # a fresh `python scripts/prepare.py cremi ...`, exactly as a user runs it
    fork = "fork" in multiprocessing.get_all_start_methods()
    procs = {}
    for k, v in jobs.items():
        argv = [str(SCRIPTS / v[0]), *map(str, v[1:])]
        if k == cold or not fork:
            procs[k] = subprocess.Popen([sys.executable, *argv], cwd=tmp, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        else:
            out, err = tmp / f"{k}.stdout", tmp / f"{k}.stderr"
            proc = multiprocessing.get_context("fork").Process(target=_run_script, args=(argv, out, err))
            proc.start()
            procs[k] = (proc, out, err)
    results = {}
    for k, p in procs.items():
        if isinstance(p, subprocess.Popen):
            try:
                out, err = p.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                err += "\n(timed out)"
            results[k] = {"rc": p.returncode, "stdout": out, "stderr": err}
        else:
            proc, out, err = p
            proc.join(timeout=240)
            timed_out = proc.is_alive()
            if timed_out:
                proc.kill()
                proc.join()
            results[k] = {"rc": proc.exitcode, "stdout": out.read_text(),
                          "stderr": err.read_text() + ("\n(timed out)" if timed_out else "")}
    return {"tmp": tmp, "truth": truth, "results": results}


def _run_script(argv: list[str], out: Path, err: Path) -> None:
    """Child-process body: run a script file as ``__main__`` with ``argv``, output to files,
    exit with the script's status."""
    code = 0
    with open(out, "w") as fo, open(err, "w") as fe:
        sys.stdout, sys.stderr = fo, fe
        sys.argv = list(argv)
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=fe)
        except BaseException:
            traceback.print_exc(file=fe)
            code = 1
        fo.flush()
        fe.flush()
    os._exit(code)


def _ok(runs, key) -> Path:
    r = runs["results"][key]
    assert r["rc"] == 0, f"{key} failed:\n{r['stdout']}\n{r['stderr']}"
    return runs["tmp"] / f"out_{key}"


def _meta(dst: Path) -> dict:
    return json.loads((dst / "dataset.json").read_text())


def _layout(dst: Path) -> dict[str, list[str]]:
    """{split: sorted image names}, checking that labels mirror images."""
    out = {}
    for split in ("train", "val", "test"):
        if (dst / split).exists():
            imgs = sorted(p.name for p in (dst / split / "images").iterdir())
            labs = sorted(p.name for p in (dst / split / "labels").iterdir())
            assert imgs == labs, split
            out[split] = imgs
    return out


def _pair(dst: Path, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    img, lab = read_em(dst / split / "images" / name), read_em(dst / split / "labels" / name)
    assert img.dtype == np.uint8 and lab.dtype == np.uint8 and img.shape == lab.shape
    return img, lab


def test_cremi_script(runs):
    dst = _ok(runs, "cremi")
    truth = runs["truth"]["cremi"]
    assert _layout(dst) == {"train": ["sample_A.tif", "sample_B.tif"], "val": ["sample_A.tif", "sample_B.tif"],
                            "test": ["sample_C.tif"]}
    for s in "AB":
        img, lab = _pair(dst, "train", f"sample_{s}.tif")
        vimg, vlab = _pair(dst, "val", f"sample_{s}.tif")
        assert img.shape == (9, 20, 24) and vimg.shape == (1, 20, 24)  # last 10% of the sections
        np.testing.assert_array_equal(np.concatenate([img, vimg]), truth[s][0])
        np.testing.assert_array_equal(np.concatenate([lab, vlab]), truth[s][1])
    img, lab = _pair(dst, "test", "sample_C.tif")
    np.testing.assert_array_equal(lab, truth["C"][1])
    assert set(np.unique(lab)) == {0, 1} and lab[-1, 1, 1] == 1  # id 0 is a cleft
    meta = _meta(dst)
    assert meta["num_classes"] == 1 and meta["label_names"] == {"0": "background", "1": "synaptic cleft"}
    assert meta["iterations"] == 2000 and meta["planes"] == "xy" and meta["class_weights"] is None
    assert meta["dataset_dir"] == str(dst)
    train = np.concatenate([truth[s][0][:9] for s in "AB"]).astype(np.float64) / 255
    assert meta["intensity_mean"] == pytest.approx(train.mean(), abs=1e-7)
    assert meta["intensity_std"] == pytest.approx(train.std(), abs=1e-7)
    info = meta["dataset_info"]
    assert info["files"]["val"][0]["sections"] == [9, 10] and info["files"]["train"][0]["resolution_nm"] == [40, 4, 4]
    out = runs["results"]["cremi"]["stdout"]
    assert "clefts: 10/10" in out and "train with:" in out and str(dst / "dataset.json") in out  # progress, hint


def test_guay_script(runs):
    dst = _ok(runs, "guay")
    truth = runs["truth"]["guay"]
    assert _layout(dst) == {"train": ["guay_train.tif"], "val": ["guay_eval.tif"], "test": ["guay_test.tif"]}
    img, lab = _pair(dst, "train", "guay_train.tif")
    src_img, src_lab = truth["train"]
    assert img.min() == 0 and img.max() == 255  # uint16 rescaled by the volume's min and max
    expected = np.rint((src_img.astype(np.float64) - src_img.min()) * 255 / (src_img.max() - src_img.min()))
    assert np.abs(img.astype(np.int32) - expected).max() <= 1
    np.testing.assert_array_equal(lab, src_lab)
    meta = _meta(dst)
    assert meta["num_classes"] == 7 and len(meta["label_names"]) == 7
    assert meta["class_weights"] == [0.1, 0.1, 1, 1, 0.1, 3, 3] and meta["eval_classes"] == [2, 3, 4, 5, 6]
    assert meta["iterations"] == 2500 and meta["planes"] == "xy" and meta["noise_prob"] > 0


def test_kasthuri_script(runs):
    dst = _ok(runs, "kasthuri")
    truth = runs["truth"]["kasthuri"]
    names = _layout(dst)
    assert names == {"train": ["kasthuri_pp_train.tif"], "val": ["kasthuri_pp_train.tif"], "test": ["kasthuri_pp_test.tif"]}
    img, lab = _pair(dst, "train", "kasthuri_pp_train.tif")
    vimg, vlab = _pair(dst, "val", "kasthuri_pp_train.tif")
    assert img.shape == (9, 20, 24) and vimg.shape == (1, 20, 24)
    np.testing.assert_array_equal(np.concatenate([lab, vlab]), truth["train"][1])  # 255 -> 1, padding 37 -> 0
    np.testing.assert_array_equal(np.concatenate([img, vimg]), truth["train"][0])
    meta = _meta(dst)
    assert meta["iterations"] == 10000 and meta["num_classes"] == 1 and meta["dataset_info"]["dataset"] == "kasthuri_pp"
    assert "padding" in runs["results"]["kasthuri"]["stderr"]  # the padding values were reported


def test_perez_script(runs):
    out = _ok(runs, "perez")
    truth = runs["truth"]["perez"]
    assert sorted(p.name for p in out.iterdir()) == ["mitochondria", "nucleoli"]
    for task in ("mitochondria", "nucleoli"):
        dst = out / task
        names = _layout(dst)
        assert len(names["train"]) == 3 and len(names["val"]) == 2 and len(names["test"]) == 2  # 40% of 5, spread
        assert all(n.endswith(".png") for n in names["train"])
        img, lab = _pair(dst, "test", f"{task}_orig.101.png")
        np.testing.assert_array_equal(img, truth[(task, "test_images", 101)][0])
        np.testing.assert_array_equal(lab, truth[(task, "test_images", 101)][1])
        meta = _meta(dst)
        assert meta["num_classes"] == 1 and meta["iterations"] == 2500 and meta["dataset_dir"] == str(dst)
        assert meta["dataset_info"]["task"] == task
    assert "mitochondria" in runs["results"]["perez"]["stdout"]


def test_urocell_script(runs):
    dst = _ok(runs, "urocell")
    truth = runs["truth"]["urocell"]
    assert _layout(dst) == {"train": ["fib1-1-0-3.tif", "fib1-3-2-1.tif"], "val": ["fib1-1-0-3.tif", "fib1-3-2-1.tif"],
                            "test": ["fib1-0-0-0.tif"]}
    img, lab = _pair(dst, "test", "fib1-0-0-0.tif")
    np.testing.assert_array_equal(img, truth["fib1-0-0-0"][0][:, 12:])  # 12 rows of missing data dropped
    np.testing.assert_array_equal(lab, truth["fib1-0-0-0"][1][:, 12:])
    assert set(np.unique(lab)) == {0, 1, 2}
    img, lab = _pair(dst, "train", "fib1-1-0-3.tif")
    assert img.shape == (8, 6, 16)  # 60 - 54 rows; 2 of 10 sections to val
    meta = _meta(dst)
    assert meta["planes"] == "orthoplane" and meta["num_classes"] == 3 and meta["class_weights"] == [0.1, 1, 1]
    assert meta["eval_classes"] == [1, 2] and meta["iterations"] == 1000
    assert meta["label_names"] == {"0": "background", "1": "lysosome", "2": "mitochondrion"}
    assert "fib1-2-0-0" not in json.dumps(meta["dataset_info"]["files"])


def test_cem500k_script(runs):
    r = runs["results"]["cem500k"]
    assert r["rc"] == 0, r["stderr"]
    lines = (runs["tmp"] / "cem_list.txt").read_text().splitlines()
    assert sorted(lines) == ["a/patch0.tiff", "a/patch1.tiff", "a/patch2.tiff", "b/small.png"]
    assert "not 224x224" in r["stderr"]


def test_wrong_source_is_one_line_error(runs):
    r = runs["results"]["wrong"]
    assert r["rc"] == 1
    err = r["stderr"].strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("prepare_guay: error:") and "train-images.tif" in err and "readme.txt" in err
    assert not (runs["tmp"] / "out_wrong").exists()


def test_prepared_dataset_overlays_the_bundle_config(runs):
    """dataset.json merged after the bundle's train.json sets the dataset's entries, and the
    bundle's own pairing and validation accept the written layout."""
    train_json = REPO / "bundles" / "retina_finetune" / "configs" / "train.json"
    if not train_json.is_file():
        pytest.skip("retina_finetune bundle not present")
    from monai.bundle import ConfigParser

    for dst in (_ok(runs, "guay"), _ok(runs, "urocell"), _ok(runs, "perez") / "nucleoli"):
        meta = _meta(dst)
        parser = ConfigParser(ConfigParser.load_config_files([str(train_json), str(dst / "dataset.json")]))
        for key in ("num_classes", "class_weights", "planes", "intensity_mean", "iterations", "eval_classes"):
            assert parser.get_parsed_content(key) == meta[key]
        classes = parser.get_parsed_content("label_classes")
        items = parser.get_parsed_content("train_items") + parser.get_parsed_content("val_items")
        assert len(items) == len(meta["dataset_info"]["files"]["train"]) + len(meta["dataset_info"]["files"]["val"])
        from custom.io import validate_items

        validate_items(items, num_classes=classes)


# --------------------------------------------------------------------------------------
# in-process: conversions, splits, errors
# --------------------------------------------------------------------------------------
def test_holdout_is_deterministic_and_bounded():
    assert [holdout_count(n, 0.1) for n in (0, 1, 2, 10, 15, 125)] == [0, 0, 1, 1, 2, 13]
    assert holdout_count(10, 0.0) == 0 and holdout_count(3, 0.9) == 2
    assert holdout_indices(10, 0.2) == [8, 9]
    assert holdout_indices(10, 0.3, "spread") == [1, 5, 8]
    assert holdout_indices(5, 0.4, "spread") == [1, 3]
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(OptionError):
            holdout_count(10, bad)


def test_pixel_conversions():
    m, odd = binary_mask(np.array([[0, 255, 37], [255, 0, 1]], np.uint8))
    assert m.tolist() == [[0, 1, 0], [1, 0, 0]] and odd == 2
    assert binary_mask(np.array([[0, 1]], np.uint8))[0].tolist() == [[0, 1]]
    with pytest.raises(DatasetError):
        binary_mask(np.array([[-1, 0]], np.int16), "m.png")
    ids = np.array([BG, 0, 5], np.uint64)
    assert cremi_cleft_mask(ids).tolist() == [0, 1, 1]
    assert cremi_cleft_mask(ids.view(np.int64)).tolist() == [0, 1, 1]  # background reads as -1 when signed
    with pytest.raises(DatasetError, match="64-bit"):
        cremi_cleft_mask(np.array([0, 1], np.uint32))
    u8, how = image_to_uint8(np.array([[100, 300]], np.uint16))
    assert u8.tolist() == [[0, 255]] and "min-max" in how
    assert image_to_uint8(np.array([[0.0, 0.5, 1.0]], np.float32))[0].tolist() == [[0, 128, 255]]
    assert image_to_uint8(np.array([[0.0, 17.4, 200.0]], np.float32))[0].tolist() == [[0, 17, 200]]
    assert class_indices(np.array([0, 6], np.uint16), 7).dtype == np.uint8
    with pytest.raises(DatasetError, match="0..6"):
        class_indices(np.array([0, 7], np.uint16), 7, "train-labels.tif")


def test_lucchi_pairs_by_slice_number_and_writes_slices(tmp_path):
    truth = make_slices(tmp_path / "Lucchi++", n_train=4, n_test=2, lucchi=True)
    meta = prepare_kasthuri(tmp_path / "Lucchi++", tmp_path / "out", stack=False, val_fraction=0.25, reporter=QUIET)
    names = _layout(tmp_path / "out")
    assert names == {"train": ["mask0000.png", "mask0001.png", "mask0002.png"], "val": ["mask0003.png"],
                     "test": ["mask0000.png", "mask0001.png"]}
    img, lab = _pair(tmp_path / "out", "val", "mask0003.png")
    np.testing.assert_array_equal(lab, truth["train"][1][3])
    assert meta["dataset_info"]["dataset"] == "lucchi_pp" and "iterations" not in meta  # not a RETINA benchmark
    assert pair_images_labels(tmp_path / "out" / "train" / "images", tmp_path / "out" / "train" / "labels")


def test_existing_output_needs_overwrite_and_must_not_overlap_source(tmp_path):
    make_slices(tmp_path / "src" / "Kasthuri++", n_train=3, n_test=1)
    prepare_kasthuri(tmp_path / "src", tmp_path / "out", reporter=QUIET)
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="--overwrite"):
        prepare_kasthuri(tmp_path / "src", tmp_path / "out", reporter=QUIET)
    prepare_kasthuri(tmp_path / "src", tmp_path / "out", overwrite=True, val_fraction=0, reporter=QUIET)
    assert not (tmp_path / "out" / "val").exists() and (tmp_path / "out" / "keep.txt").exists()
    (tmp_path / "out" / ".prepare-incomplete").write_text("")  # as an interrupted run leaves it
    prepare_kasthuri(tmp_path / "src", tmp_path / "out", reporter=QUIET)  # replaced without --overwrite
    assert not (tmp_path / "out" / ".prepare-incomplete").exists() and (tmp_path / "out" / "val").exists()
    with pytest.raises(DatasetError, match="outside the source"):
        prepare_kasthuri(tmp_path / "src", tmp_path / "src" / "prepared", reporter=QUIET)


def test_wrong_sources_name_what_was_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (prepare_cremi, "sample_A_20160501.hdf"),
        (prepare_guay, "train-images.tif"),
        (prepare_kasthuri, "Train_In"),
        (prepare_perez, "training_images"),
        (prepare_urocell, "lyso/<name>.nii.gz"),
    ]
    for fn, expected in cases:
        with pytest.raises(DatasetError) as e:
            fn(empty, tmp_path / "out", reporter=QUIET)
        assert expected in str(e.value) and "\n" not in str(e.value), fn.__name__
    with pytest.raises(DatasetError, match="no such folder"):
        prepare_cremi(tmp_path / "missing", tmp_path / "out", reporter=QUIET)
    assert not (tmp_path / "out").exists()


def test_guay_without_eval_volume_holds_out_sections(tmp_path):
    truth = make_guay(tmp_path / "platelet_data")
    for name in ("eval-images.tif", "eval-labels.tif"):
        (tmp_path / "platelet_data" / name).unlink()
    meta = prepare_guay(tmp_path / "platelet_data", tmp_path / "out", val_fraction=0.25, reporter=QUIET)
    assert _layout(tmp_path / "out") == {"train": ["guay_train.tif"], "val": ["guay_train.tif"], "test": ["guay_test.tif"]}
    _, vlab = _pair(tmp_path / "out", "val", "guay_train.tif")
    np.testing.assert_array_equal(vlab, truth["train"][1][6:])
    assert meta["dataset_info"]["files"]["val"][0]["sections"] == [6, 8]
    (tmp_path / "platelet_data" / "train-labels.tif").unlink()
    with pytest.raises(DatasetError, match="partner is missing"):
        prepare_guay(tmp_path / "platelet_data", tmp_path / "out2", reporter=QUIET)


def test_cremi_sample_without_clefts_and_missing_sample(tmp_path):
    src = tmp_path / "cremi"
    make_cremi(src, shape=(3, 8, 8))
    with pytest.raises(DatasetError, match="sample.s. C"):
        (src / "sample_C_20160501.hdf").unlink()
        prepare_cremi(src, tmp_path / "out", reporter=QUIET)
    with h5py.File(src / "sample_C_20160501.hdf", "w") as f:
        f.create_dataset("volumes/raw", data=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match="volumes/labels/clefts"):
        prepare_cremi(src, tmp_path / "out2", reporter=QUIET)


def test_perez_empty_masks_are_an_error(tmp_path):
    """A mask convention that yields no foreground at all must not silently train on nothing."""
    make_perez(tmp_path / "src", tasks=("nuclei",), n_train=2, n_test=0)
    for p in (tmp_path / "src" / "supplemental_data" / "training_labels" / "nuclei").iterdir():
        _png(p, np.where(np.asarray(Image.open(p)) > 0, 128, 0).astype(np.uint8))
    with pytest.raises(DatasetError, match="no training label holds a foreground"):
        prepare_perez(tmp_path / "src", tmp_path / "out", tasks="nuclei", reporter=QUIET)


def test_cem500k_counts_unreadable_files(tmp_path):
    make_cem500k(tmp_path, corrupt=True)
    s = check_cem500k(tmp_path, file_list=tmp_path / "list.txt", reporter=QUIET)
    assert s["files"] == 5 and s["ok"] == 3 and s["unreadable"] == 1
    assert s["size_counts"] == {"224x224": 3, "100x120": 1}
    assert len((tmp_path / "list.txt").read_text().splitlines()) == 4
