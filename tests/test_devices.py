"""custom.devices: CUDA, then MPS, then CPU (probes mocked), an explicit device wins, AMP only where MONAI can
autocast, and the peak memory a training reports (CPU measured for real here)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser

from custom.devices import amp_supported, ddp_device_ids, peak_memory_mb, pick_device
from custom.errors import ConfigError
from tests.helpers import REPO


def _machine(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda:0"), (False, True, "mps"), (False, False, "cpu")])
def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    _machine(monkeypatch, cuda, mps)
    assert pick_device() == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")  # an explicit device wins over the probes


def test_an_explicit_device_must_exist_here(monkeypatch):
    _machine(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ConfigError, match=r"^device: 'cuda:1' asked for, but this machine has no CUDA device$"):
        pick_device("cuda:1")
    with pytest.raises(ConfigError, match=r"^device: 'gpu' is not a device"):
        pick_device("gpu")
    _machine(monkeypatch, cuda=True, mps=False)
    assert pick_device("cuda:1") == torch.device("cuda:1")


def test_amp_only_on_cuda_and_ddp_ids():
    assert amp_supported("cuda:0") and amp_supported(torch.device("cuda", 1))
    assert not amp_supported("cpu") and not amp_supported("mps")
    assert ddp_device_ids("cuda:1") == [torch.device("cuda:1")] and ddp_device_ids("cpu") is None


def test_cpu_peak_memory_grows_with_a_large_allocation():
    before = peak_memory_mb("cpu")
    block = torch.ones(96 * 2**20 // 4)  # 96 MiB, touched
    after = peak_memory_mb("cpu")
    assert float(block[-1]) == 1.0 and after >= before and after > 96


def test_cuda_and_mps_peaks_come_from_their_allocators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 5 * 2**20)
    assert peak_memory_mb("cuda:0") == 3.0 and peak_memory_mb("mps") == 5.0


@pytest.mark.parametrize("bundle, config", [
    ("retina_finetune", "train"), ("retina_finetune", "evaluate"), ("retina_finetune", "inference"),
    ("retina_pretrain", "train"), ("retina_pretrain", "inference"),
])
def test_every_config_picks_its_device_with_pick_device(monkeypatch, bundle, config):
    configs = REPO / "bundles" / bundle / "configs"
    files = [configs / "train.json"] + ([configs / f"{config}.json"] if config == "evaluate" else [])
    files = files if config != "inference" else [configs / "inference.json"]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    assert parser["device"] == {"_target_": "custom.devices.pick_device"}
    _machine(monkeypatch, cuda=False, mps=True)
    assert parser.get_parsed_content("device") == torch.device("mps")
    # the multi-GPU overlays keep their per-rank device
    multi = json.loads((configs / "multi_gpu_train.json").read_text())
    assert multi["device"] == {"_target_": "custom.devices.distributed_device"}
