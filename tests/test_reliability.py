"""Reliability of both bundles (issue 6): bad input, interruption, failing services.

Every bundle run goes through the users' entry point, ``python -m monai.bundle run`` started from
the bundle's folder, with the demo overrides (tiny preset, 64 px crops, one thread) and every
output under ``tmp_path`` (``--bundle_root``, ``--dataset_dir``, ``--output_dir``, ...).

A bad input must cost the user one line on stderr, ``<bundle>: <kind> error: <path>: <problem>``
(``custom.errors``), a non-zero exit status, no traceback, and no training iteration before it.
The bad-input cases are a table (:data:`CASES`, plus :data:`RUNS` for runs that must go on); the
ones selected for a session run in one module fixture, as forked children of a process that
imported MONAI once (:data:`FORK_RUNNER`), 2 at a time. The interruption test and one bad-input
case use fresh interpreters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from custom.io import write_em
from custom.synthetic import em_image, em_volume
from custom.networks import transunet_from_preset

REPO = Path(__file__).resolve().parents[1]
PRE = REPO / "bundles" / "retina_pretrain"
FT = REPO / "bundles" / "retina_finetune"
TRAIN = "['configs/train.json','configs/demo.json']"
INFER = "['configs/inference.json','configs/demo.json']"
#: MONAI's warning about eval() in configs, printed to stderr on every run
NOTICE = "parsing config_file"
#: log lines of a training iteration (MONAI's StatsHandler) or of a validation
ITERATION_RE = re.compile(r"Epoch: \d+/\d+, Iter: \d+/\d+|train_loss|Key metric|val_mean_iou|val_mse")
PARALLEL = 2


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for k in ("MLFLOW_TRACKING_URI", "RETINA_TRACEBACK"):
        env.pop(k, None)
    return env


def _bundle_cmd(bundle: Path, configs: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *map(str, args)]


def _run(bundle: Path, configs: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        _bundle_cmd(bundle, configs, *args), cwd=bundle, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _tail(res: subprocess.CompletedProcess) -> str:
    return f"rc={res.returncode}\n--- stdout\n{res.stdout[-2500:]}\n--- stderr\n{res.stderr[-2500:]}"


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip() and NOTICE not in line]


def assert_one_line(res: subprocess.CompletedProcess, prefix: str, *fragments: str) -> str:
    """Non-zero exit, exactly one line on stderr starting with ``prefix`` and holding ``fragments``,
    no traceback anywhere, and no training or validation output before it."""
    assert res.returncode != 0, _tail(res)
    err = _error_lines(res)
    assert len(err) == 1, _tail(res)
    line = err[0]
    assert line.startswith(prefix), _tail(res)
    for frag in fragments:
        assert frag in line, f"{frag!r} not in {line!r}"
    assert "Traceback" not in res.stdout + res.stderr, _tail(res)
    assert not ITERATION_RE.search(res.stdout), _tail(res)
    return line


# ------------------------------------------------------------------------------------------
# test data


def _png(path: Path, arr: np.ndarray) -> Path:
    write_em(path, arr)
    return path


def _unlabelled(folder: Path, n: int = 3, size: int = 96) -> Path:
    """``n`` small EM-like PNGs (what the pretraining bundle reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _png(folder / f"em{i}.png", em_image((size, size), seed=i))
    return folder


def _labelled(root: Path, shape=(3, 64, 64), n_train: int = 1, n_val: int = 1) -> Path:
    """The fine-tuning layout ``{train,val}/{images,labels}/volN.tif`` with binary labels."""
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img, lab = em_volume(shape, seed=(split == "val") * 10 + i)
            write_em(root / split / "images" / f"vol{i}.tif", img)
            write_em(root / split / "labels" / f"vol{i}.tif", (lab == 1).astype(np.uint8))
    return root


def _tiny_checkpoint(path: Path, head: str = "segmentation", out_channels: int = 1, **overrides) -> Path:
    torch.manual_seed(0)
    net = transunet_from_preset("tiny", img_size=64, head=head, out_channels=out_channels, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


class _Evil:
    """A pickle that runs code when loaded without ``weights_only``: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# the table of bad inputs: each case builds its input under tmp and names the command


@dataclass
class Case:
    bundle: str  # "pretrain" | "finetune"
    configs: str
    setup: Callable[[Path], list]  # tmp -> extra command-line arguments
    kind: str  # error kind in the one line
    fragments: Callable[[Path], list] = lambda tmp: []  # noqa: E731
    needs_flag: bool = False  # finetune configs that carry the reporter (see _finetune_ready)
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
        ds = _labelled(tmp / "ds")
        build(ds)
        return ["--bundle_root", tmp / "root", "--dataset_dir", ds, "--transfer", "none", *extra]

    return setup


def _bad_4d(ds: Path) -> None:
    import tifffile

    _unlabelled(ds, 2)
    tifffile.imwrite(ds / "stack4d.tif", np.zeros((2, 3, 32, 32), np.uint8), photometric="minisblack")


def _bad_1d(ds: Path) -> None:
    import h5py

    _unlabelled(ds, 2)
    with h5py.File(ds / "profile.h5", "w") as f:
        f["raw"] = np.arange(100, dtype=np.uint8)


def _bad_truncated_tiff(ds: Path) -> None:
    _unlabelled(ds, 2)
    write_em(ds / "whole.tif", em_image((128, 128), seed=5))
    data = (ds / "whole.tif").read_bytes()
    (ds / "whole.tif").unlink()
    (ds / "cut.tif").write_bytes(data[: len(data) // 2])


def _bad_nan(ds: Path) -> None:
    _unlabelled(ds, 2)
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
    ckpt = _tiny_checkpoint(tmp / "wide.pt", head="reconstruction", hidden_size=48, mlp_dim=96)
    return ["--bundle_root", tmp / "root", "--dataset_dir", _labelled(tmp / "ds"), "--pretrained_path", ckpt]


def _ft_evil(tmp: Path) -> list:
    torch.save(_Evil(tmp / "marker"), tmp / "evil.pt")
    return ["--bundle_root", tmp / "root", "--dataset_dir", _labelled(tmp / "ds"), "--pretrained_path", tmp / "evil.pt"]


def _no_code_ran(tmp: Path, res) -> None:
    assert not (tmp / "marker").exists(), "loading the checkpoint executed code"


def _pre_infer_evil(tmp: Path) -> list:
    torch.save(_Evil(tmp / "marker"), tmp / "evil.pt")
    return ["--bundle_root", tmp / "root", "--dataset_dir", _unlabelled(tmp / "ds", 1), "--model_path", tmp / "evil.pt",
            "--output_dir", tmp / "out"]


def _pre_infer_segmentation_ckpt(tmp: Path) -> list:
    ckpt = _tiny_checkpoint(tmp / "seg.pt", head="segmentation", out_channels=3)
    return ["--bundle_root", tmp / "root", "--dataset_dir", _unlabelled(tmp / "ds", 1), "--model_path", ckpt,
            "--output_dir", tmp / "out"]


def _ft_infer_class_count(tmp: Path) -> list:
    _tiny_checkpoint(tmp / "root" / "models" / "model.pt", out_channels=1)
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


IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


#: an MLflow server address where nothing listens
UNREACHABLE = f"http://127.0.0.1:{_closed_port()}"

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
        "dataset", lambda t: [str(t / "nowhere"), "no such file or folder"], needs_flag=True),
    # ---- unreadable files
    "pre_corrupt_tiff": Case(
        "pretrain", TRAIN, _ds_pre(_bad_truncated_tiff), "dataset",
        lambda t: [str(t / "ds" / "cut.tif"), "cannot read TIFF", "truncated"]),
    "pre_zero_byte_png": Case(
        "pretrain", TRAIN, _ds_pre(lambda ds: [_unlabelled(ds, 2), (ds / "empty.png").write_bytes(b"")]),
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
        lambda t: [str(t / "ds" / "train" / "labels" / "vol0.tif"), "label shape (3, 48, 64) differs from image shape (3, 64, 64)"],
        needs_flag=True),
    "ft_label_values_too_big": Case(
        "finetune", TRAIN, _ds_ft(_ft_label_too_big), "dataset",
        lambda t: [str(t / "ds" / "train" / "labels" / "vol0.tif"), "label values up to 3 but num_classes is 2"],
        needs_flag=True),
    "ft_label_not_integer": Case(
        "finetune", TRAIN, _ds_ft(_ft_label_float), "dataset",
        lambda t: [str(t / "ds" / "val" / "labels" / "vol0.tif"), "non-integer values (e.g. 0.5)"], needs_flag=True),
    # ---- checkpoints
    "ft_checkpoint_other_architecture": Case(
        "finetune", TRAIN, _ft_other_architecture, "checkpoint",
        lambda t: [str(t / "wide.pt"), "cannot transfer 'encoder' weights", "transformer.blocks.0.", "(48,) vs (32,)"],
        needs_flag=True),
    "ft_pretrained_path_missing": Case(
        "finetune", TRAIN,
        lambda t: ["--bundle_root", t / "root", "--dataset_dir", _labelled(t / "ds"), "--pretrained_path", t / "none.pt"],
        "checkpoint", lambda t: [str(t / "none.pt"), "pretrained checkpoint not found", "--transfer none"]),
    "ft_checkpoint_is_a_code_pickle": Case(
        "finetune", TRAIN, _ft_evil, "checkpoint",
        lambda t: [str(t / "evil.pt"), "not a loadable weights-only checkpoint"], needs_flag=True, check=_no_code_ran),
    "ft_inference_other_class_count": Case(
        "finetune", INFER, _ft_infer_class_count, "checkpoint",
        lambda t: [str(t / "root" / "models" / "model.pt"), "mismatching keys", "head.weight (1, 8, 3, 3) vs (3, 8, 3, 3)"],
        needs_flag=True),
    "pre_inference_checkpoint_is_a_code_pickle": Case(
        "pretrain", INFER, _pre_infer_evil, "checkpoint",
        lambda t: [str(t / "evil.pt"), "not a loadable weights-only checkpoint", "Unsupported global"], check=_no_code_ran),
    "pre_inference_segmentation_checkpoint": Case(
        "pretrain", INFER, _pre_infer_segmentation_ckpt, "checkpoint",
        lambda t: [str(t / "seg.pt"), "the weights are a fine-tuned segmentation checkpoint"]),
    "pre_inference_checkpoint_missing": Case(
        "pretrain", INFER,
        lambda t: ["--bundle_root", t / "root", "--dataset_dir", _unlabelled(t / "ds", 1), "--model_path", t / "none.pt",
                   "--output_dir", t / "out"],
        "checkpoint", lambda t: [str(t / "none.pt"), "checkpoint file does not exist"]),
    # ---- settings of the wrong type
    "ft_num_classes_abc": Case(
        "finetune", TRAIN, lambda t: ["--bundle_root", t / "root", "--num_classes", "abc", "--transfer", "none"],
        "config", lambda t: ["num_classes: expected an integer >= 1, got 'abc' (str)"], needs_flag=True),
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
        lambda t: [str(t / "a_file" / "root"), "cannot be written: Not a directory"], needs_flag=True),
    # ---- tracking service
    "pre_mlflow_unreachable": Case(
        "pretrain", TRAIN, lambda t: ["--bundle_root", t / "root", "--tracking", "mlflow", "--tracking_uri", UNREACHABLE],
        "tracking", lambda t: [UNREACHABLE, "MLflow tracking server unreachable (connection refused)"]),
    "ft_mlflow_unreachable": Case(
        "finetune", TRAIN,
        lambda t: ["--bundle_root", t / "root", "--transfer", "none", "--tracking", "mlflow", "--tracking_uri", UNREACHABLE],
        "tracking", lambda t: [UNREACHABLE, "MLflow tracking server unreachable (connection refused)"], needs_flag=True),
}


def _finetune_ready() -> bool:
    """True once the finetune configs install the one-line reporter (their owner finishes first)."""
    return "custom.errors.report_errors" in (FT / "configs" / "train.json").read_text()


def _skip_reason(case: Case) -> str | None:
    if case.needs_flag and not _finetune_ready():
        return "the retina_finetune configs do not install custom.errors.report_errors yet"
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


# A fresh `python -m monai.bundle run` spends 5-8 s of CPU importing MONAI, MLflow, ITK and scipy
# before it looks at its arguments; 30 of them would take most of this file's 4-minute budget on
# 2 shared cores. The runner below imports them once, then forks one child per case; the child
# does what `python -m monai.bundle run ...` does after its imports: sys.path[0] = the bundle
# folder, sys.argv, `runpy.run_module("monai.bundle", run_name="__main__")`, and the
# interpreter's own exit handling (SystemExit: its code, or its message on stderr and status 1;
# another exception: sys.excepthook, then status 1; atexit functions run). Outputs go to files.
# `test_forked_runner_matches_a_fresh_interpreter` checks one case both ways.
FORK_RUNNER = textwrap.dedent(
    r"""
    import atexit, json, os, runpy, sys, time
    import monai, monai.bundle.scripts, ignite.engine, mlflow  # the expensive imports, once
    import custom.checkpoints, custom.io, custom.errors, custom.handlers, custom.inference, custom.networks

    def child(job):
        fd_out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        fd_err = os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd_out, 1)
        os.dup2(fd_err, 2)
        os.chdir(job["cwd"])
        sys.path.insert(0, job["cwd"])
        sys.argv = [os.path.join(os.path.dirname(monai.__file__), "bundle", "__main__.py"), *job["argv"]]
        code = 0
        try:
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                sys.stdout.flush()
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    jobs = json.load(open(sys.argv[1]))
    parallel = int(sys.argv[2])
    results, running, todo = {}, {}, list(jobs)
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            pid = os.fork()
            if pid == 0:
                child(job)
            running[pid] = (job, time.time())
        pid, status = os.wait()
        job, start = running.pop(pid)
        results[job["name"]] = {"rc": os.waitstatus_to_exitcode(status), "seconds": time.time() - start}
    json.dump(results, open(sys.argv[3], "w"))
    """
)


def run_forked(jobs: list[dict], folder: Path, parallel: int = PARALLEL) -> dict[str, subprocess.CompletedProcess]:
    """Run ``[{"name", "bundle": Path, "configs", "args"}]`` as `python -m monai.bundle run` children of
    one process that imported MONAI once (see FORK_RUNNER). Returns CompletedProcess-like results."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = []
    for job in jobs:
        argv = ["run", "--config_file", job["configs"], *map(str, job["args"])]
        spec.append({"name": job["name"], "cwd": str(job["bundle"]), "argv": argv,
                     "out": str(folder / f"{job['name']}.out"), "err": str(folder / f"{job['name']}.err")})
    (folder / "jobs.json").write_text(json.dumps(spec))
    runner = subprocess.run(
        [sys.executable, "-c", FORK_RUNNER, str(folder / "jobs.json"), str(parallel), str(folder / "results.json")],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert runner.returncode == 0, runner.stdout[-2000:] + runner.stderr[-2000:]
    results = json.loads((folder / "results.json").read_text())
    out = {}
    for job in spec:
        r = results[job["name"]]
        res = subprocess.CompletedProcess(job["argv"], r["rc"], Path(job["out"]).read_text(), Path(job["err"]).read_text())
        res.seconds = r["seconds"]
        out[job["name"]] = res
    return out


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
        _png(root / "images" / f"{name}.png", img[0])
    _png(root / "labels" / f"{name}.png", (lab[0] == 1).astype(np.uint8))


def _pre_small_rgb(tmp: Path) -> list:
    ds = tmp / "ds"
    _png(ds / "small.png", em_image((40, 40), seed=1))  # smaller than the 64 px crop
    _rgb_png(ds / "rgb.png", seed=2)
    _png(ds / "plain.png", em_image((96, 96), seed=5))
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
    ds = _unlabelled(tmp / "ds", 2)
    _cut_tiff(ds / "cut.tif")
    ckpt = _tiny_checkpoint(tmp / "recon.pt", head="reconstruction")
    return ["--bundle_root", tmp / "root", "--dataset_dir", ds, "--model_path", ckpt, "--output_dir", tmp / "out"]


def _ft_infer_folder(tmp: Path) -> list:
    _tiny_checkpoint(tmp / "root" / "models" / "model.pt", out_channels=1)
    img, _ = em_volume((2, 64, 64), seed=1)
    write_em(tmp / "in" / "a.tif", img)
    _cut_tiff(tmp / "in" / "b.tif")
    _png(tmp / "in" / "c.png", em_image((64, 64), seed=2))
    return ["--bundle_root", tmp / "root", "--input", tmp / "in", "--output_dir", tmp / "out", "--progress", "False"]


def _pre_bad_file_in_training(tmp: Path) -> list:
    """A truncated TIFF (its header reads fine) that the pre-training check is told to skip
    (``--check_items 0``), in the training split: found when its batch is loaded."""
    from custom.io import pretraining_datalist

    ds = _unlabelled(tmp / "ds", 3)
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
    res = _run(FT, case.configs, *case.setup(tmp_path))
    assert_one_line(res, "retina_finetune: config error: ", *case.fragments(tmp_path))


STATS_RE = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- train_loss")


def _iterations(log: str) -> list[int]:
    """Global iterations of MONAI's StatsHandler lines ``Epoch: e/E, Iter: i/L -- train_loss``."""
    return [(int(e) - 1) * int(n) + int(i) for e, i, n in STATS_RE.findall(log)]


@pytest.mark.parametrize("run", ["pretrain_small_and_rgb", "finetune_small_and_rgb"])
def test_rgb_is_converted_with_a_warning_and_small_images_are_padded(run, case_results):
    """RGB images are converted to grayscale (luma), with one warning naming the file; an image smaller
    than the crop is padded (fine-tuning: SpatialPadd; pretraining: the random resized crop resamples
    it to the crop size) and trains."""
    res, tmp = case_results[run]["res"], case_results[run]["tmp"]
    assert res.returncode == 0, _tail(res)
    warnings_ = [line for line in res.stdout.splitlines() if "rgb.png: RGB image converted to grayscale" in line]
    assert len(warnings_) == 1 and "WARNING" in warnings_[0], _tail(res)
    assert _iterations(res.stdout)[-1] == 4, _tail(res)
    final = tmp / "root" / "models" / ("model.pt" if run.startswith("pretrain") else "model_final.pt")
    head = "reconstruction" if run.startswith("pretrain") else "segmentation"
    from custom.checkpoints import load_weights

    load_weights(transunet_from_preset("tiny", img_size=64, head=head), final)
    print(f"{run}: {warnings_[0].split(' - ')[-1]}")


def test_pretrain_transforms_pad_an_image_smaller_than_the_crop(tmp_path):
    """The pretraining pipeline turns a 40x40 image into a 64x64 (input, target) pair."""
    from monai.bundle import ConfigParser

    _png(tmp_path / "small.png", em_image((40, 40), seed=1))
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
    assert res.returncode == 1, _tail(res)
    err = _error_lines(res)
    assert err == [f"retina_pretrain: dataset error: {tmp / 'ds' / 'cut.tif'}: "
                   f"{err[0].split('cut.tif: ', 1)[-1]}"] and "cannot read TIFF" in err[0], _tail(res)
    assert "Traceback" not in res.stdout + res.stderr, _tail(res)
    assert "Exception: " in res.stdout  # StatsHandler's record, kept without its traceback
    assert not (tmp / "root" / "models" / "model.pt").exists()  # no "final" weights from a failed run
    print(f"stopped at iteration {max(_iterations(res.stdout), default=0)}: {err[0]}")


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


# ------------------------------------------------------------------------------------------
# interruption


KILL_DURING_SAVE = textwrap.dedent(
    r"""
    import io, os, signal, sys
    import torch
    from ignite.engine import Engine, Events
    from monai.handlers import CheckpointSaver
    from custom.checkpoints import save_state_dict
    from custom.handlers import AtomicCheckpointSaver

    def dies_half_way(real):
        # torch.save that writes the first half of the file, then the process is SIGKILLed
        def save(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            if hasattr(f, "write"):
                f.write(data[: len(data) // 2])
                f.flush()
            else:
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return save

    def trainer(saver_class, folder):
        engine = Engine(lambda e, b: None)
        saver_class(save_dir=folder, save_dict={"model": torch.nn.Linear(8, 8)}, save_interval=1,
                    epoch_level=False, n_saved=1).attach(engine)
        real = torch.save

        @engine.on(Events.ITERATION_STARTED)
        def arm(e):
            if e.state.iteration == 2:  # iteration 1's checkpoint is whole, iteration 2's is cut
                torch.save = dies_half_way(real)

        engine.run(range(3), max_epochs=1)

    def final_weights(folder):
        save_state_dict(torch.nn.Linear(8, 8).state_dict(), os.path.join(folder, "model.pt"))
        torch.save = dies_half_way(torch.save)
        save_state_dict(torch.nn.Linear(8, 8).state_dict(), os.path.join(folder, "model.pt"))

    scenarios = {
        "atomic": lambda d: trainer(AtomicCheckpointSaver, d),
        "monai": lambda d: trainer(CheckpointSaver, d),
        "state_dict": final_weights,
    }
    root = sys.argv[1]
    for name in scenarios:
        os.makedirs(os.path.join(root, name))
        pid = os.fork()
        if pid == 0:
            scenarios[name](os.path.join(root, name))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(name, os.waitstatus_to_exitcode(status), flush=True)
    """
)


def test_a_kill_while_saving_never_leaves_a_truncated_newest_checkpoint(tmp_path):
    """A process SIGKILLed half-way through writing a checkpoint (a real kill, from inside torch.save).

    - The bundles' savers (``AtomicCheckpointSaver``, ``n_saved=1``): no ``model_iteration=2.pt``, only
      an ignored temporary file; iteration 1 is still there, whole, and resume picks it.
    - MONAI's stock ``CheckpointSaver``, for contrast: Ignite removed iteration 1 before writing
      iteration 2, which MONAI writes in place (``atomic=False``): only a truncated file is left, and
      resume refuses it with one line instead of loading it.
    - ``custom.checkpoints.save_state_dict`` (tmp + rename): ``model.pt`` stays the previous, whole file.
    """
    from custom.checkpoints import CheckpointError
    from custom.handlers import latest_checkpoint

    res = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, _tail(res)
    assert res.stdout.split() == ["atomic", "-9", "monai", "-9", "state_dict", "-9"], _tail(res)

    atomic = tmp_path / "atomic"
    names = sorted(p.name for p in atomic.iterdir())
    assert names[0] == "model_iteration=1.pt" and len(names) == 2 and names[1].startswith("tmp"), names
    assert latest_checkpoint(atomic, prefix="model") == str(atomic / "model_iteration=1.pt")
    assert set(torch.load(atomic / "model_iteration=1.pt", weights_only=True)) == {"weight", "bias"}

    # MONAI's saver deleted iteration 1 before writing iteration 2, and iteration 2 is cut: nothing to resume
    monai_dir = tmp_path / "monai"
    assert sorted(p.name for p in monai_dir.iterdir()) == ["model_iteration=2.pt"]
    with pytest.raises(Exception):
        torch.load(monai_dir / "model_iteration=2.pt", weights_only=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from"):
        latest_checkpoint(monai_dir, prefix="model")

    final = tmp_path / "state_dict"
    names = sorted(p.name for p in final.iterdir())
    assert names[1] == "model.pt" and len(names) == 2 and names[0].startswith(".tmp-"), names
    assert set(torch.load(final / "model.pt", weights_only=True)) == {"weight", "bias"}


def test_latest_checkpoint_ignores_partial_files(tmp_path):
    """What a kill can leave next to the checkpoints: temporary files of an atomic save, a truncated or
    empty checkpoint (non-atomic writer, full disk). Resume takes the newest whole checkpoint; with
    none whole it refuses with one line rather than starting over silently."""
    from custom.checkpoints import CheckpointError
    from custom.handlers import latest_checkpoint

    torch.save({"w": torch.zeros(3)}, tmp_path / "checkpoint_iteration=10.pt")
    data = (tmp_path / "checkpoint_iteration=10.pt").read_bytes()
    (tmp_path / "tmpa1b2c3").write_bytes(data[:100])  # Ignite's atomic temporary file
    (tmp_path / ".tmp-1a2b3c4d-model.pt").write_bytes(data[:100])  # save_state_dict's (custom.utils.atomic_path)
    (tmp_path / "checkpoint_iteration=30.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "checkpoint_iteration=20.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_iteration=10.pt")
    (tmp_path / "checkpoint_iteration=10.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from \(2 truncated\)"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_resume_checkpoint_restarts_a_finished_training(tmp_path):
    from custom.handlers import resume_checkpoint

    torch.save({"w": torch.zeros(3)}, tmp_path / "checkpoint_iteration=30.pt")
    assert resume_checkpoint(tmp_path, 40) == str(tmp_path / "checkpoint_iteration=30.pt")  # interrupted: resume
    assert resume_checkpoint(tmp_path, 30) is None  # finished: train again
    assert [p.name for p in tmp_path.iterdir()] == ["previous_checkpoint_iteration=30.pt"]
    assert resume_checkpoint(tmp_path, 30) is None


def _wait_for(predicate, proc, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)


def test_finetune_killed_mid_run_resumes_and_continues_its_mlflow_run(tmp_path):
    """SIGKILL a fine-tuning run a few iterations after its first checkpoint, run the same command again:
    it resumes from that checkpoint (the iterations after it are redone), ends at the configured
    iteration count, its final weights load, the best-model bookkeeping survives, and MLflow shows one
    run (the killed one, continued, tagged ``resumed_from``) with a loss for every iteration."""
    import mlflow

    from custom.checkpoints import load_weights
    from custom.handlers import latest_checkpoint

    ds = _labelled(tmp_path / "ds", shape=(4, 64, 64))
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    cmd = _bundle_cmd(FT, TRAIN, "--bundle_root", root, "--dataset_dir", ds, "--transfer", "none", "--iterations", 40,
                      "--val_interval", 10, "--log_interval", 1, "--tracking", "mlflow", "--tracking_uri", uri,
                      "--experiment_name", "reliability")
    resume_dir = root / "eval" / "checkpoints"
    log = tmp_path / "killed.log"

    def latest():
        return latest_checkpoint(resume_dir, score_name="epoch")

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=FT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: latest() is not None, proc, 240, "checkpoint")
            n = 10 * int(re.search(r"epoch=(\d+)", latest()).group(1))  # written after each validation
            _wait_for(lambda: max(_iterations(log.read_text()), default=0) >= n + 3, proc, 120, "iteration after it")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    killed_at = max(_iterations(log.read_text()))
    assert n == 10 and killed_at > n, (n, killed_at)
    ckpt = latest()
    best_before = torch.load(ckpt, weights_only=True)["validation"]
    assert best_before["best_metric_epoch"] == 1 and best_before["key_metric_saved"][0][0][1].startswith("model_key_metric=")

    res = subprocess.run(cmd, cwd=FT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, _tail(res)
    its = _iterations(res.stdout)
    assert its[0] == n + 1 and its[-1] == 40, its[:3]
    assert f"Restored all variables from {ckpt}" in res.stdout
    assert Path(latest()).name == "checkpoint_epoch=4.pt"
    for name in ("model_final.pt", "model.pt"):
        load_weights(transunet_from_preset("tiny", img_size=64), root / "models" / name)
    best = torch.load(latest(), weights_only=True)["validation"]
    assert best["best_metric_epoch"] >= 1 and best["best_metric"] >= best_before["best_metric"]

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reliability").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == ckpt
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert steps == set(range(1, 41)), sorted(set(range(1, 41)) - steps)
    print(f"killed at iteration {killed_at}, resumed from {n}, finished at 40")


# ------------------------------------------------------------------------------------------
# custom.errors, in-process


def test_settings_schema_specs():
    """The settings checks (now the bundle's JSON Schema, custom.settings) keep the old specs' strictness."""
    from custom.errors import ConfigError
    from custom.settings import check_values, load_schema

    schema = load_schema(str(FT / "configs"))
    good = {"num_classes": 3, "num_workers": 0, "crop_size": 224, "cache_rate": 0.5, "class_weights": None,
            "resume": True, "planes": "orthoplane", "learning_rate": 1e-3}
    assert check_values(good, schema) is True
    for name, value, expected in [
        ("num_classes", "abc", "expected an integer >= 1, got 'abc' (str)"),
        ("seed", True, "expected an integer, got True (bool)"),
        ("num_classes", 100.0, "expected an integer >= 1, got 100.0 (float)"),
        ("crop_size", 200, "expected a positive multiple of 16, got 200"),
        ("cache_rate", 1.5, "expected a number in [0, 1], got 1.5"),
        ("resume", "false", "expected True or False, got 'false' (str)"),
        ("planes", "z", "expected one of 'xy', 'xz', 'yz', 'orthoplane', got 'z'"),
        ("learning_rate", float("nan"), "expected a number > 0, got nan"),
        ("class_weights", [], "expected a list of numbers such as [1.0, 2.0] or None, got []"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"{name}: {expected}")):
            check_values({name: value}, schema)


def test_one_line_error_finds_the_user_error_in_the_chain(tmp_path):
    from custom.checkpoints import CheckpointError
    from custom.io import DatasetError
    from custom.errors import ConfigError, OutputError, describe, one_line_error

    def wrapped(err):
        try:
            try:
                raise err
            except Exception as e:
                raise RuntimeError("Failed to evaluate ConfigExpression: ...") from e
        except RuntimeError as outer:
            return outer

    assert one_line_error(wrapped(DatasetError("/d/a.tif: bad\nthing")), "b") == "b: dataset error: /d/a.tif: bad; thing"
    assert one_line_error(wrapped(CheckpointError("/m.pt: no")), "b") == "b: checkpoint error: /m.pt: no"
    assert one_line_error(wrapped(OutputError("/o: ro")), "b") == "b: output error: /o: ro"
    assert one_line_error(ConfigError("lr: bad"), "b") == "b: config error: lr: bad"
    err = OSError(28, "No space left on device", str(tmp_path / "x.pt"))
    assert one_line_error(wrapped(err), "b") == f"b: file error: {tmp_path / 'x.pt'}: No space left on device"
    # re-raised from a DataLoader worker: the message holds the worker's traceback
    worker = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                          '  File "x.py", line 1\ncustom.io.DatasetError: /d/b.png: empty file (0 bytes)\n')
    assert one_line_error(worker, "b") == "b: dataset error: /d/b.png: empty file (0 bytes)"
    assert one_line_error(wrapped(KeyError("k")), "b") is None  # a bug, not a user error: traceback as usual
    assert describe(wrapped(DatasetError("/d/a.tif: bad"))) == "/d/a.tif: bad"
    assert describe(KeyError("k")) == "KeyError: 'k'"


def test_report_errors_prints_one_line_and_delegates_the_rest(capsys, monkeypatch):
    from custom.io import DatasetError
    from custom.errors import report_errors

    import logging

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    factory = logging.getLogRecordFactory()
    try:
        _report_errors_checks(report_errors, DatasetError, capsys, monkeypatch)
    finally:
        logging.setLogRecordFactory(factory)  # the reporter's record factory stays out of other tests


def _report_errors_checks(report_errors, DatasetError, capsys, monkeypatch):
    import logging

    report_errors("retina_x")
    report_errors("retina_x")  # idempotent: one line, not two

    def fire(exc):
        try:
            raise exc
        except BaseException:
            sys.excepthook(*sys.exc_info())
        return capsys.readouterr().err

    assert fire(RuntimeError("wrapper")) .count("Traceback") == 1  # unknown: the usual traceback
    try:
        raise RuntimeError("Failed to evaluate") from DatasetError("/d/a.tif: bad")
    except RuntimeError as e:
        err = fire(e)
    assert err == "retina_x: dataset error: /d/a.tif: bad\n"
    # the log keeps a record of a known error but not its traceback (MONAI's StatsHandler logs one)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("retina_test_report_errors")
    log.addHandler(handler)
    try:
        for exc in (DatasetError("/d/a.tif: bad"), KeyError("k")):
            try:
                raise exc
            except Exception:
                log.exception("Exception: %s", exc)
    finally:
        log.removeHandler(handler)
    assert records[0].exc_info is None and records[0].getMessage() == "Exception: /d/a.tif: bad"
    assert records[1].exc_info is not None  # a bug keeps its traceback
    monkeypatch.setenv("RETINA_TRACEBACK", "1")
    err = fire(DatasetError("/d/a.tif: bad"))
    assert "Traceback" in err and err.endswith("retina_x: dataset error: /d/a.tif: bad\n")


def test_check_output_dirs_and_tracking_uri(tmp_path):
    from custom.errors import OutputError, TrackingError
    from custom.preflight import check_output_dirs, check_tracking_uri

    assert check_output_dirs([tmp_path / "a" / "b", None, ""]) is True and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="output folder cannot be written: Not a directory"):
        check_output_dirs(tmp_path / "f" / "out")
    with pytest.raises(OutputError, match=r"MiB free on its disk, 1e\+12 MiB needed"):
        check_output_dirs(tmp_path, min_free_mb=1e12)
    if not IS_ROOT:
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(OutputError, match="Permission denied"):
            check_output_dirs(tmp_path / "ro" / "out")
    start = time.time()
    with pytest.raises(TrackingError, match=r"unreachable \(connection refused\)"):
        check_tracking_uri(UNREACHABLE)
    assert time.time() - start < 10
    assert check_tracking_uri(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}") and (tmp_path / "db").is_dir()
    with pytest.raises(OutputError):
        check_tracking_uri(f"sqlite:///{tmp_path / 'f' / 'mlflow.db'}")
    assert check_tracking_uri(None) and check_tracking_uri("databricks")
