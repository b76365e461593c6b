"""The checks MONAI's model zoo runs on a submitted bundle: metadata schema, network in/out,
TorchScript export (ckpt_export) that matches the eager model, folder conventions."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from custom.checkpoints import load_weights
from custom.networks import transunet_from_preset
from tests.helpers import REPO

BUNDLES = {"retina_pretrain": "reconstruction", "retina_finetune": "segmentation"}


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_folder_and_naming_conventions(name):
    b = REPO / "bundles" / name
    for f in ["configs/metadata.json", "configs/train.json", "configs/inference.json", "configs/multi_gpu_train.json",
              "configs/logging.conf", "docs/README.md", "LICENSE"]:
        assert (b / f).is_file(), f
    assert (b / "models").is_dir()
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert meta["version"] in meta["changelog"], "the current version needs a changelog entry"
    assert sorted(meta["changelog"], key=lambda v: tuple(map(int, v.split("."))))[-1] == meta["version"]


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_ckpt_export_torchscript_matches_eager(name, tmp_path):
    b = REPO / "bundles" / name
    head = BUNDLES[name]
    torch.manual_seed(0)
    model = transunet_from_preset("tiny", img_size=64, head=head).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(ckpt), "--meta_file", "configs/metadata.json",
         "--config_file", "['configs/inference.json','configs/demo.json']"],
        cwd=b, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    loaded = torch.jit.load(str(ts))
    x = torch.rand(2, 1, 64, 64)
    eager = load_weights(transunet_from_preset("tiny", img_size=64, head=head), ckpt).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), eager(x), atol=1e-5)
    extra = {"metadata.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"]
