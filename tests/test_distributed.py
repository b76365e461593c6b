"""Distributed (DDP) fine-tuning: ``configs/multi_gpu_train.json`` of retina_finetune under ``torchrun``.

The 2-process test runs the README's command, ``torchrun --nproc_per_node 2 -m monai.bundle run
--config_file "['configs/train.json','configs/multi_gpu_train.json','configs/demo.json']"``, from the
bundle folder with 2 CPU processes: the config itself picks gloo and CPU when CUDA is absent, so
nothing of it is replaced. A test-only overlay only (a) sends the writes of ranks > 0 to their own
folders, so that "only rank 0 writes" is a file-system fact rather than an inference from file
names, and (b) appends one ``finalize`` line that writes what each rank did to ``rank<r>.json``.
(The pretraining bundle's 2-process test is ``test_pretrain_bundle.py::test_multi_gpu_config_runs_two_cpu_processes``.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from tests.helpers import FT, bundle_env

CONFIGS = FT / "configs"
ORDER = ["train", "multi_gpu_train", "demo"]  # the README's order: demo's small-model overrides come last


def _config_file(names, *extra: Path) -> str:
    """``--config_file`` value as the README writes it (relative to the bundle folder), plus extra files."""
    return "[" + ",".join([f"'configs/{n}.json'" for n in names] + [f"'{p}'" for p in extra]) + "]"


def torchrun_cmd(config_file: str, *args: str, launcher: tuple = ("--standalone", "--nnodes", "1", "--nproc_per_node", "2")) -> list[str]:
    """``torchrun LAUNCHER -m monai.bundle run --config_file ... ARGS`` (``python -m torch.distributed.run`` is what
    the ``torchrun`` script runs; ``--standalone`` picks a free local port, so concurrent runs do not collide)."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "monai.bundle", "run", "--config_file", config_file, *args]


def torchrun_bundle(bundle: Path, config_file: str, *args: str, timeout: float = 400, trusted: Path | None = None
                    ) -> subprocess.CompletedProcess:
    """The README's single-node command with 2 processes, run from ``bundle``'s folder (``trusted``: a folder
    whose config overlays may hold code, ``$RETINA_TRUSTED_CONFIGS``, see custom/overlays.py)."""
    env = {**bundle_env(), **({"RETINA_TRUSTED_CONFIGS": str(trusted)} if trusted else {})}
    return subprocess.run(torchrun_cmd(config_file, *args), cwd=bundle, env=env, capture_output=True, text=True, timeout=timeout)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ config, fast


def test_multi_gpu_config_merges_and_tracks_train_json():
    train = json.loads((CONFIGS / "train.json").read_text())
    multi = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    # the README's order and demo-before-multi-GPU give the same merged config (demo touches no DDP id)
    merged = {}
    for order in (ORDER, ["train", "demo", "multi_gpu_train"]):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f"{n}.json") for n in order])
        merged[tuple(order)] = parser.get()
    a, b = merged.values()
    assert a == b
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f"{n}.json") for n in ORDER])
    for id_ in ("train#sampler", "validate#sampler", "train#dataloader#sampler", "train#trainer#train_handlers",
                "validate#evaluator#val_handlers", "train#handlers", "validate#handlers", "pretrained_path"):
        assert id_ in parser, id_
    assert parser["crop_size"] == 64 and parser["preset"] == "tiny"  # demo still applies
    for key in multi:  # every id patched by the overlay still exists where it points
        key = key.lstrip("+")  # a `+` merge appends to train.json's own list
        parent = key.rsplit("#", 1)[0] if "#" in key else key
        assert parent in parser and (parent in ("train#sampler", "validate#sampler") or parent.split("#")[0] in train), key
    # drift guards: the DDP module is train.json's network, and multi_gpu_train.json's initialize/run/finalize keep
    # every step of train.json's (verbatim or guarded to rank 0), except the per-rank seed and the final message
    assert multi["network"]["module"] == train["network"]
    for section in ("initialize", "run"):  # a section the overlay does not replace is train.json's own
        steps = "\n".join(multi.get(section, train[section]))
        for line in train[section]:
            if "set_determinism" not in line:
                assert line[1:] in steps, f"multi_gpu_train.json's {section} lacks train.json's step {line!r}"
    final = "\n".join(multi.get("finalize", train["finalize"]))
    for line in train["finalize"]:  # the final summary (custom.runs.log_summary), on rank 0
        assert "log_summary" in line and line[1:] in final, line


# ------------------------------------------------------------------------------------------ 2 processes, slow


@pytest.fixture
def pretrained(tmp_path) -> Path:
    """What the retina_pretrain demo leaves: a tiny reconstruction TransUNet state dict (64 px grid)."""
    from custom.networks import transunet_from_preset

    torch.manual_seed(0)
    path = tmp_path / "pretrained" / "model.pt"
    path.parent.mkdir()
    torch.save(transunet_from_preset("tiny", img_size=64, head="reconstruction").state_dict(), path)
    return path


def test_finetune_ddp_two_cpu_processes(tmp_path, pretrained):
    """2 ranks train in lockstep on disjoint data; only rank 0 writes checkpoints, overlays and the one MLflow run;
    the checkpoints load into a single-process network. 15-40 s on 2 shared cores."""
    import mlflow

    from custom.checkpoints import load_weights

    root = tmp_path / "bundle"  # the run's bundle_root: models/, eval/, demo_data/
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    rank_dir = "('' if os.environ['RANK'] == '0' else '_rank' + os.environ['RANK'])"
    overlay = {
        # writes of ranks > 0, if any, land in <folder>_rank<r>/ (rank 0 keeps the real paths)
        "ckpt_dir": "$@bundle_root + '/models' + " + rank_dir,
        "output_dir": "$@bundle_root + '/eval' + " + rank_dir,
        "tracking_uri": f"$'{uri}' if os.environ['RANK'] == '0' else '{uri[:-len('.db')]}_rank' + os.environ['RANK'] + '.db'",
        "+finalize": [
            "$import json",
            "$open(os.path.join(@bundle_root, 'rank%s.json' % os.environ['RANK']), 'w').write(json.dumps({"
            "'rank': int(os.environ['RANK']), 'world': int(os.environ['WORLD_SIZE']),"
            "'iterations': @train#trainer.state.iteration, 'last_loss': float(@train#trainer.state.output[0]['loss']),"
            "'train_indices': list(@train#sampler), 'val_indices': list(@validate#sampler),"
            "'train_handlers': [[c.__name__ for c in type(h).__mro__] for h in @train#trainer#train_handlers],"
            "'val_handlers': [[c.__name__ for c in type(h).__mro__] for h in (@validate#evaluator#val_handlers or [])],"
            "'ddp': type(@network).__name__,"
            "'param_sum': float(sum(p.detach().double().sum() for p in @network.module.parameters()))}))",
        ],
    }
    (tmp_path / "rank_overlay.json").write_text(json.dumps(overlay))
    t0 = time.time()
    res = torchrun_bundle(
        FT, _config_file(ORDER, tmp_path / "rank_overlay.json"),
        "--bundle_root", str(root), "--pretrained_path", str(pretrained),
        "--iterations", "20", "--val_interval", "10", "--log_interval", "5",
        "--tracking", "mlflow", "--tracking_uri", uri, "--experiment_name", "retina_finetune_ddp", trusted=tmp_path,
    )
    seconds = time.time() - t0
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    print(f"2-process DDP fine-tuning run: {seconds:.1f} s")

    # both ranks trained: 20 steps each on disjoint halves of the training slices, in lockstep (same weights)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["iterations"] == 20 and r["ddp"] == "DistributedDataParallel" for r in ranks)
    for r in (0, 1):
        assert f"[retina] rank {r} of 2: 20 iterations, 12 of 24 training slices" in log, log[-4000:]
    t0_, t1_ = (set(r["train_indices"]) for r in ranks)
    assert len(t0_) == len(t1_) == 12 and not t0_ & t1_ and t0_ | t1_ == set(range(24))
    v0, v1 = (set(r["val_indices"]) for r in ranks)
    assert v0 and v1 and not v0 & v1 and v0 | v1 == set(range(24))  # validation split too (metrics all-gathered)
    assert ranks[0]["last_loss"] != ranks[1]["last_loss"]  # each rank's own batch
    assert abs(ranks[0]["param_sum"] - ranks[1]["param_sum"]) < 1e-6 * max(1.0, abs(ranks[0]["param_sum"]))
    # handlers (each as its class and base classes): rank 0 has all; rank 1 only the LR schedule, the stop at
    # `iterations` and validation (which every rank must run: validation metrics are gathered over the ranks)
    assert [h[0] for h in ranks[1]["train_handlers"]] == ["LrScheduleHandler", "StopAtIteration", "ValidationHandler"]
    assert ranks[1]["val_handlers"] == []
    for handlers, names in ((ranks[0]["train_handlers"], ("StatsHandler", "CheckpointSaver", "MLFlowHandler")),
                            (ranks[0]["val_handlers"], ("CheckpointSaver", "PredictionOverlays", "MLFlowHandler"))):
        for name in names:
            assert any(name in h for h in handlers), (name, handlers)
    assert log.count("Epoch: 1/2, Iter: 5/10 -- train_loss") == 1  # only rank 0's StatsHandler logs

    # only rank 0 wrote: checkpoints, overlays and MLflow in rank 0's folders; rank 1's stay without files,
    # except the executed-config copy MONAI's --tracking patch exports on every process before DDP starts
    assert _files(root / "models") == ["intensity.json", "model.pt", "model_final.pt"]  # rank 0's intensity record
    assert len(list((root / "eval" / "overlays").glob("epoch*.png"))) == 4  # 2 per validation, 2 validations
    assert _files(root / "models_rank1") == []
    assert all(f.startswith("config_") and f.endswith(".json") for f in _files(root / "eval_rank1"))
    assert not list((tmp_path / "mlruns").glob("mlflow_rank*.db"))
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("retina_finetune_ddp")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert len(client.get_metric_history(run_id, "train_loss")) == 20  # one per global step, not per rank
    assert len(client.get_metric_history(run_id, "val_mean_iou")) == 2
    assert runs[0].data.params["preset"] == "tiny" and runs[0].data.params["transfer"] == "encoder"
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]

    # the result is a plain state dict that loads into a single-process network (the inference config's)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "demo.json")])
    for name in ("model.pt", "model_final.pt"):
        sd = torch.load(root / "models" / name, map_location="cpu", weights_only=True)
        assert sd and not any(k.startswith("module.") for k in sd), list(sd)[:3]
        net = load_weights(parser.get_parsed_content("network_def", instantiate=True), root / "models" / name, strict=True)
        if name == "model_final.pt":  # the weights both ranks ended with
            total = float(sum(p.detach().double().sum() for p in net.parameters()))
            assert abs(total - ranks[0]["param_sum"]) < 1e-6 * max(1.0, abs(total))
        with torch.no_grad():
            out = net.eval()(torch.zeros(1, 1, 64, 64))
        assert out.shape == (1, 1, 64, 64) and torch.isfinite(out).all()


@pytest.mark.slow
def test_finetune_two_node_rendezvous_as_slurm_runs_it(tmp_path, pretrained):
    """The README's SLURM line, ``srun torchrun --nnodes N --nproc_per_node G --rdzv_id ID --rdzv_backend c10d
    --rdzv_endpoint MASTER:29500 ...``, starts one torchrun agent per node; here 2 agents on 127.0.0.1 of 1 process
    each stand for 2 nodes (each rank has LOCAL_RANK 0, as on real nodes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_id", f"retina_{port}", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"127.0.0.1:{port}")
    cmd = torchrun_cmd(_config_file(ORDER), "--bundle_root", str(tmp_path / "bundle"), "--pretrained_path", str(pretrained),
                       "--iterations", "10", "--val_interval", "10", launcher=launcher)
    t0 = time.time()
    nodes = [subprocess.Popen(cmd, cwd=FT, env=bundle_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    print(f"2-node (2 x 1 process) rendezvous run: {time.time() - t0:.1f} s")
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    # the message of each rank's log record (logging.conf puts time, logger and level before it)
    done = sorted(line[line.index("[retina] rank"):] for log in logs for line in log.splitlines() if "[retina] rank" in line)
    assert done == [f"[retina] rank {r} of 2: 10 iterations, 12 of 24 training slices per epoch of the DistributedSampler"
                    for r in (0, 1)], done
    assert _files(tmp_path / "bundle" / "models") == ["intensity.json", "model.pt", "model_final.pt"]
