"""Intensity handling (issue 12): any image dtype reaches the network as the training images did.

The same EM volume stored as uint8, as 12-bit uint16, as int32 and as float32 0-255 goes through
the three paths a user runs, each through ``python -m monai.bundle run`` in a subprocess:
training (``train.json``: the fingerprint, the mapping recorded on the network, the validation
pre-processing), evaluation (``train.json`` + ``evaluate.json``) and inference
(``inference.json``). A ``--probe`` expression run with ``--run_id probe`` after each config's own
``initialize`` saves the tensor that path builds for the network; the test compares them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from custom.intensity import (
    MapIntensityd,
    choose_range,
    dataset_intensity,
    fingerprint,
    from_checkpoint,
)
from custom.io import write_em
from custom.networks import decode_record, transunet_from_preset
from custom.synthetic import em_volume
from tests.helpers import FT, bundle_env

DEMO = "configs/demo.json"

#: the same picture in four storage types, as microscopes and converters write them
STORAGE = {
    "uint8": lambda img: img,
    "uint16_12bit": lambda img: (img.astype(np.uint16) * 16),  # 0..4080
    "int32": lambda img: img.astype(np.int32) * 1000 - 20000,
    "float32_0_255": lambda img: img.astype(np.float32),
}


def _bundle(configs: list[str], *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs), *map(str, args)]
    return subprocess.run(cmd, cwd=FT, env=bundle_env(), capture_output=True, text=True, timeout=300, check=False)


def _dataset(root: Path, kind: str) -> Path:
    """``{train,val}/{images,labels}/vol0.tif`` with the image stored as ``kind``."""
    for split, seed in (("train", 0), ("val", 1)):
        img, lab = em_volume((3, 64, 64), seed=seed)
        write_em(root / split / "images" / "vol0.tif", STORAGE[kind](img))
        write_em(root / split / "labels" / "vol0.tif", (lab == 1).astype(np.uint8))
    return root


def _paths_of(tmp: Path, kind: str) -> dict:
    """Build the dataset, then run the three probes (training first: it writes the model)."""
    ds = _dataset(tmp / kind / "ds", kind)
    root = tmp / kind / "root"
    out = {k: tmp / kind / f"{k}.pt" for k in ("train", "evaluate", "infer")}
    model = root / "models" / "model.pt"
    train = _bundle(
        ["configs/train.json", DEMO], "--bundle_root", root, "--dataset_dir", ds, "--transfer", "none",
        "--run_id", "probe",
        "--probe", f"$[torch.save(@network.state_dict(), {str(model)!r}), "
                   f"torch.save(@validate#dataset[0]['image'], {str(out['train'])!r})]",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    evaluate = _bundle(
        ["configs/train.json", "configs/evaluate.json", DEMO], "--bundle_root", root, "--dataset_dir", ds,
        "--run_id", "probe", "--probe", f"$torch.save(@validate#dataset[0]['image'], {str(out['evaluate'])!r})",
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    infer = _bundle(
        ["configs/inference.json", DEMO], "--bundle_root", root, "--input", ds / "val" / "images",
        "--output_dir", tmp / kind / "out", "--run_id", "probe",
        "--probe", f"$torch.save(@dataset[0]['image'], {str(out['infer'])!r})",
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    return {"model": model, "logs": train.stdout + train.stderr, **out}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("intensity")
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(STORAGE, pool.map(lambda k: _paths_of(tmp, k), STORAGE)))


def _tensor(path: Path) -> torch.Tensor:
    return torch.as_tensor(torch.load(path, weights_only=False)).float()


@pytest.mark.parametrize("kind", list(STORAGE))
def test_every_storage_type_reaches_the_network_like_uint8_in_all_three_paths(kind, probes):
    got = probes[kind]
    train, evaluate, infer = (_tensor(got[k]) for k in ("train", "evaluate", "infer"))
    # training slices the volume itself: its first xy slice is the evaluation volume's first section
    assert train.shape == (1, 64, 64) and evaluate.shape == infer.shape == (1, 3, 64, 64)
    torch.testing.assert_close(evaluate[:, 0], train, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(infer, evaluate, atol=1e-5, rtol=1e-5)  # inference == evaluation, exactly
    reference = _tensor(probes["uint8"]["evaluate"])
    spread, ref_spread = float(evaluate.std()), float(reference.std())
    assert spread > 0.1, f"{kind}: the network sees an (almost) constant image, std {spread:.4f}"
    assert 1 / 1.5 <= spread / ref_spread <= 1.5, f"{kind}: std {spread:.3f} vs uint8 {ref_spread:.3f}"
    # and the picture is the same picture: high correlation with the uint8 version
    corr = np.corrcoef(evaluate.flatten().numpy(), reference.flatten().numpy())[0, 1]
    assert corr > 0.98, f"{kind}: correlation with the uint8 input {corr:.3f}"
    print(f"{kind}: std after normalisation {spread:.3f} (uint8 {ref_spread:.3f}), correlation {corr:.4f}")


def test_the_mapping_travels_with_the_weights_and_is_logged(probes):
    for kind, got in probes.items():
        record = decode_record(torch.load(got["model"], weights_only=True)["_extra_state"])
        assert record["head"] == "segmentation"
        rec = record["input_intensity"]
        assert rec["fingerprint"]["dtype"] == {"uint8": "uint8", "uint16_12bit": "uint16", "int32": "int32",
                                               "float32_0_255": "float32"}[kind]
        assert rec["mapping"] == ("dtype" if kind == "uint8" else "percentile")
        assert "[retina] intensity:" in got["logs"]
        side = json.loads((got["model"].parent / "intensity.json").read_text())
        image = side["network_data_format"]["inputs"]["image"]
        assert image["value_range"] == [rec["low"], rec["high"]] and image["normalization"]["std"] == rec["std"]
    assert probes["uint8"]["model"].exists()


def test_inference_warns_when_the_input_is_stored_differently(probes, tmp_path):
    """A uint8-trained model applied to the 12-bit copy: mapped as trained, with one warning naming the file."""
    root = probes["uint8"]["model"].parents[1]
    src = probes["uint16_12bit"]["model"].parents[1].parent / "ds" / "val" / "images"
    res = _bundle(["configs/inference.json", DEMO], "--bundle_root", root, "--input", src, "--output_dir",
                  tmp_path / "out", "--progress", "False")
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert "dtype uint16, the model was trained on uint8" in text, text[-3000:]
    assert text.count("the model was trained on uint8") == 1


# ------------------------------------------------------------------------------------------
# the pieces, in-process


def test_auto_mapping_follows_the_data():
    assert choose_range({"dtype": "uint8", "min": 30, "max": 200, "p0.5": 40, "p99.5": 190})[:2] == (0, 255)
    assert choose_range({"dtype": "float32", "min": 0.1, "max": 0.9, "p0.5": 0.2, "p99.5": 0.8})[:2] == (0, 1)
    lo, hi, how = choose_range({"dtype": "uint16", "min": 0, "max": 4095, "p0.5": 100, "p99.5": 4000})
    assert (lo, hi, how) == (100, 4000, "percentile")
    assert choose_range({"dtype": "uint16", "min": 5, "max": 9, "p0.5": 6, "p99.5": 8}, "range")[:2] == (5, 9)
    assert choose_range({"dtype": "int32"}, [10, 20]) == (10.0, 20.0, "fixed")
    with pytest.raises(ValueError, match="constant"):
        choose_range({"dtype": "int32", "min": 7, "max": 7, "p0.5": 7, "p99.5": 7})


def test_a_constant_dataset_is_refused_in_one_line(tmp_path):
    from custom.errors import ConfigError

    write_em(tmp_path / "flat.tif", np.full((2, 32, 32), 7, np.int32))
    with pytest.raises(ConfigError, match="intensity_mapping: .*constant"):
        dataset_intensity([{"image": str(tmp_path / "flat.tif")}])


def test_fingerprint_reads_a_bounded_sample(tmp_path):
    for i in range(30):
        write_em(tmp_path / f"v{i}.tif", np.full((10, 16, 16), i, np.uint16))
    fp = fingerprint([str(p) for p in sorted(tmp_path.glob("*.tif"))], max_files=4, slices_per_file=2)
    assert fp["files"] == 4 and fp["pixels"] == 4 * 2 * 256 and fp["dtype"] == "uint16"


def test_weights_without_a_record_map_each_image_by_its_own_range(tmp_path):
    net = transunet_from_preset("tiny", img_size=64)
    sd = {k: v for k, v in net.state_dict().items() if k != "_extra_state"}  # e.g. the authors' weights
    torch.save(sd, tmp_path / "old.pt")
    record = from_checkpoint(tmp_path / "old.pt")
    assert record["mapping"] == "per-image"
    img = torch.arange(1000, 5096, dtype=torch.float32).reshape(1, 64, 64)
    out = MapIntensityd("image", record)({"image": img})["image"]
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0 and 0.4 < float(out.mean()) < 0.6
