"""The retina_pretrain bundle end to end: configs, demo run with MLflow, resume, real-data learning.

Runs go through ``python -m monai.bundle run`` in a subprocess from the bundle's folder (the
README's command) with ``--bundle_root`` in a temporary folder, so the repository stays clean.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from custom.handlers import latest_checkpoint
from custom.io import DatasetError, pretraining_datalist
from custom.synthetic import write_unlabelled_demo
from tests.helpers import PRE, TRAIN, bundle_env, iterations

CONFIGS = PRE / "configs"


def _bundle_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = bundle_env()
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(cmd, cwd=PRE, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo_data")
    write_unlabelled_demo(folder)
    return folder


# ---------------------------------------------------------------- configs


def test_metadata_is_valid_against_monai_schema(shared_dir, tmp_path):
    from monai.bundle import verify_metadata

    schema = shared_dir / "reference" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip(f"{schema} not present")
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    refs = " ".join(meta["references"])
    assert "10.1371/journal.pcbi.1013115" in refs and "EMPIAR-10592" in refs
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [224, 224]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 1


def test_network_matches_metadata():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        preset="tiny",  # same input/output contract as vit_b, a fraction of the CPU time
    )


def test_model_zoo_ids_and_properties(demo_data, tmp_path):
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")],
        workflow_type="train",
        logging_file=False,
        bundle_root=str(tmp_path),
        demo_dir=str(demo_data),
    )
    wf.initialize()
    assert wf.check_properties() == []
    for id_ in ("train#trainer#max_epochs", "train#dataset#data", "validate#dataset#data", "train#handlers",
                "validate#handlers", "validate#evaluator", "network_def", "lr_scheduler", "tracking_uri"):
        assert id_ in wf.parser, id_
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch_length == 20 and trainer.state.max_epochs == 5  # 100 iterations
    opt = wf.parser.get_parsed_content("optimizer")
    assert opt.defaults["lr"] == 0.003 and opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    sched = wf.parser.get_parsed_content("lr_scheduler")
    assert sched.total_iters == 100 and sched.power == 0.9
    # the multi-GPU overrides keep the ids they patch
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    for id_ in ("train#sampler", "validate#sampler", "train#dataloader#sampler", "validate#evaluator#val_handlers"):
        assert id_ in parser, id_


def test_datalist_split_is_by_file_deterministic_and_errors_are_one_line(demo_data, tmp_path):
    a = pretraining_datalist(str(demo_data), tmp_path / "unused")
    b = pretraining_datalist(str(demo_data), tmp_path / "unused")
    assert a == b and a["training"] and a["validation"]
    train_files = {d["image"] for d in a["training"]}
    val_files = {d["image"] for d in a["validation"]}
    assert not train_files & val_files
    stack_items = [d for d in a["training"] + a["validation"] if d["index"] >= 0]
    assert stack_items and all(d["plane"] == "xy" for d in stack_items)  # the 3D stack gives slices
    # no dataset_dir: the synthetic demo set is written and used
    demo = pretraining_datalist("", tmp_path / "demo")
    assert (tmp_path / "demo").is_dir() and len(demo["training"]) == len(a["training"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError):
        pretraining_datalist(str(empty), tmp_path / "unused")
    with pytest.raises(SystemExit, match=r"^retina_pretrain: dataset error: .*empty") as exc:
        pretraining_datalist(str(empty), tmp_path / "unused", exit_on_error=True)
    assert "\n" not in str(exc.value)


def test_bad_dataset_fails_before_training_with_one_line(tmp_path):
    res = _bundle_run("--config_file", TRAIN, "--bundle_root", str(tmp_path), "--dataset_dir", str(tmp_path / "missing"))
    assert res.returncode != 0
    err = [line for line in res.stderr.splitlines() if line.strip() and "parsing config_file" not in line]
    assert len(err) == 1 and "dataset error" in err[0] and "missing" in err[0], res.stderr
    assert "train_loss" not in res.stdout and "Traceback" not in res.stderr


# ---------------------------------------------------------------- demo run, MLflow, inference


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_data):
    """The README's demo command with MLflow tracking into a temporary SQLite store."""
    root = tmp_path_factory.mktemp("pretrain_demo")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    t0 = time.time()
    res = _bundle_run(
        "--config_file", TRAIN, "--bundle_root", str(root), "--demo_dir", str(demo_data),
        "--tracking", "mlflow", "--tracking_uri", uri, "--experiment_name", "retina_pretrain_test",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"root": root, "uri": uri, "log": res.stdout, "seconds": time.time() - t0}


def test_demo_run_logs_to_mlflow_and_loss_goes_down(demo_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=demo_run["uri"])
    previous, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(demo_run["uri"])
    try:
        runs = mlflow.search_runs(experiment_names=["retina_pretrain_test"], output_format="list")
    finally:
        mlflow.set_tracking_uri(previous)
        # set_tracking_uri also sets MLFLOW_TRACKING_URI, which MONAI's MLFlowHandler prefers to its
        # tracking_uri argument: left set, later in-process tracked runs would log into ./mlruns
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 100  # one per iteration
    first, last = float(np.mean(losses[:15])), float(np.mean(losses[-15:]))
    assert last < first, (first, last)
    for name in ("val_mse", "val_psnr", "val_ssim"):
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == 5 and all(np.isfinite(m.value) for m in history), name
    params = run.data.params
    assert params["preset"] == "tiny" and params["learning_rate"] == "0.003" and params["crop_size"] == "64"
    assert params["augmentation.noise_var_range"] == "[400.0, 1200.0]"
    assert params["intensity.mapping"] == "dtype" and params["intensity.fingerprint.dtype"] == "uint8"
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert len(samples) == 5 and all(p.endswith(".png") for p in samples)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]


def test_demo_run_writes_checkpoints_samples_and_plain_final_weights(demo_run):
    from PIL import Image

    from custom.checkpoints import load_weights
    from custom.networks import transunet_from_preset

    root = demo_run["root"]
    sd = torch.load(root / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())  # plain state dict (contract format)
    load_weights(transunet_from_preset("tiny", head="reconstruction", img_size=64), root / "models" / "model.pt")
    assert Path(latest_checkpoint(root / "outputs" / "checkpoints")).name == "checkpoint_iteration=100.pt"
    full = torch.load(latest_checkpoint(root / "outputs" / "checkpoints"), weights_only=True)
    assert set(full) == {"model", "optimizer", "lr_scheduler", "trainer", "run_settings"}
    pngs = sorted((root / "outputs" / "samples").glob("samples_iter*.png"))
    assert [p.name for p in pngs][-1] == "samples_iter0000100.png" and len(pngs) == 5
    w, h = Image.open(pngs[-1]).size
    assert w == 3 * 64 and h % 64 == 0 and h >= 64  # input | reconstruction | target per row


def test_inference_reconstructs_a_folder(demo_run, demo_data, tmp_path):
    out = tmp_path / "recon"
    res = _bundle_run(
        "--config_file", "['configs/inference.json','configs/demo.json']", "--bundle_root", str(demo_run["root"]),
        "--dataset_dir", str(demo_data), "--output_dir", str(out), "--output_ext", ".tif",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import tifffile

    written = sorted(out.glob("*.tif"))
    assert len(written) == 24 + 8  # 24 demo images + 8 slices of the demo stack
    arr = tifffile.imread(written[0])
    assert arr.dtype == np.float32 and arr.shape == (160, 160) and 0 <= arr.min() and arr.max() <= 1


# ---------------------------------------------------------------- resume


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, demo_data):
    common = ["--config_file", TRAIN, "--bundle_root", str(tmp_path), "--demo_dir", str(demo_data),
              "--val_interval", "10", "--log_interval", "1"]
    ckpt_dir = tmp_path / "outputs" / "checkpoints"
    env = bundle_env()
    # the same command twice (a resume with other settings is refused: tests/test_runs.py); the
    # kill comes at the first checkpoint, long before iteration 200
    proc = subprocess.Popen([sys.executable, "-m", "monai.bundle", "run", *common, "--iterations", "200"],
                            cwd=PRE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while latest_checkpoint(ckpt_dir) is None:
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n = int(re.search(r"iteration=(\d+)", latest_checkpoint(ckpt_dir)).group(1))
    assert n >= 10
    res = _bundle_run(*common, "--iterations", "200")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    its = iterations(res.stdout)
    assert its and its[0] == n + 1 and its[-1] == 200, its[:3]
    assert Path(latest_checkpoint(ckpt_dir)).name == "checkpoint_iteration=200.pt"


# ---------------------------------------------------------------- learning on real EM


def test_pretraining_on_real_em_beats_the_degraded_input(shared_dir, tmp_path):
    data = shared_dir / "data" / "unlabeled_2d"
    if not data.is_dir():
        pytest.skip(f"{data} not present")
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")],
        workflow_type="train",
        logging_file=False,
        bundle_root=str(tmp_path),
        dataset_dir=str(data),
        iterations=60,
        val_interval=20,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests.helpers.bundle_env
    try:
        wf.initialize()
        wf.run()
    finally:
        torch.set_num_threads(threads)
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    val_mse = evaluator.state.metrics["val_mse"]
    # the baseline: MSE between the degraded input and its target, same validation items and draws
    val_ds = wf.parser.get_parsed_content("validate#dataset")
    baseline = float(np.mean([torch.mean((d["image"] - d["label"]) ** 2).item() for d in val_ds]))
    wf.finalize()
    assert len(val_ds) >= 3
    assert val_mse < baseline, (val_mse, baseline)


# ---------------------------------------------------------------- multi-GPU config, on CPU


@pytest.mark.slow
def test_multi_gpu_config_runs_two_cpu_processes(tmp_path, demo_data):
    """multi_gpu_train.json's wiring (DDP, samplers, rank-0 handlers) under torchrun with gloo.

    The config itself falls back to CPU devices and the gloo backend when CUDA is absent.
    """
    configs = "['configs/train.json','configs/multi_gpu_train.json','configs/demo.json']"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd = torchrun + ["-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(tmp_path),
                      "--demo_dir", str(demo_data), "--iterations", "40"]
    res = subprocess.run(cmd, cwd=PRE, env=bundle_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "val_mse" in res.stdout, res.stdout[-3000:]
    # rank-0-only validation handlers: one sample PNG per validation (ranks' stdout may interleave,
    # so files are counted, not log lines)
    samples = sorted(p.name for p in (tmp_path / "outputs" / "samples").glob("*.png"))
    assert samples == ["samples_iter0000020.png", "samples_iter0000040.png"], samples
    sd = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)  # DDP unwrapped: the contract format
    assert Path(latest_checkpoint(tmp_path / "outputs" / "checkpoints")).name == "checkpoint_iteration=40.pt"
