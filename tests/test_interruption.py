"""Interruption of both bundles (issue 6): a kill while a checkpoint is written, partial files
left next to the checkpoints, and a killed fine-tuning run resumed (weights, best-model bookkeeping
and its MLflow run continued).

The kills are real (SIGKILL from inside ``torch.save``, or of a ``python -m monai.bundle run``
started from the bundle's folder with the demo overrides, outputs under ``tmp_path``).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from custom.networks import transunet_from_preset
from tests.helpers import (
    FT,
    TRAIN,
    bundle_cmd,
    bundle_env,
    iterations,
    tail,
    wait_for,
    write_labelled,
)

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

    res = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], env=bundle_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, tail(res)
    assert res.stdout.split() == ["atomic", "-9", "monai", "-9", "state_dict", "-9"], tail(res)

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


def test_finetune_killed_mid_run_resumes_and_continues_its_mlflow_run(tmp_path):
    """SIGKILL a fine-tuning run a few iterations after its first checkpoint, run the same command again:
    it resumes from that checkpoint (the iterations after it are redone), ends at the configured
    iteration count, its final weights load, the best-model bookkeeping survives, and MLflow shows one
    run (the killed one, continued, tagged ``resumed_from``) with a loss for every iteration."""
    import mlflow

    from custom.checkpoints import load_weights
    from custom.handlers import latest_checkpoint

    ds = write_labelled(tmp_path / "ds", shape=(4, 64, 64))
    root, uri = tmp_path / "root", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    cmd = bundle_cmd(FT, TRAIN, "--bundle_root", root, "--dataset_dir", ds, "--transfer", "none", "--iterations", 40,
                      "--val_interval", 10, "--log_interval", 1, "--tracking", "mlflow", "--tracking_uri", uri,
                      "--experiment_name", "reliability")
    resume_dir = root / "eval" / "checkpoints"
    log = tmp_path / "killed.log"

    def latest():
        return latest_checkpoint(resume_dir, score_name="epoch")

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=FT, env=bundle_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: latest() is not None, proc, 240, "checkpoint")
            n = 10 * int(re.search(r"epoch=(\d+)", latest()).group(1))  # written after each validation
            wait_for(lambda: max(iterations(log.read_text()), default=0) >= n + 3, proc, 120, "iteration after it")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    killed_at = max(iterations(log.read_text()))
    assert n == 10 and killed_at > n, (n, killed_at)
    ckpt = latest()
    best_before = torch.load(ckpt, weights_only=True)["validation"]
    assert best_before["best_metric_epoch"] == 1 and best_before["key_metric_saved"][0][0][1].startswith("model_key_metric=")

    res = subprocess.run(cmd, cwd=FT, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, tail(res)
    its = iterations(res.stdout)
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
