"""The shared test helpers (tests/helpers.py) and fixtures (tests/conftest.py) do what the tests rely on:
``assert_one_line`` tells one clean error line from anything else, and a bundle run in-process
(``bundle_workflow``) writes what ``python -m monai.bundle run`` writes for the same command."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from custom.io import read_em
from tests.helpers import FT, assert_one_line, run_bundle, tail

LINE = "retina_finetune: dataset error: /d/a.tif: bad"


def _res(rc: int, stdout: str = "", stderr: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["monai.bundle"], rc, stdout, stderr)


def test_assert_one_line_accepts_only_one_clean_error_line():
    notice = "2026 - WARNING - Detected deprecated name 'parsing config_file' ...\n"  # MONAI's notice: ignored
    assert assert_one_line(_res(1, "INFO - starting\n", notice + LINE + "\n"), "retina_finetune: dataset error: ",
                           "/d/a.tif", "bad") == LINE
    for res in (
        _res(0, "", LINE),  # a zero exit status
        _res(1, "", LINE + "\nanother line"),  # two lines
        _res(1, "Traceback (most recent call last):\n", LINE),  # a traceback anywhere
        _res(1, "Epoch: 1/2, Iter: 1/4 -- train_loss: 0.5\n", LINE),  # training started before the error
        _res(1, "", "retina_pretrain: dataset error: /d/a.tif: bad"),  # another prefix
    ):
        with pytest.raises(AssertionError):
            assert_one_line(res, "retina_finetune: dataset error: ", "/d/a.tif")
    with pytest.raises(AssertionError, match="'missing' not in"):
        assert_one_line(_res(1, "", LINE), "retina_finetune: ", "missing")


def test_workflow_fixture_writes_what_the_command_line_writes(bundle_workflow, tiny_checkpoint, labelled_data, tmp_path):
    """Fine-tuning inference with the fixtures' checkpoint and data, in-process and as a subprocess: the
    same label volume, of the input's shape."""
    ckpt = tiny_checkpoint("root/models/model.pt")
    images = labelled_data / "val" / "images"
    settings = {"preset": "tiny", "crop_size": 64, "progress": False}
    bundle_workflow(FT, ["inference"], input=str(images), output_dir=str(tmp_path / "in_process"), **settings)
    assert ckpt == tmp_path / "root" / "models" / "model.pt"
    labels = read_em(tmp_path / "in_process" / "vol0_seg.tif", role="label")
    assert labels.shape == read_em(images / "vol0.tif").shape == (3, 64, 64) and set(np.unique(labels)) <= {0, 1}
    args = [a for k, v in settings.items() for a in (f"--{k}", v)]
    res = run_bundle(FT, "configs/inference.json", "--bundle_root", tmp_path / "root", "--input", images,
                     "--output_dir", tmp_path / "subprocess", *args)
    assert res.returncode == 0, tail(res)
    np.testing.assert_array_equal(read_em(tmp_path / "subprocess" / "vol0_seg.tif", role="label"), labels)
