"""Helpers the test modules share (plain functions; the fixtures built on them are in conftest.py).

Import them as ``from tests.helpers import ...`` (pyproject's ``pythonpath = ["."]`` puts the
repository root on ``sys.path``). A test module never imports another test module.

- paths: :data:`REPO`, :data:`SHARED`, the bundles :data:`PRE` and :data:`FT`, the demo config
  lists :data:`TRAIN` and :data:`INFER` (as ``--config_file`` values, relative to the bundle folder);
- bundle runs: :func:`run_bundle` (a fresh ``python -m monai.bundle run`` in a subprocess),
  :func:`run_forked` (many runs as forked children of one interpreter that imported MONAI once),
  :func:`run_workflow` (in-process, through MONAI's ``ConfigWorkflow``);
- what a run printed: :func:`assert_one_line`, :func:`error_lines`, :func:`tail`, :func:`iterations`;
- test data: :func:`write_png`, :func:`write_unlabelled`, :func:`write_labelled`, :func:`write_tiny_checkpoint`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from custom.io import write_em
from custom.networks import transunet_from_preset
from custom.synthetic import em_image, em_volume

REPO = Path(__file__).resolve().parents[1]
#: ``../shared`` next to the repository: developers' EM samples and reference facts (absent in a user's clone)
SHARED = REPO.parent / "shared"
PRE = REPO / "bundles" / "retina_pretrain"
FT = REPO / "bundles" / "retina_finetune"
TRAIN = "['configs/train.json','configs/demo.json']"
INFER = "['configs/inference.json','configs/demo.json']"
#: MONAI's warning about eval() in configs, printed to stderr on every run
NOTICE = "parsing config_file"
#: log lines of a training iteration (MONAI's StatsHandler) or of a validation
ITERATION_RE = re.compile(r"Epoch: \d+/\d+, Iter: \d+/\d+|train_loss|Key metric|val_mean_iou|val_mse")
#: MONAI's StatsHandler line of one training iteration
STATS_RE = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- train_loss")
#: forked bundle runs at a time (2 shared CPU cores)
PARALLEL = 2
#: directory permissions do not stop root from writing
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------
# bundle runs


def bundle_env() -> dict:
    """Subprocess environment: unbuffered, one intra-op thread (2 shared cores), no inherited MLflow
    store and no ``RETINA_TRACEBACK`` (so a user error prints its one line)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for k in ("MLFLOW_TRACKING_URI", "RETINA_TRACEBACK"):
        env.pop(k, None)
    return env


def bundle_cmd(bundle: Path, configs: str, *args: str) -> list[str]:
    """``python -m monai.bundle run --config_file CONFIGS ARGS`` (run it from ``bundle``'s folder)."""
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *map(str, args)]


def run_bundle(bundle: Path, configs: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The users' entry point in a fresh interpreter, from ``bundle``'s folder; ``.returncode``,
    ``.stdout`` and ``.stderr`` (text) of the finished run."""
    return subprocess.run(bundle_cmd(bundle, configs, *args), check=False, cwd=bundle, env=bundle_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_workflow(bundle: Path, names: list[str], bundle_root: Path, **overrides):
    """``monai.bundle run`` in-process: ``configs/<name>.json`` of ``bundle`` merged in order, with the
    bundle's metadata and ``bundle_root``; initialised, run and finalised. Returns the ``ConfigWorkflow``."""
    from monai.bundle import ConfigWorkflow

    configs = bundle / "configs"
    wf = ConfigWorkflow(config_file=[str(configs / f"{n}.json") for n in names], meta_file=str(configs / "metadata.json"),
                        logging_file=False, bundle_root=str(bundle_root), **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


# ------------------------------------------------------------------------------------------
# what a run printed


def tail(res: subprocess.CompletedProcess) -> str:
    """The end of a run's output, for assertion messages."""
    return f"rc={res.returncode}\n--- stdout\n{res.stdout[-2500:]}\n--- stderr\n{res.stderr[-2500:]}"


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    """The non-blank stderr lines other than MONAI's config notice."""
    return [line for line in res.stderr.splitlines() if line.strip() and NOTICE not in line]


def assert_one_line(res: subprocess.CompletedProcess, prefix: str, *fragments: str) -> str:
    """Non-zero exit, exactly one line on stderr starting with ``prefix`` and holding ``fragments``,
    no traceback anywhere, and no training or validation output before it."""
    assert res.returncode != 0, tail(res)
    err = error_lines(res)
    assert len(err) == 1, tail(res)
    line = err[0]
    assert line.startswith(prefix), tail(res)
    for frag in fragments:
        assert frag in line, f"{frag!r} not in {line!r}"
    assert "Traceback" not in res.stdout + res.stderr, tail(res)
    assert not ITERATION_RE.search(res.stdout), tail(res)
    return line


def iterations(log: str) -> list[int]:
    """Global iterations of MONAI's StatsHandler lines ``Epoch: e/E, Iter: i/L -- train_loss``."""
    return [(int(e) - 1) * int(n) + int(i) for e, i, n in STATS_RE.findall(log)]


def wait_for(predicate, proc, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s while ``proc`` runs; fail when it ends first or after ``timeout``."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)


def closed_port() -> int:
    """A local TCP port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: an MLflow server address where nothing listens
UNREACHABLE = f"http://127.0.0.1:{closed_port()}"


# ------------------------------------------------------------------------------------------
# test data


def write_png(path: Path, arr: np.ndarray) -> Path:
    """``arr`` (H, W) written as an image file (format from the suffix)."""
    write_em(path, arr)
    return path


def write_unlabelled(folder: Path, n: int = 3, size: int = 96) -> Path:
    """``n`` small EM-like PNGs (what the pretraining bundle reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_png(folder / f"em{i}.png", em_image((size, size), seed=i))
    return folder


def write_labelled(root: Path, shape=(3, 64, 64), n_train: int = 1, n_val: int = 1) -> Path:
    """The fine-tuning layout ``{train,val}/{images,labels}/volN.tif`` with binary labels; ``shape`` (Z, Y, X)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img, lab = em_volume(shape, seed=(split == "val") * 10 + i)
            write_em(root / split / "images" / f"vol{i}.tif", img)
            write_em(root / split / "labels" / f"vol{i}.tif", (lab == 1).astype(np.uint8))
    return root


def write_tiny_checkpoint(path: Path, head: str = "segmentation", out_channels: int = 1, **overrides) -> Path:
    """A seeded tiny-preset TransUNet state dict (64 px grid) saved at ``path``."""
    torch.manual_seed(0)
    net = transunet_from_preset("tiny", img_size=64, head=head, out_channels=out_channels, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------
# many bundle runs, one MONAI import

# A fresh `python -m monai.bundle run` spends 5-8 s of CPU importing MONAI, MLflow, ITK and scipy
# before it looks at its arguments; 30 of them would take most of a test file's 4-minute budget on
# 2 shared cores. The runner below imports them once, then forks one child per case; the child
# does what `python -m monai.bundle run ...` does after its imports: sys.path[0] = the bundle
# folder, sys.argv, `runpy.run_module("monai.bundle", run_name="__main__")`, and the
# interpreter's own exit handling (SystemExit: its code, or its message on stderr and status 1;
# another exception: sys.excepthook, then status 1; atexit functions run). Outputs go to files.
# `test_bad_input.py::test_forked_runner_matches_a_fresh_interpreter` checks one case both ways.
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
    one process that imported MONAI once (see FORK_RUNNER). Returns CompletedProcess-like results
    (with ``.seconds``, the run's wall time), by name."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = []
    for job in jobs:
        argv = ["run", "--config_file", job["configs"], *map(str, job["args"])]
        spec.append({"name": job["name"], "cwd": str(job["bundle"]), "argv": argv,
                     "out": str(folder / f"{job['name']}.out"), "err": str(folder / f"{job['name']}.err")})
    (folder / "jobs.json").write_text(json.dumps(spec))
    runner = subprocess.run(
        [sys.executable, "-c", FORK_RUNNER, str(folder / "jobs.json"), str(parallel), str(folder / "results.json")],
        env=bundle_env(), capture_output=True, text=True, timeout=600, check=False,
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
