"""scripts/export_bioimageio.py: a tiny fine-tuning bundle exported, then bioimage.io's own test run on the zip."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "export_bioimageio.py"
# a 12-bit-like record: the spec's scale_linear must map [100, 4000] onto [0, 1] as MapIntensityd does
RECORD = {"mapping": "percentile", "low": 100.0, "high": 4000.0, "mean": 0.45, "std": 0.21, "fingerprint": None}


def tiny_bundle(root: Path) -> Path:
    """configs/ of retina_finetune and models/model.pt: a random tiny one-class network carrying RECORD."""
    from custom.intensity import attach
    from custom.networks import transunet_from_preset

    bundle = root / "bundle"
    shutil.copytree(REPO / "bundles" / "retina_finetune" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    net = attach(transunet_from_preset("tiny", img_size=64, in_channels=1, out_channels=1), RECORD)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def run_export(bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--preset", "tiny", "--crop_size", "64", "--num_classes", "1", "--overlap", "0.5", *extra]
    return subprocess.run([sys.executable, str(SCRIPT), str(bundle), str(out), *args],
                          check=False, capture_output=True, text=True, timeout=600, cwd=str(REPO))


def test_refuses_existing_output(tmp_path):
    bundle = tiny_bundle(tmp_path)
    out = tmp_path / "model.zip"
    out.write_text("keep me")
    proc = run_export(bundle, out)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("export_bioimageio: output error:")
    assert "exists already" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "keep me"


@pytest.mark.slow
def test_export_passes_bioimageio_test(tmp_path):
    """The package passes bioimageio.core's validation and test (both weight formats reproduce the test output
    from the spec's preprocessing), offline; its spec says what the bundle's inferer and intensity record say."""
    bioimageio_core = pytest.importorskip("bioimageio.core", reason='the bioimageio extra: pip install -e ".[bioimageio]"')
    import yaml

    bundle = tiny_bundle(tmp_path)
    out = tmp_path / "retina_tiny.zip"
    proc = run_export(bundle, out, "--check", "False")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = bioimageio_core.test_model(str(out))
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    names = " ".join(d.name for d in summary.details)
    assert "pytorch_state_dict" in names and "torchscript" in names

    with zipfile.ZipFile(out) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        files = set(z.namelist())
    assert {"cover.png", "test_input.npy", "test_output.npy", "weights_torchscript.pt", "weights_state_dict.pt",
            "retina_architecture.py"} <= files
    assert rdf["format_version"].startswith("0.5") and rdf["license"] == "Apache-2.0"
    assert rdf["cite"][0]["doi"] == "10.1371/journal.pcbi.1013115"
    (inp,), (outp,) = rdf["inputs"], rdf["outputs"]
    assert [a["size"] for a in inp["axes"][2:]] == [{"min": 64, "step": 16}] * 2  # the inferer's tile
    assert [a["halo"] for a in outp["axes"][2:]] == [16, 16]  # 64 * 0.5 / 2
    steps = {p["id"]: p.get("kwargs") for p in inp["preprocessing"]}
    assert steps["scale_linear"]["gain"] == pytest.approx(1 / 3900)
    assert steps["scale_linear"]["offset"] == pytest.approx(-100 / 3900)
    assert steps["fixed_zero_mean_unit_variance"] == pytest.approx({"mean": 0.45, "std": 0.21})
    assert next(p["id"] for p in outp["postprocessing"]) == "sigmoid"
    with zipfile.ZipFile(out) as z:
        z.extract("test_input.npy", tmp_path)
    raw = np.load(tmp_path / "test_input.npy")
    assert raw.shape == (1, 1, 64, 64) and 100 <= raw.min() < raw.max() <= 4000  # in the weights' raw range
