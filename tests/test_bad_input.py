"""Bad input to both bundles (issue 6): one line before training, or a run that goes on.

Every bundle run goes through the users' entry point, ``python -m monai.bundle run`` started from
the bundle's folder, with the demo overrides (tiny preset, 64 px crops, one thread) and every
output under ``tmp_path`` (``--bundle_root``, ``--dataset_dir``, ``--output_dir``, ...).

A bad input must cost the user one line on stderr, ``<bundle>: <kind> error: <path>: <problem>``
(``custom.errors``), a non-zero exit status, no traceback, and no training iteration before it.
The bad-input cases are a table (:data:`CASES`, plus :data:`RUNS` for runs that must go on); the
ones selected for a session run in one module fixture, as forked children of a process that
imported MONAI once (``tests.helpers.run_forked``), 2 at a time. One bad-input case also runs in a
fresh interpreter.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from custom.io import write_em
from custom.networks import transunet_from_preset
from custom.synthetic import em_image, em_volume
from tests.helpers import (
    FT,
    INFER,
    IS_ROOT,
    PRE,
    TRAIN,
    UNREACHABLE,
    assert_one_line,
    error_lines,
    iterations,
    run_bundle,
    run_forked,
    tail,
    write_labelled,
    write_png,
    write_tiny_checkpoint,
    write_unlabelled,
)

# ------------------------------------------------------------------------------------------
# test data


class _Evil:
    """A pickle that runs code when loaded without ``weights_only``: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


# ------------------------------------------------------------------------------------------
# the table of bad inputs: each case builds its input under tmp and names the command


@dataclass
class Case:
    bundle: str  # "pretrain" | "finetune"
    configs: str
    setup: Callable[[Path], list]  # tmp -> extra command-line arguments
    kind: str  # error kind in the one line
    fragments: Callable[[Path], list] = lambda tmp: []
    unless_root: bool = False  # permissions do not stop root: skipped when the tests run as root
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    result: dict = field(default_factory=dict)


def _pre(*args):
    """Pretraining args with the outputs under tmp/root."""
    return lambda tmp: ["--bundle_root", tmp / "root", *args]


def _ds_pre(build: Callable[[Path], None], *extra):
    def setup(tmp: Path) -> list:
        ds = tmp / "ds"
        ds.mkdir(parents=True, exist_ok=True)
        build(ds)
        return ["--bundle_root", tmp / "root", "--dataset_dir", ds, *extra]

    return setup


def _ds_ft(build: Callable[[Path], None], *extra):
    def setup(tmp: Path) -> list:
        ds = write_labelled(tmp / "ds")
        build(ds)
        return ["--bundle_root", tmp / "root", "--dataset_dir", ds, "--transfer", "none", *extra]

    return setup


def _bad_4d(ds: Path) -> None:
    import tifffile

    write_unlabelled(ds, 2)
    tifffile.imwrite(ds / "stack4d.tif", np.zeros((2, 3, 32, 32), np.uint8), photometric="minisblack")


def _bad_1d(ds: Path) -> None:
    import h5py

    write_unlabelled(ds, 2)
    with h5py.File(ds / "profile.h5", "w") as f:
        f["raw"] = np.arange(100, dtype=np.uint8)


def _bad_truncated_tiff(ds: Path) -> None:
    write_unlabelled(ds, 2)
    write_em(ds / "whole.tif", em_image((128, 128), seed=5))
    data = (ds / "whole.tif").read_bytes()
    (ds / "whole.tif").unlink()
    (ds / "cut.tif").write_bytes(data[: len(data) // 2])


def _bad_nan(ds: Path) -> None:
    write_unlabelled(ds, 2)
    img = em_image((64, 64), seed=3).astype(np.float32) / 255
    img[10, 10] = np.nan
    img[20, 20] = np.inf
    write_em(ds / "nan.tif", img)


def _ft_shape_mismatch(ds: Path) -> None:
    lab = ds / "train" / "labels" / "vol0.tif"
    write_em(lab, np.zeros((3, 48, 64), np.uint8))


def _ft_label_too_big(ds: Path) -> None:
    lab = ds / "train" / "labels" / "vol0.tif"
    arr = np.zeros((3, 64, 64), np.uint8)
    arr[:, 10:20, 10:20] = 3
    write_em(lab, arr)


def _ft_label_float(ds: Path) -> None:
    lab = ds / "val" / "labels" / "vol0.tif"
    arr = np.zeros((3, 64, 64), np.float32)
    arr[:, 10:20, 10:20] = 0.5
    write_em(lab, arr)


def _ft_other_architecture(tmp: Path) -> list:
    # hidden 48 instead of the tiny preset's 32: every transformer tensor has another shape
    ckpt = write_tiny_checkpoint(tmp / "wide.pt", head="reconstruction", hidden_size=48, mlp_dim=96)
    return ["--bundle_root", tmp / "root", "--dataset_dir", write_labelled(tmp / "ds"), "--pretrained_path", ckpt]


def _ft_evil(tmp: Path) -> list:
    torch.save(_Evil(tmp / "marker"), tmp / "evil.pt")
    return ["--bundle_root", tmp / "root", "--dataset_dir", write_labelled(tmp / "ds"), "--pretrained_path", tmp / "evil.pt"]


def _no_code_ran(tmp: Path, res) -> None:
    assert not (tmp / "marker").exists(), "loading the checkpoint executed code"


def _pre_infer_evil(tmp: Path) -> list:
    torch.save(_Evil(tmp / "marker"), tmp / "evil.pt")
    return ["--bundle_root", tmp / "root", "--dataset_dir", write_unlabelled(tmp / "ds", 1), "--model_path", tmp / "evil.pt",
            "--output_dir", tmp / "out"]


def _pre_infer_segmentation_ckpt(tmp: Path) -> list:
    ckpt = write_tiny_checkpoint(tmp / "seg.pt", head="segmentation", out_channels=3)
    return ["--bundle_root", tmp / "root", "--dataset_dir", write_unlabelled(tmp / "ds", 1), "--model_path", ckpt,
            "--output_dir", tmp / "out"]


def _ft_infer_class_count(tmp: Path) -> list:
    write_tiny_checkpoint(tmp / "root" / "models" / "model.pt", out_channels=1)
    img, _ = em_volume((2, 64, 64), seed=1)
    write_em(tmp / "in" / "vol.tif", img)
    return ["--bundle_root", tmp / "root", "--input", tmp / "in", "--output_dir", tmp / "out", "--num_classes", "3",
            "--progress", "False"]


def _file_in_the_way(tmp: Path) -> Path:
    (tmp / "a_file").write_text("not a folder")
    return tmp / "a_file" / "root"


def _read_only_dir(tmp: Path) -> Path:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return tmp / "ro" / "root"


CASES: dict[str, Case] = {
    # ---- dataset folder
    "pre_empty_dataset_dir": Case(
        "pretrain", TRAIN, _ds_pre(lambda ds: None), "dataset", lambda t: [str(t / "ds"), "no readable EM images"]),
    "pre_no_readable_images": Case(
        "pretrain", TRAIN,
        _ds_pre(lambda ds: [(ds / "notes.txt").write_text("x"), (ds / "table.csv").write_text("a,b")]),
        "dataset", lambda t: [str(t / "ds"), "no readable EM images"]),
    "ft_missing_dataset_dir": Case(
        "finetune", TRAIN,
        lambda t: ["--bundle_root", t / "root", "--dataset_dir", t / "nowhere", "--transfer", "none"],
        "dataset", lambda t: [str(t / "nowhere"), "no such file or folder"]),
    # ---- unreadable files
    "pre_corrupt_tiff": Case(
        "pretrain", TRAIN, _ds_pre(_bad_truncated_tiff), "dataset",
        lambda t: [str(t / "ds" / "cut.tif"), "cannot read TIFF", "truncated"]),
    "pre_zero_byte_png": Case(
        "pretrain", TRAIN, _ds_pre(lambda ds: [write_unlabelled(ds, 2), (ds / "empty.png").write_bytes(b"")]),
        "dataset", lambda t: [str(t / "ds" / "empty.png"), "empty file (0 bytes)"]),
    # ---- array shapes and values
    "pre_4d_array": Case(
        "pretrain", TRAIN, _ds_pre(_bad_4d), "dataset",
        lambda t: [str(t / "ds" / "stack4d.tif"), "4D array of shape (2, 3, 32, 32)"]),
    "pre_1d_array": Case(
        "pretrain", TRAIN, _ds_pre(_bad_1d), "dataset", lambda t: [str(t / "ds" / "profile.h5"), "1D array of shape (100,)"]),
    "pre_non_finite": Case(
        "pretrain", TRAIN, _ds_pre(_bad_nan), "dataset", lambda t: [str(t / "ds" / "nan.tif"), "2 non-finite values"]),
    "ft_shape_mismatch": Case(
        "finetune", TRAIN, _ds_ft(_ft_shape_mismatch), "dataset",
        lambda t: [str(t / "ds" / "train" / "labels" / "vol0.tif"), "label shape (3, 48, 64) differs from image shape (3, 64, 64)"]),
    "ft_label_values_too_big": Case(
        "finetune", TRAIN, _ds_ft(_ft_label_too_big), "dataset",
        lambda t: [str(t / "ds" / "train" / "labels" / "vol0.tif"), "label values up to 3 but num_classes is 2"]),
    "ft_label_not_integer": Case(
        "finetune", TRAIN, _ds_ft(_ft_label_float), "dataset",
        lambda t: [str(t / "ds" / "val" / "labels" / "vol0.tif"), "non-integer values (e.g. 0.5)"]),
    # ---- checkpoints
    "ft_checkpoint_other_architecture": Case(
        "finetune", TRAIN, _ft_other_architecture, "checkpoint",
        lambda t: [str(t / "wide.pt"), "cannot transfer 'encoder' weights", "transformer.blocks.0.", "(48,) vs (32,)"]),
    "ft_pretrained_path_missing": Case(
        "finetune", TRAIN,
        lambda t: ["--bundle_root", t / "root", "--dataset_dir", write_labelled(t / "ds"), "--pretrained_path", t / "none.pt"],
        "checkpoint", lambda t: [str(t / "none.pt"), "pretrained checkpoint not found", "--transfer none"]),
    "ft_checkpoint_is_a_code_pickle": Case(
        "finetune", TRAIN, _ft_evil, "checkpoint",
        lambda t: [str(t / "evil.pt"), "not a loadable weights-only checkpoint"], check=_no_code_ran),
    "ft_inference_other_class_count": Case(
        "finetune", INFER, _ft_infer_class_count, "checkpoint",
        lambda t: [str(t / "root" / "models" / "model.pt"), "mismatching keys", "head.weight (1, 8, 3, 3) vs (3, 8, 3, 3)"]),
    "pre_inference_checkpoint_is_a_code_pickle": Case(
        "pretrain", INFER, _pre_infer_evil, "checkpoint",
        lambda t: [str(t / "evil.pt"), "not a loadable weights-only checkpoint", "Unsupported global"], check=_no_code_ran),
    "pre_inference_segmentation_checkpoint": Case(
        "pretrain", INFER, _pre_infer_segmentation_ckpt, "checkpoint",
        lambda t: [str(t / "seg.pt"), "the weights are a fine-tuned segmentation checkpoint"]),
    "pre_inference_checkpoint_missing": Case(
        "pretrain", INFER,
        lambda t: ["--bundle_root", t / "root", "--dataset_dir", write_unlabelled(t / "ds", 1), "--model_path", t / "none.pt",
                   "--output_dir", t / "out"],
        "checkpoint", lambda t: [str(t / "none.pt"), "checkpoint file does not exist"]),
    # ---- settings of the wrong type
    "ft_num_classes_abc": Case(
        "finetune", TRAIN, lambda t: ["--bundle_root", t / "root", "--num_classes", "abc", "--transfer", "none"],
        "config", lambda t: ["num_classes: expected an integer >= 1, got 'abc' (str)"]),
    "pre_iterations_abc": Case(
        "pretrain", TRAIN, _pre("--iterations", "abc"),
        "config", lambda t: ["iterations: expected an integer >= 1, got 'abc' (str)"]),
    "pre_resume_lowercase_false": Case(
        "pretrain", TRAIN, _pre("--resume", "false"), "config", lambda t: ["resume: expected True or False, got 'false'"]),
    # ---- output folder
    "pre_output_parent_is_a_file": Case(
        "pretrain", TRAIN, lambda t: ["--bundle_root", _file_in_the_way(t)], "output",
        lambda t: [str(t / "a_file" / "root"), "cannot be written: Not a directory"]),
    "pre_output_read_only_dir": Case(
        "pretrain", TRAIN, lambda t: ["--bundle_root", _read_only_dir(t)], "output",
        lambda t: [str(t / "ro" / "root"), "cannot be written: Permission denied"], unless_root=True),
    "pre_disk_full": Case(  # simulated: ask for more free space than any disk has
        "pretrain", TRAIN, _pre("--min_free_mb", "1e12"), "output", lambda t: [str(t / "root"), "MiB free on its disk"]),
    "ft_output_parent_is_a_file": Case(
        "finetune", TRAIN, lambda t: ["--bundle_root", _file_in_the_way(t), "--transfer", "none"], "output",
        lambda t: [str(t / "a_file" / "root"), "cannot be written: Not a directory"]),
    # ---- tracking service
    "pre_mlflow_unreachable": Case(
        "pretrain", TRAIN, lambda t: ["--bundle_root", t / "root", "--tracking", "mlflow", "--tracking_uri", UNREACHABLE],
        "tracking", lambda t: [UNREACHABLE, "MLflow tracking server unreachable (connection refused)"]),
    "ft_mlflow_unreachable": Case(
        "finetune", TRAIN,
        lambda t: ["--bundle_root", t / "root", "--transfer", "none", "--tracking", "mlflow", "--tracking_uri", UNREACHABLE],
        "tracking", lambda t: [UNREACHABLE, "MLflow tracking server unreachable (connection refused)"]),
}


def _skip_reason(case: Case) -> str | None:
    if case.unless_root and IS_ROOT:
        return "running as root: directory permissions do not stop root from writing (the parent-is-a-file case covers it)"
    return None


def _selected_cases(session) -> list[str]:
    names = []
    for item in session.items:
        spec = getattr(item, "callspec", None)
        if spec is not None and item.module.__name__ == __name__:
            names += [spec.params[k] for k in ("case", "run") if k in spec.params]
    return names


# ------------------------------------------------------------------------------------------
# runs that must go on: images that need conversion or padding, inference over a folder with one bad file


def _rgb_png(path: Path, seed: int, size: int = 96) -> Path:
    from PIL import Image

    rgb = np.stack([em_image((size, size), seed=seed + k) for k in range(3)], -1)  # three different channels
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, mode="RGB").save(path)
    return path


def _pair_2d(root: Path, name: str, shape, seed: int, rgb: bool = False) -> None:
    img, lab = em_volume((1, *shape), seed=seed)
    if rgb:
        _rgb_png(root / "images" / f"{name}.png", seed, shape[0])
    else:
        write_png(root / "images" / f"{name}.png", img[0])
    write_png(root / "labels" / f"{name}.png", (lab[0] == 1).astype(np.uint8))


def _pre_small_rgb(tmp: Path) -> list:
    ds = tmp / "ds"
    write_png(ds / "small.png", em_image((40, 40), seed=1))  # smaller than the 64 px crop
    _rgb_png(ds / "rgb.png", seed=2)
    write_png(ds / "plain.png", em_image((96, 96), seed=5))
    return ["--bundle_root", tmp / "root", "--dataset_dir", ds, "--iterations", "4", "--val_interval", "2",
            "--log_interval", "1"]


def _ft_small_rgb(tmp: Path) -> list:
    ds = tmp / "ds"
    _pair_2d(ds / "train", "small", (40, 40), seed=1)  # smaller than the 64 px crop
    _pair_2d(ds / "train", "rgb", (96, 96), seed=2, rgb=True)
    _pair_2d(ds / "val", "small", (48, 40), seed=3)
    return ["--bundle_root", tmp / "root", "--dataset_dir", ds, "--transfer", "none", "--iterations", "4",
            "--val_interval", "2", "--batch_size", "2", "--log_interval", "1"]


def _cut_tiff(path: Path, shape=(128, 128)) -> Path:
    write_em(path, em_image(shape, seed=9))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _pre_infer_folder(tmp: Path) -> list:
    ds = write_unlabelled(tmp / "ds", 2)
    _cut_tiff(ds / "cut.tif")
    ckpt = write_tiny_checkpoint(tmp / "recon.pt", head="reconstruction")
    return ["--bundle_root", tmp / "root", "--dataset_dir", ds, "--model_path", ckpt, "--output_dir", tmp / "out"]


def _ft_infer_folder(tmp: Path) -> list:
    write_tiny_checkpoint(tmp / "root" / "models" / "model.pt", out_channels=1)
    img, _ = em_volume((2, 64, 64), seed=1)
    write_em(tmp / "in" / "a.tif", img)
    _cut_tiff(tmp / "in" / "b.tif")
    write_png(tmp / "in" / "c.png", em_image((64, 64), seed=2))
    return ["--bundle_root", tmp / "root", "--input", tmp / "in", "--output_dir", tmp / "out", "--progress", "False"]


def _pre_bad_file_in_training(tmp: Path) -> list:
    """A truncated TIFF (its header reads fine) that the pre-training check is told to skip
    (``--check_items 0``), in the training split: found when its batch is loaded."""
    from custom.io import pretraining_datalist

    ds = write_unlabelled(tmp / "ds", 3)
    _cut_tiff(ds / "cut.tif")
    seed = next(s for s in range(20) if str(ds / "cut.tif") in
                {d["image"] for d in pretraining_datalist(ds, tmp / "unused", seed=s, check_items=0)["training"]})
    # a fixed intensity mapping: the dataset's intensity fingerprint (which reads a sample) is not taken either
    return ["--bundle_root", tmp / "root", "--dataset_dir", ds, "--check_items", 0, "--seed", seed,
            "--intensity_mapping", "[0, 255]", "--intensity_mean", 0.5, "--intensity_std", 0.2,
            "--iterations", 20, "--val_interval", 10, "--log_interval", 1]


RUNS: dict[str, Case] = {
    "pretrain_bad_file_found_during_training": Case("pretrain", TRAIN, _pre_bad_file_in_training, ""),
    "pretrain_small_and_rgb": Case("pretrain", TRAIN, _pre_small_rgb, ""),
    "finetune_small_and_rgb": Case("finetune", TRAIN, _ft_small_rgb, ""),
    "pretrain_inference_folder": Case("pretrain", INFER, _pre_infer_folder, ""),
    "finetune_inference_folder": Case("finetune", INFER, _ft_infer_folder, ""),
}


@pytest.fixture(scope="module")
def case_results(request, tmp_path_factory) -> dict:
    """Run every selected case of :data:`CASES` (forked runner, 2 at a time) and keep the results."""
    names = [n for n in _selected_cases(request.session) if n in RUNS or _skip_reason(CASES[n]) is None]
    jobs, tmps = [], {}
    for name in names:
        case = CASES.get(name) or RUNS[name]
        tmps[name] = tmp = tmp_path_factory.mktemp(name)
        jobs.append({"name": name, "bundle": PRE if case.bundle == "pretrain" else FT, "configs": case.configs,
                     "args": case.setup(tmp)})
    results = run_forked(jobs, tmp_path_factory.mktemp("runner")) if jobs else {}
    return {name: {"res": results[name], "tmp": tmps[name], "seconds": results[name].seconds} for name in names}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_training(case, case_results):
    spec = CASES[case]
    if _skip_reason(spec):
        pytest.skip(_skip_reason(spec))
    got = case_results[case]
    res, tmp = got["res"], got["tmp"]
    bundle = "retina_pretrain" if spec.bundle == "pretrain" else "retina_finetune"
    prefix = "error: " if spec.kind == "error" else f"{bundle}: {spec.kind} error: "
    line = assert_one_line(res, prefix, *spec.fragments(tmp))
    print(f"{case} ({got['seconds']:.1f} s): {line}")
    if spec.check is not None:
        spec.check(tmp, res)


def test_forked_runner_matches_a_fresh_interpreter(tmp_path):
    """The same case through a fresh `python -m monai.bundle run`: the same one line (so the forked
    runner above changes nothing but the import time)."""
    case = CASES["ft_num_classes_abc"]
    res = run_bundle(FT, case.configs, *case.setup(tmp_path))
    assert_one_line(res, "retina_finetune: config error: ", *case.fragments(tmp_path))


@pytest.mark.parametrize("run", ["pretrain_small_and_rgb", "finetune_small_and_rgb"])
def test_rgb_is_converted_with_a_warning_and_small_images_are_padded(run, case_results):
    """RGB images are converted to grayscale (luma), with one warning naming the file; an image smaller
    than the crop is padded (fine-tuning: SpatialPadd; pretraining: the random resized crop resamples
    it to the crop size) and trains."""
    res, tmp = case_results[run]["res"], case_results[run]["tmp"]
    assert res.returncode == 0, tail(res)
    warnings_ = [line for line in res.stdout.splitlines() if "rgb.png: RGB image converted to grayscale" in line]
    assert len(warnings_) == 1 and "WARNING" in warnings_[0], tail(res)
    assert iterations(res.stdout)[-1] == 4, tail(res)
    final = tmp / "root" / "models" / ("model.pt" if run.startswith("pretrain") else "model_final.pt")
    head = "reconstruction" if run.startswith("pretrain") else "segmentation"
    from custom.checkpoints import load_weights

    load_weights(transunet_from_preset("tiny", img_size=64, head=head), final)
    print(f"{run}: {warnings_[0].split(' - ')[-1]}")


def test_pretrain_transforms_pad_an_image_smaller_than_the_crop(tmp_path):
    """The pretraining pipeline turns a 40x40 image into a 64x64 (input, target) pair."""
    from monai.bundle import ConfigParser

    write_png(tmp_path / "small.png", em_image((40, 40), seed=1))
    parser = ConfigParser()
    parser.read_config([str(PRE / "configs" / "train.json"), str(PRE / "configs" / "demo.json")])
    parser["bundle_root"] = str(tmp_path / "root")  # the intensity record reads the (demo) data: keep it under tmp
    for p in ("train", "validate"):
        out = parser.get_parsed_content(f"{p}#preprocessing")({"image": str(tmp_path / "small.png"), "plane": "xy", "index": -1})
        assert out["image"].shape == out["label"].shape == (1, 64, 64)


@pytest.mark.parametrize("run", ["pretrain_bad_file_found_during_training"])
def test_a_bad_file_found_during_training_is_one_line_too(run, case_results):
    """Past the pre-training checks, a bad file stops training when its batch is loaded: still one line,
    no traceback (MONAI's StatsHandler logs the exception; its traceback is dropped from the log)."""
    res, tmp = case_results[run]["res"], case_results[run]["tmp"]
    assert res.returncode == 1, tail(res)
    err = error_lines(res)
    assert err == [f"retina_pretrain: dataset error: {tmp / 'ds' / 'cut.tif'}: "
                   f"{err[0].split('cut.tif: ', 1)[-1]}"] and "cannot read TIFF" in err[0], tail(res)
    assert "Traceback" not in res.stdout + res.stderr, tail(res)
    assert "Exception: " in res.stdout  # StatsHandler's record, kept without its traceback
    assert not (tmp / "root" / "models" / "model.pt").exists()  # no "final" weights from a failed run
    print(f"stopped at iteration {max(iterations(res.stdout), default=0)}: {err[0]}")


@pytest.mark.parametrize("run", ["pretrain_inference_folder", "finetune_inference_folder"])
def test_inference_over_a_folder_reports_the_bad_file_and_writes_the_others(run, case_results):
    """One truncated TIFF among three inputs: the other two are written, the bad one is reported by
    name in the log and in the last line, and the exit status is non-zero."""
    res, tmp = case_results[run]["res"], case_results[run]["tmp"]
    if run == "pretrain_inference_folder":
        line = assert_one_line(res, "retina_pretrain: dataset error: ", str(tmp / "ds"),
                           "1 of 3 input file(s) could not be read, the other 2 were processed",
                               str(tmp / "ds" / "cut.tif"), "cannot read TIFF")
        assert sorted(p.name for p in (tmp / "out").iterdir()) == ["em0.png", "em1.png"]
        assert f"skipped (unreadable): {tmp / 'ds' / 'cut.tif'}" in res.stdout
    else:
        line = assert_one_line(res, "retina_finetune: inference error: ", "1 of 3 input(s) failed (2 written)",
                               str(tmp / "in" / "b.tif"), "cannot read TIFF")
        assert sorted(p.name for p in (tmp / "out").iterdir()) == ["a_seg.tif", "c_seg.png"]
        assert f"[retina] [2/3] {tmp / 'in' / 'b.tif'}: FAILED" in res.stdout
        from custom.io import read_em

        assert read_em(tmp / "out" / "a_seg.tif").shape == (2, 64, 64)
    print(line)
