"""A training knows what it is (issue 12): what it resumes, who owns its folder, how long it runs,
and which head its weights are for. Every case goes through ``python -m monai.bundle run``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from custom.runs import LOCK_NAME, RunSettings
from tests.helpers import (
    FT,
    INFER,
    PRE,
    TRAIN,
    assert_one_line,
    run_bundle,
    tail,
    write_labelled,
    write_tiny_checkpoint,
)

EVALUATE = "['configs/train.json','configs/evaluate.json','configs/demo.json']"


def _train(tmp, ds, *args):
    return run_bundle(FT, TRAIN, "--bundle_root", tmp / "root", "--dataset_dir", ds, "--transfer", "none",
                "--batch_size", 2, "--log_interval", 1, *args)


def test_iterations_are_honoured_exactly_when_shorter_than_val_interval(tmp_path):
    res = _train(tmp_path, write_labelled(tmp_path / "ds"), "--iterations", 3, "--val_interval", 250)
    assert res.returncode == 0, tail(res)
    assert res.stdout.count("Iter: ") + res.stderr.count("Iter: ") == 3, tail(res)  # not 250
    ckpt = torch.load(tmp_path / "root" / "eval" / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 3
    assert "val_mean_iou" in res.stdout + res.stderr  # the shortened epoch was validated
    assert not (tmp_path / "root" / "models" / LOCK_NAME).exists()  # the lock went with the process


def test_a_rerun_with_other_settings_refuses_to_resume_the_old_run(tmp_path):
    ds = write_labelled(tmp_path / "ds")
    first = _train(tmp_path, ds, "--iterations", 4, "--val_interval", 2)
    assert first.returncode == 0, tail(first)
    before = sorted(p.name for p in (tmp_path / "root" / "eval" / "checkpoints").iterdir())
    other = write_labelled(tmp_path / "other", shape=(3, 64, 64))
    res = _train(tmp_path, other, "--iterations", 8, "--val_interval", 2, "--num_classes", 2)
    line = assert_one_line(res, "retina_finetune: config error: ", "checkpoint_epoch=2.pt",
                           "written by a training with other settings", "num_classes 1 -> 2", "--resume False")
    assert "train_items" in line and "iterations 4 -> 8" in line
    assert sorted(p.name for p in (tmp_path / "root" / "eval" / "checkpoints").iterdir()) == before
    # what the message suggests works: a new training in the same folder
    again = _train(tmp_path, other, "--iterations", 2, "--val_interval", 2, "--num_classes", 2, "--resume", "False")
    assert again.returncode == 0, tail(again)


def test_a_second_training_in_a_used_folder_stops_and_a_stale_lock_is_taken_over(tmp_path):
    ds = write_labelled(tmp_path / "ds")
    models = tmp_path / "root" / "models"
    models.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": sleeper.pid, "host": socket.gethostname(), "started": "2026-12-01 10:00:00", "token": "x"}
        (models / LOCK_NAME).write_text(json.dumps(lock))
        (models / "model.pt").write_bytes(b"the other training's weights")
        res = _train(tmp_path, ds, "--iterations", 2, "--val_interval", 2)
        assert_one_line(res, "retina_finetune: config error: ", str(models), f"another training (pid {sleeper.pid}")
        assert (models / "model.pt").read_bytes() == b"the other training's weights"
    finally:
        sleeper.kill()
        sleeper.wait()
    res = _train(tmp_path, ds, "--iterations", 2, "--val_interval", 2)  # its process is gone now
    assert res.returncode == 0, tail(res)
    assert "taking over the lock" in res.stdout + res.stderr
    assert not (models / LOCK_NAME).exists()


def test_a_pretraining_checkpoint_is_refused_by_finetune_inference_and_evaluation(tmp_path):
    ds = write_labelled(tmp_path / "ds")
    write_tiny_checkpoint(tmp_path / "root" / "models" / "model.pt", head="reconstruction")  # same keys and shapes
    res = run_bundle(FT, INFER, "--bundle_root", tmp_path / "root", "--input", ds / "val" / "images",
               "--output_dir", tmp_path / "out", "--progress", "False")
    assert_one_line(res, "retina_finetune: checkpoint error: ", "model.pt", "pretraining (reconstruction) checkpoint")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.tif"))
    res = run_bundle(FT, EVALUATE, "--bundle_root", tmp_path / "root", "--dataset_dir", ds)
    assert_one_line(res, "retina_finetune: checkpoint error: ", "pretraining (reconstruction) checkpoint")


def test_a_segmentation_checkpoint_is_refused_by_pretrain_inference(tmp_path):
    from tests.helpers import write_unlabelled

    ckpt = write_tiny_checkpoint(tmp_path / "seg.pt", head="segmentation", out_channels=1)  # same shapes as recon
    res = run_bundle(PRE, INFER, "--bundle_root", tmp_path / "root", "--dataset_dir", write_unlabelled(tmp_path / "ds", 1),
               "--model_path", ckpt, "--output_dir", tmp_path / "out")
    assert_one_line(res, "retina_pretrain: checkpoint error: ", "fine-tuned segmentation checkpoint")


def test_run_settings_name_what_changed():
    old = RunSettings({"train_items": [{"image": "/a/x.tif"}], "num_classes": 1, "crop_size": 224})
    new = RunSettings({"train_items": [{"image": "/b/x.tif"}], "num_classes": 3, "crop_size": 224})
    diff = new.differences(old.state_dict())
    assert "num_classes 1 -> 3" in diff and "train_items 1 items from /a/x.tif -> 1 items from /b/x.tif" in diff
    same = RunSettings({"train_items": [{"image": "/a/x.tif"}], "num_classes": 1, "crop_size": 224})
    assert "crop_size" not in diff and same.differences(old.state_dict()) == ""
    assert os.path.isabs(json.loads(json.dumps(new.state_dict()))["settings"]["train_items"]["first"])


def test_a_misspelt_override_is_refused_with_the_nearest_names(tmp_path):
    ds = write_labelled(tmp_path / "ds")
    res = _train(tmp_path, ds, "--num_clases", 3)
    assert_one_line(res, "retina_finetune: config error: ", "--num_clases: no such setting", "did you mean --num_classes")
    res = run_bundle(FT, EVALUATE, "--bundle_root", tmp_path / "root", "--dataset_dir", ds, "--validate#inferer#overlpa", 0.5)
    assert_one_line(res, "retina_finetune: config error: ", "--validate#inferer#overlpa", "--validate#inferer#overlap")
    res = run_bundle(PRE, TRAIN, "--bundle_root", tmp_path / "root", "--num_iteration", 5)
    assert_one_line(res, "retina_pretrain: config error: ", "did you mean --iterations")


def test_evaluation_checks_its_settings_like_training(tmp_path):
    write_tiny_checkpoint(tmp_path / "root" / "models" / "model.pt")
    res = run_bundle(FT, EVALUATE, "--bundle_root", tmp_path / "root", "--dataset_dir", write_labelled(tmp_path / "ds"),
               "--num_classes", "abc")
    assert_one_line(res, "retina_finetune: config error: ", "num_classes: expected an integer >= 1, got 'abc'")
