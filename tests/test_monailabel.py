"""MONAI Label 0.8.5 serves and trains the retina_finetune bundle: a real ``monailabel start_server``
on 127.0.0.1 in its own virtual environment (``scripts/setup_monailabel_env.sh``).

The app folder is built the way a user builds it (docs/README.md of the bundle, "MONAI Label"):
the ``monaibundle`` sample app copied out of the monailabel wheel, and both bundles unzipped from
their model-zoo zips (``scripts/package_bundle.py``, each carrying its copy of ``custom/``) into
``<app>/model/``. ``retina_pretrain`` sits beside ``retina_finetune`` because fine-tuning transfers
its encoder (``pretrained_path`` is ``../retina_pretrain/models/model.pt``).

What is the test's own, and why:
- weights: tiny-preset networks made here, and ``configs/demo.json`` (tiny preset, 64 px crops)
  merged into each bundle's ``inference.json``/``train.json``, plus ``TRAIN_OVERRIDES`` (a
  4-iteration MONAI Label epoch), so that inference and two training epochs take seconds on a CPU.
  MONAI Label reads only the bundle's configs (it has no command-line overrides for bundles), so
  the demo settings are written into the copies in the app folder. Users serve the released
  bundle with its configs unchanged.
- the segmentation head's bias is set so that about half of the test volume is foreground; the
  label MONAI Label returns is then compared voxel by voxel with the bundle's own pipeline
  (``preprocessing``/``inferer``/``postprocessing`` of ``inference.json`` run here), which catches
  any axis or orientation mix-up (an all-foreground label would not).
- two training requests: the second must train again, not resume the finished first one.
- :func:`test_monailabel_trains_the_bundle_alone`: ``retina_finetune`` served alone, as a model-zoo
  user has it (no ``../retina_pretrain``): training continues from the bundle's ``models/model.pt``
  (one log line says so) instead of failing for want of the pretraining checkpoint; without any
  weights to start from, the training task ends ``ERROR`` and the server log holds the one-line reason.
- the server lists ``retina_pretrain`` first, then ``retina_finetune``: MONAI Label imports
  ``custom`` once, from the first bundle that needs it, and keeps it for all bundles (it unloads
  only a module named ``scripts``); its training subprocess builds the app again, so the same
  holds there. The test checks that the fine-tuning bundle infers and trains on the pretraining
  bundle's copy (``__pycache__`` appears only there; both copies come from this repository and
  are identical). MONAI Label's launcher puts ``<venv>/../..`` on ``PYTHONPATH`` (this repository
  for the default venv location), but a bundle's root comes first on ``sys.path`` when it loads.

Skipped (with the reason) where the MONAI Label environment is absent: its path is
``$RETINA_MONAILABEL_VENV``, default ``<repo>/.venv-monailabel``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.checkpoints import load_weights
from custom.io import write_em
from custom.networks import transunet_from_preset
from custom.synthetic import em_volume
from tests.helpers import REPO

VENV = Path(os.environ.get("RETINA_MONAILABEL_VENV", str(REPO / ".venv-monailabel"))).absolute()
SHAPE = (4, 96, 96)  # (Z, Y, X) of the test volumes
N_IMAGES, N_LABELLED = 5, 4
TRAIN_OVERRIDES = {"val_interval": 4, "iterations": 8}  # MONAI Label epoch = val_interval iterations
TRAIN_REQUEST = {"max_epochs": 2, "val_split": 0.25, "device": "cpu", "multi_gpu": False}
MODELS = "retina_pretrain,retina_finetune"

pytestmark = pytest.mark.slow


def _log_tail(log: Path, n: int = 60) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no server log)"


def _server_env(tmp: Path) -> dict:
    """The environment MONAI Label's reference README asks for: the env's bin/ first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE")}
    env.update(
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        BUNDLE_DOWNLOAD_SRC="github",  # no online zoo lookup: use the bundles in <app>/model as they are
        MONAI_LABEL_SESSION_PATH=str(tmp / "sessions"),
        MPLBACKEND="Agg",
        PYTHONNOUSERSITE="1",
    )
    return env


@pytest.fixture(scope="module")
def monailabel_venv() -> Path:
    if not (VENV / "bin" / "monailabel").is_file():
        pytest.skip(f"no MONAI Label environment at {VENV} (create it with scripts/setup_monailabel_env.sh, "
                    f"or point RETINA_MONAILABEL_VENV at one)")
    r = subprocess.run([str(VENV / "bin" / "python"), "-c", "import monailabel, monai; print(monailabel.__version__)"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    if r.returncode != 0:
        pytest.skip(f"{VENV} does not import monailabel: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return VENV


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _merge_demo(bundle: Path, extra: dict | None = None) -> None:
    """Write ``configs/demo.json`` (and ``extra``) into the bundle's inference.json and train.json
    (only ids each file has), as ``--config_file "['configs/train.json','configs/demo.json']"``
    would for ``monai.bundle run``."""
    overrides = {**json.loads((bundle / "configs" / "demo.json").read_text()), **(extra or {})}
    for name in ("inference.json", "train.json"):
        path = bundle / "configs" / name
        config = json.loads(path.read_text())
        config.update({k: v for k, v in overrides.items() if k in config})
        assert config["preset"] == "tiny", path
        path.write_text(json.dumps(config, indent=4))


def _bundle_pipeline(bundle: Path, weights: dict):
    """The bundle's own inference pieces (inference.json as the app folder holds it), in this process."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["progress"] = False
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(weights)
    net.eval()
    return net, parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer"), \
        parser.get_parsed_content("postprocessing")


def _calibrate_and_predict(bundle: Path, weights: dict, image: Path) -> tuple[dict, np.ndarray]:
    """Shift the head's bias so that the bundle labels about half of ``image`` foreground; returns
    the new weights and the bundle's own label map ``(Z, Y, X)`` with them."""
    def run(w):
        net, pre, inferer, post = _bundle_pipeline(bundle, w)
        d = pre({"image": str(image)})
        with torch.no_grad():
            d["pred"] = inferer(d["image"][None], net)[0]
        return d["pred"], post(d)["pred"]

    probs, _ = run(weights)
    p = float(torch.quantile(probs.flatten().float(), 0.5).clamp(1e-4, 1 - 1e-4))
    weights = {k: v.clone() for k, v in weights.items()}
    weights["head.bias"] -= float(np.log(p / (1 - p)))
    _, label = run(weights)
    return weights, np.asarray(label)[0]


def _build_app(tmp: Path, env: dict, bundles: tuple = ("retina_finetune", "retina_pretrain")) -> tuple[Path, Path]:
    """``<tmp>/apps/monaibundle`` with ``bundles`` in ``model/``, and ``<tmp>/studies``; returns (app, studies)."""
    r = subprocess.run(["monailabel", "apps", "--download", "--name", "monaibundle", "--output", str(tmp / "apps")],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    app = tmp / "apps" / "monaibundle"
    assert (app / "main.py").is_file(), r.stdout

    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in range(N_IMAGES):
        image, label = em_volume(SHAPE, seed=i)
        write_em(studies / f"em{i}.nii.gz", image)
        if i < N_LABELLED:
            write_em(studies / "labels" / "final" / f"em{i}.nii.gz", label)

    # weights: tiny presets (crop 64 as in demo.json); the segmentation head calibrated on em4
    torch.manual_seed(0)
    seg = transunet_from_preset("tiny", img_size=64).state_dict()
    rec = transunet_from_preset("tiny", img_size=64, head="reconstruction").state_dict()
    for name, weights in (("retina_finetune", seg), ("retina_pretrain", rec)):
        if name not in bundles:
            continue
        torch.save(weights, tmp / f"{name}.pt")
        r = subprocess.run([sys.executable, str(REPO / "scripts" / "package_bundle.py"), name, "--out", str(tmp / "dist"),
                            "--weights", str(tmp / f"{name}.pt"), "--overlay", "configs/demo.json"],  # tiny demo weights
                           cwd=tmp, capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr
        (zpath,) = (tmp / "dist").glob(f"{name}_v*.zip")
        with zipfile.ZipFile(zpath) as z:
            z.extractall(app / "model")
        bundle = app / "model" / name
        assert (bundle / "custom" / "__init__.py").is_file() and (bundle / "models" / "model.pt").is_file()
        _merge_demo(bundle, TRAIN_OVERRIDES if name == "retina_finetune" else None)
    return app, studies


def _start_server(app: Path, studies: Path, port: int, env: dict, log: Path, models: str = MODELS) -> subprocess.Popen:
    cmd = ["monailabel", "start_server", "--app", str(app), "--studies", str(studies), "--conf", "models", models,
           "--conf", "zoo_source", "github", "--conf", "sam2", "false", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server and its training subprocess), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_info(base: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{_log_tail(log)}")
        try:
            status, body = _http("GET", f"{base}/info/", timeout=10)
            if status == 200:
                return json.loads(body)
        except (OSError, ValueError):
            pass
        time.sleep(2)
    pytest.fail(f"GET /info/ did not answer within {timeout:.0f} s:\n{_log_tail(log)}")


def _train(base: str, log: Path, timeout: float = 1200, expect: str = "DONE") -> str:
    """POST /train/retina_finetune, poll GET /train/ until that task has ended (with status ``expect``);
    returns the server log's lines from the training (GET /train/ keeps only the last 20 lines of the
    task's output)."""
    offset = log.stat().st_size
    status, body = _http("POST", f"{base}/train/retina_finetune", body=TRAIN_REQUEST, timeout=120)
    assert status == 200, body[:2000]
    task_id = json.loads(body)["id"]
    deadline = time.monotonic() + timeout
    task: dict = {}
    while time.monotonic() < deadline:
        status, body = _http("GET", f"{base}/train/?check_if_running=false", timeout=30)
        if status == 200 and body.strip():
            task = json.loads(body)
            if task.get("id") == task_id and task.get("status") in ("DONE", "ERROR", "STOPPED"):
                with open(log, "rb") as f:
                    f.seek(offset)
                    output = f.read().decode(errors="replace")
                assert task["status"] == expect, f"training ended {task['status']}:\n{output[-6000:]}"
                if expect == "DONE":
                    assert "Training Finished" in output and "[retina] best validation mean IoU" in output, output[-6000:]
                return output
        time.sleep(5)
    _http("DELETE", f"{base}/train/", timeout=60)
    details = "\n".join(task.get("details", [])[-40:])
    pytest.fail(f"training did not finish within {timeout:.0f} s (last status {task.get('status')}):\n{details}\n{_log_tail(log)}")


def test_monailabel_infer_and_train(monailabel_venv, tmp_path):
    start = time.monotonic()
    env = _server_env(tmp_path)
    app, studies = _build_app(tmp_path, env)
    finetune = app / "model" / "retina_finetune"
    pretrain = app / "model" / "retina_pretrain"
    assert {p.name: p.read_bytes() for p in (finetune / "custom").glob("*.py")} == \
        {p.name: p.read_bytes() for p in (pretrain / "custom").glob("*.py")}, "the two bundles carry different custom/"

    # the segmentation weights, calibrated on the unlabelled volume, and the bundle's own label for it
    image = studies / f"em{N_IMAGES - 1}.nii.gz"
    weights, expected = _calibrate_and_predict(finetune, torch.load(finetune / "models" / "model.pt"), image)
    torch.save(weights, finetune / "models" / "model.pt")
    assert expected.shape == SHAPE and 0.2 < expected.mean() < 0.8, expected.mean()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = _start_server(app, studies, port, env, log)
    try:
        # 1. the server lists the model, its label and its trainer
        info = _wait_for_info(base, proc, log)
        assert "retina_finetune" in info["models"], info["models"].keys()
        assert info["models"]["retina_finetune"]["labels"] == {"mitochondrion": 1}
        assert "retina_pretrain" in info["models"]  # loaded first: its custom/ serves both bundles
        assert "retina_finetune" in info["trainers"]

        # 2. inference returns a label volume of the image's shape and grid, equal to the bundle's own
        t0 = time.monotonic()
        status, body = _http("POST", f"{base}/infer/retina_finetune?image={image.name[:-7]}&output=image", timeout=900)
        assert status == 200, body[:2000].decode(errors="replace") + "\n" + _log_tail(log)
        infer_s = time.monotonic() - t0
        result = tmp_path / "result.nii.gz"
        result.write_bytes(body)
        img, lab = nib.load(str(image)), nib.load(str(result))
        assert lab.shape == img.shape, (lab.shape, img.shape)
        np.testing.assert_allclose(lab.affine, img.affine, atol=1e-5)
        got = np.asarray(lab.dataobj).T  # NIfTI (x, y, z) -> the bundle's (z, y, x)
        assert set(np.unique(got).tolist()) <= {0, 1}
        agreement = float((got == expected).mean())
        assert agreement > 0.98, f"MONAI Label's label agrees with the bundle's own on {agreement:.1%} of voxels"
        # custom was imported once, from the first bundle listed (retina_pretrain), never from this repository
        assert (pretrain / "custom" / "__pycache__").is_dir(), _log_tail(log)
        assert not (finetune / "custom" / "__pycache__").exists()

        # 3. training on the labelled volumes runs to the end and replaces models/model.pt
        before = _md5(finetune / "models" / "model.pt")
        t0 = time.monotonic()
        output = _train(base, log)
        train_s = time.monotonic() - t0
        assert f"until {TRAIN_REQUEST['max_epochs']} epochs" in output, output[-6000:]  # max_epochs reached the bundle
        assert _md5(finetune / "models" / "model.pt") != before
        load_weights(transunet_from_preset("tiny", img_size=64), finetune / "models" / "model.pt")
        # a second request trains again (the first one's resume checkpoints must not make it a no-op)
        final = _md5(finetune / "models" / "model_final.pt")
        t0 = time.monotonic()
        output = _train(base, log)
        train2_s = time.monotonic() - t0
        assert f"resuming from iteration 0, epoch 0 until {TRAIN_REQUEST['max_epochs']} epochs" in output, output[-6000:]
        assert _md5(finetune / "models" / "model_final.pt") != final
        # the training subprocess builds the app again: custom came from the first bundle's copy again
        assert not (finetune / "custom" / "__pycache__").exists()
    finally:
        _stop_server(proc)
    print(f"MONAI Label: inference {infer_s:.0f} s, training ({TRAIN_REQUEST['max_epochs']} epochs of "
          f"{TRAIN_OVERRIDES['val_interval']} iterations) {train_s:.0f} s and again {train2_s:.0f} s, "
          f"whole test {time.monotonic() - start:.0f} s")


def test_monailabel_trains_the_bundle_alone(monailabel_venv, tmp_path):
    env = _server_env(tmp_path)
    app, studies = _build_app(tmp_path, env, bundles=("retina_finetune",))
    finetune = app / "model" / "retina_finetune"
    assert not (app / "model" / "retina_pretrain").exists()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = _start_server(app, studies, port, env, log, models="retina_finetune")
    try:
        info = _wait_for_info(base, proc, log)
        assert "retina_finetune" in info["trainers"], info["trainers"]
        before = _md5(finetune / "models" / "model.pt")
        output = _train(base, log)
        lines = [line for line in output.splitlines() if "continuing from the bundle's own weights" in line]
        assert len(lines) == 1 and "pretrained checkpoint not found" in lines[0], output[-6000:]
        assert _md5(finetune / "models" / "model.pt") != before
        load_weights(transunet_from_preset("tiny", img_size=64), finetune / "models" / "model.pt")

        # nothing to continue from: the task ends ERROR, and the server log says why in one line
        for name in ("model.pt", "model_final.pt"):
            (finetune / "models" / name).unlink(missing_ok=True)
        output = _train(base, log, expect="ERROR")
        errors = [line for line in output.splitlines() if "retina_finetune: checkpoint error: " in line]
        assert len(errors) == 1 and "pretrained checkpoint not found" in errors[0], output[-6000:]
        assert "Traceback" not in output, output[-6000:]
    finally:
        _stop_server(proc)
    print(lines[0].split(" - ")[-1])
    print(errors[0].split(" - ")[-1][:300])
