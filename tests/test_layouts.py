"""Data read as meant, continuing from a bundle's own weights, one resume checkpoint, overlays without code,
the README's evaluate command.

- Layouts (``custom.io``): ``(H, W, 1)`` is a 2D image, ``(Z, Y, X, 1)`` a volume, ``(1, Y, X)`` a
  one-slice volume; an HDF5 file with several datasets and none of the known names is refused with
  their names and the override (``--h5_image_key`` / ``"image_key"``), never guessed; training labels
  without any foreground are refused (``custom.io.check_foreground``).
- MONAI Label serving ``retina_finetune`` alone (no ``../retina_pretrain``): training continues from the
  bundle's ``models/model.pt`` (``custom.checkpoints.continues_from``), emulated with the overrides MONAI
  Label 0.8.5's ``BundleTrainTask`` passes to ``monai.bundle.run`` in-process.
- A resumed training keeps one resume checkpoint (``custom.handlers.prune_checkpoints``).
- A config overlay from a dataset folder holding code is refused before it runs (``custom.overlays``).

Bundle runs go through ``python -m monai.bundle run`` from the bundle folder (the forked runner
``tests.helpers.run_forked`` for the quick ones), tiny preset, every output under ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from custom import io as D
from custom.io import DatasetError
from custom.synthetic import em_volume
from tests.helpers import (
    FT,
    PRE,
    REPO,
    TRAIN,
    assert_one_line,
    bundle_cmd,
    bundle_env,
    run_forked,
    tail,
    wait_for,
    write_labelled,
    write_tiny_checkpoint,
)

RNG = np.random.default_rng(1)
VOL = RNG.integers(0, 256, (4, 10, 13), dtype=np.uint8)  # (Z, Y, X), all sides distinct


# ------------------------------------------------------------------------------------------
# layouts, in-process


def test_trailing_singleton_axis_is_a_channel(tmp_path):
    """(H, W, 1) reads as the 2D image (H, W) (it used to be H slices of W x 1 pixels); (Z, Y, X, 1) as
    the volume, with the same partial slice reads; (1, Y, X) stays a one-slice volume."""
    img = VOL[0]
    tifffile.imwrite(tmp_path / "hw1.tif", img[..., None], photometric="minisblack")
    with h5py.File(tmp_path / "hw1.h5", "w") as f:
        f["raw"] = img[..., None]
    for name in ("hw1.tif", "hw1.h5"):
        assert D.em_shape(tmp_path / name) == (10, 13)
        np.testing.assert_array_equal(D.read_em(tmp_path / name), img)
        assert D.slice_items([tmp_path / name]) == [{"image": str(tmp_path / name), "plane": "xy", "index": -1}]

    with h5py.File(tmp_path / "zyx1.h5", "w") as f:
        f["raw"] = VOL[..., None]
    with h5py.File(tmp_path / "1zyx1.h5", "w") as f:
        f["raw"] = VOL[None, ..., None]
    tifffile.imwrite(tmp_path / "1yx1.tif", img[None, ..., None], photometric="minisblack")
    for name in ("zyx1.h5", "1zyx1.h5"):
        path = tmp_path / name
        assert D.em_shape(path) == VOL.shape
        np.testing.assert_array_equal(D.read_em(path), VOL)
        for plane, axis in (("xy", 0), ("xz", 1), ("yz", 2)):
            for i in (0, VOL.shape[axis] - 1):
                np.testing.assert_array_equal(D.read_em_slice(path, plane, i), np.take(VOL, i, axis=axis))

    # (1, Y, X): a one-slice volume (a single-section stack), as a 2D NIfTI stored (x, y, 1) reads
    for path, arr in ((tmp_path / "1yx.tif", img[None]), (tmp_path / "1yx1.tif", None)):
        if arr is not None:
            tifffile.imwrite(path, arr, photometric="minisblack")
        assert D.em_shape(path) == (1, 10, 13)
        np.testing.assert_array_equal(D.read_em(path), img[None])
    nib.save(nib.Nifti1Image(img.T[..., None], np.eye(4)), tmp_path / "xy1.nii.gz")
    assert D.read_em(tmp_path / "xy1.nii.gz").shape == (1, 10, 13)
    # an image saved channel-last pairs with its 2D label
    D.validate_items([{"image": tmp_path / "hw1.tif", "label": D.write_em(tmp_path / "lab.png", (img > 99).astype(np.uint8))}])


def _h5(path: Path, **datasets) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


def test_hdf5_with_several_unknown_datasets_is_refused_not_guessed(tmp_path):
    """Datasets ``volume`` and ``label``: the label is not taken as the image (the file's first dataset,
    as before); the message lists the datasets and names both overrides."""
    lab = (VOL > 128).astype(np.uint8)
    path = _h5(tmp_path / "a.h5", volume=VOL, label=lab)
    with pytest.raises(DatasetError) as err:
        D.em_shape(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: HDF5 file holds 2 datasets (label, volume) and none has a known image name (raw,")
    assert "--h5_image_key volume (retina_finetune)" in msg and '"image_key": "volume"' in msg and "\n" not in msg
    np.testing.assert_array_equal(D.read_em(path, role="label"), lab)  # "label" is a known label name
    np.testing.assert_array_equal(D.read_em(path, "volume"), VOL)
    np.testing.assert_array_equal(D.read_em(_h5(tmp_path / "one.h5", volume=VOL)), VOL)  # one dataset: that one
    with pytest.raises(DatasetError, match=r"none has a known label name .*--h5_label_key seg2"):
        D.read_em(_h5(tmp_path / "b.h5", raw=VOL, seg2=lab), role="label")
    # the overrides: an item's "<key>_key", validate_items(h5_keys=...), pair_images_labels(h5 keys)
    D.validate_items([{"image": path, "image_key": "volume", "label": path}], num_classes=2)
    D.validate_items([{"image": path, "label": path}], num_classes=2, h5_keys={"image": "volume"})
    with pytest.raises(DatasetError, match="choose the image dataset"):
        D.validate_items([{"image": path, "label": path}])
    for folder, arr in (("im", VOL), ("lb", lab)):
        (tmp_path / folder).mkdir()
        os.link(path, tmp_path / folder / "a.h5")
        D.write_em(tmp_path / folder / "b.tif", arr)
    items = D.pair_images_labels(tmp_path / "im", tmp_path / "lb", "volume", None)
    assert items == [{"image": str(tmp_path / "im" / "a.h5"), "label": str(tmp_path / "lb" / "a.h5"), "image_key": "volume"},
                     {"image": str(tmp_path / "im" / "b.tif"), "label": str(tmp_path / "lb" / "b.tif")}]
    D.validate_items(items, num_classes=2)
    assert len(D.slice_items(items)) == 2 * VOL.shape[0]


def test_check_foreground(tmp_path):
    empty = [D.write_em(tmp_path / "l" / f"v{i}.tif", np.zeros((2, 8, 8), np.uint8)) for i in range(2)]
    items = [{"image": p, "label": p, "plane": "xy", "index": z} for p in empty for z in range(2)]
    with pytest.raises(DatasetError) as err:
        D.check_foreground(items)
    assert str(err.value) == (f"{tmp_path / 'l'}: no training label holds a foreground class (all 256 pixels of 2 file(s) "
                              "are 0); label the foreground as class 1, 2, ... (0 is background)")
    full = D.write_em(tmp_path / "l" / "v9.tif", np.pad(np.ones((2, 2, 2), np.uint8), ((0, 0), (3, 3), (3, 3))))
    assert D.check_foreground([*items, {"image": full, "label": full}]) == 8
    assert D.check_foreground([{"image": full}]) == 0  # no labels: nothing to check


def test_prepared_dataset_json_is_plain_values(tmp_path):
    """What the preparation scripts write is an overlay the bundles accept: plain values only."""
    from custom.overlays import check_overlays, config_code
    from scripts.prepare import RECIPES, DatasetWriter

    img, lab = em_volume((2, 32, 32), seed=0)
    lab = (lab == 1).astype(np.uint8)
    writer = DatasetWriter(tmp_path / "dst", RECIPES["kasthuri_pp"], tmp_path / "src")
    writer.add("train", "$weird@name", img, lab, "/src/$weird@name.tif")
    writer.add("val", "v", img, lab, "/src/v.tif")
    config = writer.finish()
    assert config_code(json.loads((tmp_path / "dst" / "dataset.json").read_text())) == []
    assert check_overlays(["x", "run", "--config_file", f"['{FT}/configs/train.json','{tmp_path}/dst/dataset.json']"])
    assert config["dataset_info"]["files"]["train"][0]["name"] == "weird_name"
    # a record that would read as code is never written (a guard: sources are absolute paths)
    writer = DatasetWriter(tmp_path / "dst2", RECIPES["kasthuri_pp"], tmp_path / "src")
    writer.add("train", "a", img, lab, "/src/a.tif", note="$__import__('os')")
    with pytest.raises(DatasetError, match=r"dataset.json: a config file from outside .* dataset_info#files#train#0#note: a \$ expression"):
        writer.finish()
    assert not (tmp_path / "dst2" / "dataset.json").exists()


def test_config_code_finds_expressions_targets_and_file_macros(tmp_path, monkeypatch):
    from custom.overlays import OverlayError, check_overlays, config_code

    assert config_code({"a": 1, "b": ["@x", "%y", "plain $", {"c": None}], "d": "%train#postprocessing"}) == []
    found = config_code({"x": "$1+1", "l": [0, {"_target_": "os.system"}], "train#trainer#_target_": "exec",
                         "+m": f"%{tmp_path}/other.json::k"})
    assert [f.split(":")[0] for f in found] == ["x", "l#1#_target_", "train#trainer#_target_", "+m"], found
    overlay = tmp_path / "o.yaml"
    overlay.write_text("dataset_dir: /data\nnum_classes: $__import__('os').getpid()\n")
    argv = ["run", "--config_file", f"{FT}/configs/train.json,{overlay}"]  # MONAI's comma-separated form
    with pytest.raises(OverlayError, match=re.escape(f"{overlay}: a config file from outside the bundle's configs "
                                                     f"folder {FT / 'configs'} may hold plain values only")):
        check_overlays(argv)
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": [str(FT / "configs" / "train.json")], "network": "$None"}))
    with pytest.raises(OverlayError, match="network: a \\$ expression"):
        check_overlays(["run", "--args_file", str(args_file)])
    assert check_overlays(["monailabel", "start_server"])  # no bundle command line: MONAI Label in-process
    monkeypatch.setenv("RETINA_TRUSTED_CONFIGS", f"/nowhere{os.pathsep}{tmp_path}")  # the user's own overlays
    assert check_overlays(argv)
    assert check_overlays(["run", f"--config_file=['{FT}/configs/train.json','{FT}/configs/demo.json']"])


def test_prune_checkpoints_keeps_one_after_a_resume(tmp_path):
    """The saver of a resumed engine (epoch 1 already done by a killed process) keeps one interval
    checkpoint: the stale ``checkpoint_epoch=1.pt`` goes once ``checkpoint_epoch=2.pt`` is whole."""
    from ignite.engine import Engine

    from custom.handlers import AtomicCheckpointSaver, prune_checkpoints

    net = torch.nn.Linear(2, 2)
    torch.save({"model": net.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    (tmp_path / "previous_checkpoint_epoch=9.pt").write_bytes(b"x")
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net, "trainer": engine}, save_interval=1,
                          epoch_level=True, n_saved=1).attach(engine)
    engine.load_state_dict({"epoch": 1, "max_epochs": 3, "epoch_length": 2})
    engine.run(range(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt", "previous_checkpoint_epoch=9.pt"]
    for n in (1, 2, 5):
        (tmp_path / f"checkpoint_epoch={n}.pt").write_bytes(b"x")
    assert prune_checkpoints(tmp_path, score_name="epoch", n_saved=2, newest="checkpoint_epoch=3.pt") == [
        str(tmp_path / "checkpoint_epoch=2.pt"), str(tmp_path / "checkpoint_epoch=1.pt")]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_epoch=3.pt", "checkpoint_epoch=5.pt"]


# ------------------------------------------------------------------------------------------
# through the bundles (forked runner: quick refusals and short runs)


def _h5_pair(ds: Path) -> None:
    """images/vol0.h5 and labels/vol0.h5, each with datasets ``volume`` and ``label`` (one file per
    sample, as many HDF5 datasets come), and no file of the demo layout."""
    for split, seed in (("train", 0), ("val", 10)):
        img, lab = em_volume((3, 64, 64), seed=seed)
        for kind in ("images", "labels"):
            _h5(ds / split / kind / "vol0.h5", volume=img, label=(lab == 1).astype(np.uint8))


def _hw1(ds: Path) -> None:
    """2D images saved channel-last (H, W, 1), their labels (H, W) PNGs."""
    for split, seed in (("train", 0), ("val", 10)):
        img, lab = em_volume((1, 64, 64), seed=seed)
        (ds / split / "images").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(ds / split / "images" / "a.tif", img[0][..., None], photometric="minisblack")
        D.write_em(ds / split / "labels" / "a.png", (lab[0] == 1).astype(np.uint8))


def _empty_labels(ds: Path) -> None:
    write_labelled(ds)
    D.write_em(ds / "train" / "labels" / "vol0.tif", np.zeros((3, 64, 64), np.uint8))


SHORT = ["--iterations", 2, "--val_interval", 2, "--batch_size", 2, "--log_interval", 1]


def _ft(build, *extra):
    def setup(tmp: Path) -> list:
        ds = tmp / "ds"
        build(ds)
        return ["--bundle_root", tmp / "root", "--dataset_dir", ds, "--transfer", "none", *extra]
    return setup


MARKER = "code_ran"


def _overlay(tmp: Path, content: dict) -> Path:
    path = tmp / "ds" / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def _evil(tmp: Path) -> dict:
    return {"dataset_dir": f"$__import__('os').system('touch {tmp / MARKER}') or '{tmp / 'ds'}'", "transfer": "none"}


def _with_overlay(bundle_configs: list[str], content, *extra):
    """(configs, setup) of a run with ``tmp/ds/dataset.json`` (``content(tmp)``) listed last."""
    def setup(tmp: Path) -> tuple[str, list]:
        write_labelled(tmp / "ds")
        path = _overlay(tmp, content(tmp))
        configs = "[" + ",".join(repr(c) for c in [*bundle_configs, str(path)]) + "]"
        return configs, ["--bundle_root", tmp / "root", *extra]
    return setup


FT_TRAIN = ["configs/train.json", "configs/demo.json"]
JOBS = {
    # name: (bundle, configs or None for setup-given, setup, expected one-line fragments or None for rc 0)
    "h5_ambiguous": (FT, TRAIN, _ft(_h5_pair), lambda t: [
        "retina_finetune: dataset error: ", str(t / "ds" / "train" / "images" / "vol0.h5"),
        "2 datasets (label, volume)", "--h5_image_key volume"]),
    "h5_image_key": (FT, TRAIN, _ft(_h5_pair, "--h5_image_key", "volume", *SHORT), None),
    "channel_last_2d": (FT, TRAIN, _ft(_hw1, *SHORT), None),
    "no_foreground": (FT, TRAIN, _ft(_empty_labels), lambda t: [
        "retina_finetune: dataset error: ", f"{t / 'ds' / 'train' / 'labels' / 'vol0.tif'}: no training label holds a "
        "foreground class (all 12288 pixels of 1 file(s) are 0)"]),
    "overlay_code_train": (FT, None, _with_overlay(FT_TRAIN, _evil), lambda t: [
        "retina_finetune: config error: ", f"{t / 'ds' / 'dataset.json'}: a config file from outside the bundle's "
        f"configs folder {FT / 'configs'} may hold plain values only", "dataset_dir: a $ expression"]),
    "overlay_target_train": (FT, None, _with_overlay(FT_TRAIN, lambda t: {"network_def#_target_": "builtins.print"}),
                             lambda t: ["retina_finetune: config error: ", "network_def#_target_: a _target_ key"]),
    "overlay_code_evaluate": (FT, None, _with_overlay(["configs/train.json", "configs/evaluate.json", "configs/demo.json"],
                                                      _evil), lambda t: ["retina_finetune: config error: ", "a $ expression"]),
    "overlay_code_inference": (FT, None, _with_overlay(["configs/inference.json", "configs/demo.json"], _evil),
                               lambda t: ["retina_finetune: config error: ", "a $ expression"]),
    "overlay_code_pretrain": (PRE, None, _with_overlay(["configs/train.json", "configs/demo.json"], _evil),
                              lambda t: ["retina_pretrain: config error: ", "a $ expression"]),
    "overlay_code_pretrain_inference": (PRE, None, _with_overlay(["configs/inference.json", "configs/demo.json"], _evil),
                                        lambda t: ["retina_pretrain: config error: ", "a $ expression"]),
    "overlay_plain": (FT, None, _with_overlay(FT_TRAIN, lambda t: {"dataset_dir": str(t / "ds"), "transfer": "none",
                                                                   "num_classes": 1, "iterations": 2, "val_interval": 2,
                                                                   "label_names": {"0": "bg", "1": "not $code"}}),
                      None),
}


@pytest.fixture(scope="module")
def bundle_runs(request, tmp_path_factory) -> dict:
    names = [item.callspec.params["job"] for item in request.session.items
             if item.module.__name__ == __name__ and getattr(item, "callspec", None) and "job" in item.callspec.params]
    jobs, tmps = [], {}
    for name in names:
        bundle, configs, setup, _ = JOBS[name]
        tmps[name] = tmp = tmp_path_factory.mktemp(name)
        got = setup(tmp)
        configs, args = got if configs is None else (configs, got)
        jobs.append({"name": name, "bundle": bundle, "configs": configs, "args": args})
    results = run_forked(jobs, tmp_path_factory.mktemp("runner")) if jobs else {}
    return {n: (results[n], tmps[n]) for n in names}


@pytest.mark.parametrize("job", list(JOBS))
def test_bundle_run(job, bundle_runs):
    res, tmp = bundle_runs[job]
    expected = JOBS[job][3]
    if expected is None:
        assert res.returncode == 0, tail(res)
        assert (tmp / "root" / "models" / "model_final.pt").is_file(), tail(res)
        print(f"{job}: trained ({res.seconds:.0f} s)")
    else:
        first, *rest = expected(tmp)
        line = assert_one_line(res, first, *rest)
        print(f"{job} ({res.seconds:.0f} s): {line}")
    assert not (tmp / MARKER).exists(), "the overlay's expression ran"


# ------------------------------------------------------------------------------------------
# MONAI Label serving retina_finetune alone


def test_continue_from_the_bundles_own_weights(tmp_path, caplog):
    """No pretraining checkpoint, the bundle's models/model.pt present: the whole network comes from it
    (strictly), the transfer is skipped with one warning, freezing still applies; with the pretraining
    checkpoint present the transfer happens as before."""
    import logging

    from custom.checkpoints import (
        CheckpointError,
        continues_from,
        require_pretrained,
        transfer_pretrained,
    )
    from custom.networks import transunet_from_preset

    own = write_tiny_checkpoint(tmp_path / "models" / "model.pt", hidden_size=48, mlp_dim=96)  # not the default init
    missing = tmp_path / "retina_pretrain" / "model.pt"
    assert continues_from(missing, "encoder", own) == str(own)
    assert continues_from(missing, "none", own) is None and continues_from(missing, "encoder", None) is None
    assert require_pretrained(missing, "transformer", continue_from=own)
    with pytest.raises(CheckpointError, match=f"place weights to continue from at {tmp_path / 'nothing.pt'}, or pass"):
        require_pretrained(missing, "encoder", continue_from=tmp_path / "nothing.pt")
    with caplog.at_level(logging.INFO, logger="custom.checkpoints"):
        net = transfer_pretrained(transunet_from_preset("tiny", img_size=64, hidden_size=48, mlp_dim=96), missing,
                                  "encoder", "transformer", continue_from=own)
    saved = torch.load(own, weights_only=True)
    for k, v in net.state_dict().items():
        if k in saved:
            torch.testing.assert_close(v, saved[k], msg=k)
    assert not any(p.requires_grad for p in net.transformer.parameters())
    (record,) = [r for r in caplog.records if "continuing from" in r.getMessage()]
    assert record.levelno == logging.WARNING and str(own) in record.getMessage()
    with pytest.raises(CheckpointError, match="mismatching keys"):  # the bundle's weights must fit
        transfer_pretrained(transunet_from_preset("tiny", img_size=64), missing, continue_from=own)
    pre = write_tiny_checkpoint(missing, head="reconstruction")  # present: transferred, model.pt not used
    net = transfer_pretrained(transunet_from_preset("tiny", img_size=64), pre, continue_from=own)
    torch.testing.assert_close(net.state_dict()["cnn.root.conv.weight"], torch.load(pre, weights_only=True)["cnn.root.conv.weight"])


MONAILABEL_TRAIN = textwrap.dedent(
    r"""
    # What MONAI Label 0.8.5's BundleTrainTask does for POST /train/<model> on one device: read the
    # bundle's configs/train.json, put a CheckpointLoader of models/model.pt first in train#handlers
    # (strict False, load_dict {"model": "$@network"}), and call monai.bundle.run in-process with
    # overrides (bundle_root, train#trainer#max_epochs, train#dataset#data, device, train#handlers,
    # validate#dataset#data). Here bundle_root is a temporary folder beside no retina_pretrain; the
    # demo settings are overrides too (MONAI Label's users write them into the configs).
    import json, os, sys
    import monai.bundle
    from monai.bundle import ConfigParser

    bundle, root, items, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    train_json = os.path.join(bundle, "configs", "train.json")
    config = ConfigParser()
    config.read_config(train_json)
    handlers = config.get("train#handlers", [])
    model_pt = os.path.join(root, "models", "model.pt")
    if os.path.exists(model_pt):
        handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": model_pt, "load_dict": {"model": "$@network"},
                            "strict": False})
    overrides = {"bundle_root": root, "train#trainer#max_epochs": 1, "train#dataset#data": items[:-1], "device": "cpu",
                 "train#handlers": handlers, "validate#dataset#data": items[-1:], **extra}
    sys.path.insert(0, bundle)
    monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=os.path.join(bundle, "configs", "metadata.json"),
                     config_file=train_json, **overrides)
    print("MONAI Label: Training Finished....")
    """
)


def _monailabel_train(tmp: Path, with_model: bool) -> subprocess.CompletedProcess:
    ds = write_labelled(tmp / "ds", n_train=2, n_val=0)
    items = [{"image": str(p), "label": str(ds / "train" / "labels" / p.name)} for p in sorted((ds / "train" / "images").iterdir())]
    demo = json.loads((FT / "configs" / "demo.json").read_text())
    extra = {**demo, "iterations": 2, "val_interval": 2, "batch_size": 2, "log_interval": 1}
    if with_model:
        write_tiny_checkpoint(tmp / "root" / "models" / "model.pt", out_channels=1)
    return subprocess.run([sys.executable, "-c", MONAILABEL_TRAIN, str(FT), str(tmp / "root"), json.dumps(items),
                           json.dumps(extra)], cwd=tmp, env=bundle_env(), capture_output=True, text=True, timeout=300, check=False)


def test_monailabel_trains_the_bundle_alone_from_its_own_weights(tmp_path):
    """No ``../retina_pretrain``, a ``models/model.pt``: training continues from it (one log line), as
    MONAI Label asks; the weights it trained are written."""
    assert not (tmp_path / "retina_pretrain").exists()
    res = _monailabel_train(tmp_path, with_model=True)
    assert res.returncode == 0, tail(res)
    model_pt = tmp_path / "root" / "models" / "model.pt"
    lines = [line for line in res.stdout.splitlines() if "continuing from the bundle's own weights" in line]
    assert len(lines) == 1 and "pretrained checkpoint not found" in lines[0] and str(model_pt) in lines[0], tail(res)
    assert f"Restored all variables from {model_pt}" in res.stdout, tail(res)  # MONAI Label's own loader
    assert "MONAI Label: Training Finished...." in res.stdout
    assert (tmp_path / "root" / "models" / "model_final.pt").is_file()
    print(lines[0].split(" - ")[-1])


def test_monailabel_without_any_weights_fails_in_one_line(tmp_path):
    """Nothing to continue from and no pretraining checkpoint: one line, naming both ways out."""
    res = _monailabel_train(tmp_path, with_model=False)
    line = assert_one_line(res, "retina_finetune: checkpoint error: ", "pretrained checkpoint not found",
                           f"place weights to continue from at {tmp_path / 'root' / 'models' / 'model.pt'}",
                           "--transfer none")
    print(line)


# ------------------------------------------------------------------------------------------
# one resume checkpoint after a kill


def test_killed_and_resumed_training_keeps_one_resume_checkpoint(tmp_path):
    """SIGKILL after the first resume checkpoint, the same command again: it resumes, and
    ``eval/checkpoints`` ends with exactly one ``checkpoint_epoch=*.pt`` (the stale epoch-1 one used to stay)."""
    ds = write_labelled(tmp_path / "ds")
    root = tmp_path / "root"
    cmd = bundle_cmd(FT, TRAIN, "--bundle_root", root, "--dataset_dir", ds, "--transfer", "none", "--iterations", 12,
                      "--val_interval", 4, "--batch_size", 2, "--log_interval", 1)
    resume_dir = root / "eval" / "checkpoints"
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=FT, env=bundle_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: (resume_dir / "checkpoint_epoch=1.pt").is_file(), proc, 240, "first checkpoint")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert not (resume_dir / "checkpoint_epoch=3.pt").exists()
    res = subprocess.run(cmd, cwd=FT, env=bundle_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, tail(res)
    assert "Restored all variables from" in res.stdout, tail(res)
    assert sorted(p.name for p in resume_dir.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=3.pt"], \
        sorted(p.name for p in resume_dir.iterdir())


# ------------------------------------------------------------------------------------------
# the README's evaluate command


def _readme_command(marker: str) -> list[str]:
    """The README's command line (its "Your own data" block) that contains ``marker``, split like a shell."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Your own data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    (line,) = [ln for ln in block.splitlines() if marker in ln]
    return shlex.split(line, comments=True)


def test_readme_evaluate_command_runs(tmp_path):
    """Exactly the README's evaluate command (its --config_file list, --dataset_dir DATA --num_classes N),
    on a labelled demo folder, with a tiny model in ``models/model.pt``: the per-class tables are written."""
    argv = _readme_command("configs/evaluate.json")
    assert argv[:4] == ["python", "-m", "monai.bundle", "run"], argv
    assert argv[argv.index("--config_file") + 1] == "['configs/train.json','configs/evaluate.json']", argv
    num_classes = int(argv[argv.index("--num_classes") + 1])
    argv[argv.index("--dataset_dir") + 1] = str(write_labelled(tmp_path / "DATA"))
    write_tiny_checkpoint(tmp_path / "root" / "models" / "model.pt", out_channels=num_classes)
    cmd = [sys.executable, *argv[1:], "--bundle_root", str(tmp_path / "root"), "--preset", "tiny", "--crop_size", "64"]
    res = subprocess.run(cmd, cwd=FT, env=bundle_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, tail(res)
    out = tmp_path / "root" / "eval" / "evaluation"
    assert (out / "eval_summary.json").is_file(), sorted(p.name for p in out.iterdir()) if out.exists() else res.stdout[-3000:]
