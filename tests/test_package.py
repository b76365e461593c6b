"""Model-zoo zip: packaging, a real HTTP download through `monai.bundle download`, and inference
in a process that does not see this repository."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from custom.networks import transunet_from_preset
from tests.helpers import REPO


@pytest.fixture()
def http_dir(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1 (a real HTTP server on a free port)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_package_download_and_run_inference(tmp_path, http_dir):
    www, url = http_dir
    weights = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(transunet_from_preset("tiny", img_size=64).state_dict(), weights)
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "package_bundle.py"), "retina_finetune", "--out", str(www),
         "--weights", str(weights), "--url_base", url, "--overlay", "configs/demo.json"],  # tiny demo weights
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "loads strictly into the network of inference.json, train.json" in r.stdout, r.stdout
    zips = list(www.glob("retina_finetune_v*.zip"))
    assert len(zips) == 1
    names = zipfile.ZipFile(zips[0]).namelist()
    for required in ["retina_finetune/configs/metadata.json", "retina_finetune/configs/inference.json",
                     "retina_finetune/docs/README.md", "retina_finetune/LICENSE", "retina_finetune/models/model.pt",
                     "retina_finetune/large_files.yml", "retina_finetune/custom/networks/transunet.py",
                     "retina_finetune/custom/io/formats.py", "retina_finetune/custom/inference/predictor.py"]:
        assert required in names, required
    assert not any("/mlruns" in n or "/demo_data/" in n or "/eval/" in n for n in names)

    bundle_dir = tmp_path / "downloaded"
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", "retina_finetune",
         "--url", f"{url}/{zips[0].name}", "--bundle_dir", str(bundle_dir)],
        capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    bundle = bundle_dir / "retina_finetune"
    assert (bundle / "models" / "model.pt").is_file()
    assert "hash_val" in (bundle / "large_files.yml").read_text()

    vol = (np.random.default_rng(0).random((4, 80, 72)) * 255).astype(np.uint8)
    inp = tmp_path / "in" / "vol.tif"
    inp.parent.mkdir()
    tifffile.imwrite(inp, vol, photometric="minisblack")
    out = tmp_path / "out"
    # a probe in the same interpreter settings: which `custom` does the downloaded bundle import?
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, custom; print(custom.__file__); print(sys.path)"],
        capture_output=True, text=True, cwd=bundle, env=_clean_env(),
    )
    assert Path(probe.stdout.splitlines()[0]).resolve().is_relative_to(bundle.resolve()), probe.stdout
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         "['configs/inference.json','configs/demo.json']", "--input", str(inp.parent), "--output_dir", str(out),
         "--num_classes", "1"],
        capture_output=True, text=True, cwd=bundle, env=_clean_env(), timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    written = list(out.glob("vol*"))
    assert len(written) == 1, list(out.iterdir())
    seg = tifffile.imread(written[0])
    assert seg.shape == vol.shape and set(np.unique(seg)) <= {0, 1}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in zips[0].name


def test_package_refuses_unknown_bundle(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "package_bundle.py"), "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "not a bundle" in r.stderr


@pytest.mark.parametrize("bundle,head,out_channels,overlay,fragment", [
    # the tiny demo weights with the bundle's own (retina-preset) configs: what the downloaded bundle would fail on
    ("retina_finetune", "segmentation", 1, None, "cnn.root.conv.weight (32, 3, 7, 7) vs (64, 3, 7, 7)"),
    # demo weights of another class count, even with the demo overlay
    ("retina_finetune", "segmentation", 3, "configs/demo.json", "head.weight (3, 8, 3, 3) vs (1, 8, 3, 3)"),
    # segmentation weights packed as the pretraining bundle's
    ("retina_pretrain", "segmentation", 1, "configs/demo.json", "reconstruction"),
])
def test_package_refuses_weights_that_do_not_fit_the_bundles_configs(tmp_path, bundle, head, out_channels, overlay, fragment):
    """One line, exit status 1, no zip: the weights must load strictly into the network the bundle's own
    configs build (inference.json and train.json, with ``--overlay`` merged on top)."""
    weights = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(transunet_from_preset("tiny", img_size=64, head=head, out_channels=out_channels).state_dict(), weights)
    cmd = [sys.executable, str(REPO / "scripts" / "package_bundle.py"), bundle, "--out", str(tmp_path / "dist"),
           "--weights", str(weights)] + (["--overlay", overlay] if overlay else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith(f"package_bundle: error: {weights}: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in r.stderr and not list((tmp_path / "dist").glob("*.zip"))
    print(lines[0][:300])
