"""Fast inference (issue 13, speed): folded weight standardisation, the batched inference-mode inferer,
blending, precision, and the benchmark script."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from monai.inferers import SliceInferer

from custom.inference import SliceWiseInferer
from custom.networks import (
    StdConv2d,
    autocast_dtype,
    native_bf16,
    prepare,
    prepare_for_inference,
    transunet_from_preset,
)
from tests.helpers import REPO


def _tiny(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transunet_from_preset("tiny", img_size=32, **kw)


def _std_convs(model):
    return [m for m in model.modules() if isinstance(m, StdConv2d)]


def test_folded_eval_network_equals_unfolded_and_training_is_unaffected():
    m = _tiny().eval()
    keys = list(m.state_dict())
    x = torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        want = m(x)
    assert prepare_for_inference(m) is m and not m.training
    assert all(c.folded_weight is not None for c in _std_convs(m))
    assert list(m.state_dict()) == keys  # the fold is not saved: checkpoints unchanged
    with torch.no_grad():
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
        conv = _std_convs(m)[0]
        conv.weight.mul_(3.0).add_(0.1)  # an eval forward now uses the kept weight, not this one
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    m.train()  # training standardises again, from the changed weight, with gradients
    assert all(c.folded_weight is None for c in _std_convs(m))
    m(x).mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        assert not torch.allclose(m(x), want, atol=1e-3)


def test_loading_weights_drops_the_fold_and_channels_last_matches_eager():
    a, b = _tiny(seed=0).eval(), _tiny(seed=1).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want_b = b(x)
    prepare_for_inference(a)
    a.load_state_dict(b.state_dict())
    assert all(c.folded_weight is None for c in _std_convs(a))
    prepare_for_inference(a, channels_last=True)
    assert _std_convs(a)[1].folded_weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = a(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want_b, atol=1e-4, rtol=1e-4)


class _Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.windows = net, 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.net(x)


def test_batched_inference_mode_inferer_equals_the_old_path():
    net = _Counting(_tiny(out_channels=2)).eval()
    vol = torch.rand(1, 1, 5, 40, 48)
    old = SliceInferer(spatial_dim=0, roi_size=(32, 32), overlap=0.5, sw_batch_size=1)  # one window per call
    with torch.no_grad():
        want = torch.softmax(old(vol, net), 1)
    n_windows = net.windows
    inferer = SliceWiseInferer(roi_size=32, overlap=0.5, sw_batch_size=6)
    with torch.no_grad():
        got = inferer(vol, net)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert inferer.windows == n_windows == net.windows - n_windows
    assert got.dtype == torch.float32 and not got.is_inference()  # callers may still change it in place
    got.add_(0)
    assert not net.training


def test_gaussian_and_constant_blending_are_both_sane():
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(1, 1, 1).eval()  # every window agrees at every pixel: any blend is exact
    img = torch.rand(1, 1, 70, 90)
    with torch.no_grad():
        want = torch.sigmoid(pointwise(img))
        for mode in ("constant", "gaussian"):
            got = SliceWiseInferer(roi_size=32, overlap=0.25, mode=mode)(img, pointwise)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        net = _tiny().eval()
        const = SliceWiseInferer(roi_size=32, overlap=0.5, mode="constant")(img, net)
        gauss = SliceWiseInferer(roi_size=32, overlap=0.5, mode="gaussian")(img, net)
    for p in (const, gauss):
        assert p.shape == img.shape and float(p.min()) >= 0 and float(p.max()) <= 1
    assert not torch.allclose(const, gauss)  # the blend weights differ where windows overlap


def test_precision_auto_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(prepare, "native_bf16", lambda device=None: False)
    assert autocast_dtype("auto", "cpu") is None
    monkeypatch.setattr(prepare, "native_bf16", lambda device=None: True)
    assert autocast_dtype("auto", "cpu") is torch.bfloat16
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16 and autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("fp16", "cpu") is None  # CPU fp16 runs fp32
    with pytest.raises(ValueError, match="precision"):
        SliceWiseInferer(precision="int4")


def test_native_bf16_asks_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_bf16("cpu") is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bf16("cpu") is True


def test_bf16_channels_last_inferer_is_close_to_fp32():
    net = _tiny().eval()
    vol = torch.rand(1, 1, 3, 32, 40)
    with torch.no_grad():
        fp32 = SliceWiseInferer(roi_size=32)(vol, net)
        fast = SliceWiseInferer(roi_size=32, precision="bf16", channels_last=True)(vol, net)
    assert fast.dtype == torch.float32
    assert float((fast - fp32).abs().max()) < 0.05


def test_fit_roi_shrinks_windows_along_short_axes():
    net = _Counting(_tiny()).eval()
    vol = torch.rand(1, 1, 3, 40, 36)
    with torch.no_grad():
        padded = SliceWiseInferer(roi_size=32, planes="orthoplane")(vol, net)
        fitted = SliceWiseInferer(roi_size=32, planes="orthoplane", fit_roi=True)
        got = fitted(vol, net)
    assert got.shape == padded.shape and float(got.min()) >= 0 and float(got.max()) <= 1
    assert fitted._roi((3, 36)) == (16, 32) and fitted._roi((40, 36)) == (32, 32)


def test_a_bf16_fold_keeps_the_weights_in_bf16_and_matches_the_fp32_fold_under_autocast():
    net = _tiny().eval()
    x = torch.rand(2, 1, 32, 32)
    prepare_for_inference(net, dtype=torch.bfloat16)
    assert {m.folded_weight.dtype for m in _std_convs(net)} == {torch.bfloat16}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept_bf16 = net(x).float()
    with torch.inference_mode():
        outside_autocast = net(x)  # the bf16 fold is cast back for an fp32 forward, not refused
    prepare_for_inference(net)
    assert {m.folded_weight.dtype for m in _std_convs(net)} == {torch.float32}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept_fp32 = net(x).float()
    assert float((kept_bf16 - kept_fp32).abs().max()) < 1e-2
    assert float((outside_autocast - net(x).detach()).abs().max()) < 5e-2


def test_fitted_windows_come_more_to_a_network_call_and_give_the_same_result():
    vol = torch.rand(1, 1, 3, 40, 36)
    fitted = SliceWiseInferer(roi_size=32, sw_batch_size=2, planes="orthoplane", fit_roi=True)
    assert fitted._settings((16, 32))["sw_batch_size"] == 4 and fitted._settings((32, 32))["sw_batch_size"] == 2
    calls = []
    net = _tiny().eval()
    hook = net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        got = fitted(vol, net)
        hook.remove()
        one_by_one = SliceWiseInferer(roi_size=32, sw_batch_size=1, planes="orthoplane", fit_roi=True)(vol, net)
    assert max(calls) > 2  # the thin xz/yz windows shared calls beyond sw_batch_size
    assert float((got - one_by_one).abs().max()) < 1e-5


BENCH_KEYS = [
    "matmul_fp32_gflops", "matmul_bf16_gflops", "net_eager_fp32_images_per_s", "net_new_images_per_s",
    "net_speedup_vs_eager_fp32", "new_xy_voxels_per_s", "new_xy_peak_rss_mb", "new_xy_model_gflops",
    "new_xy_fraction_fp32_roofline", "new_xy_fraction_bf16_roofline", "new_orthoplane_voxels_per_s",
    "new_orthoplane_over_xy_time", "naive_xy_voxels_per_s", "naive_xy_model_gflops",
    "naive_xy_fraction_fp32_roofline", "naive_xy_fraction_bf16_roofline", "naive_orthoplane_voxels_per_s",
    "xy_speedup_new_over_naive", "gflops_ratio_new_over_naive", "orthoplane_speedup_new_over_naive",
]


def test_bench_inference_prints_every_figure():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "bench_inference.py"), "--shape", "2,32,48", "--preset", "tiny",
           "--roi_size", "32", "--iters", "1", "--matmul_size", "256", "--naive_roi_size", "32"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for key in BENCH_KEYS:
        m = re.search(rf"^{key}: (\S+)$", out, re.MULTILINE)
        assert m, f"{key} missing from:\n{out}"
        assert float(m.group(1)) > 0
    assert "profile" in out and "Self CPU" in out  # the torch.profiler table


def test_bench_memory_prints_the_peak_memory_of_each_section_count(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "bench_memory.py"), "--sections", "2,4", "--size", "64",
           "--preset", "tiny", "--block_sections", "2", "--workdir", str(tmp_path / "bench")]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    peaks = {k: float(v) for k, v in re.findall(r"^(\S+)_sections: peak RSS (\d+) MiB", res.stdout, re.MULTILINE)}
    assert set(peaks) == {"in_memory_2", "streamed_2", "streamed_4"}, res.stdout
    assert all(p > 100 for p in peaks.values())  # a real child process with torch loaded, not this one
    assert (tmp_path / "bench" / "out4" / "v4_seg.ome.zarr").is_dir()  # the streamed output was written
    assert not (tmp_path / "bench" / "v4.zarr").exists()  # the synthetic input was removed


@pytest.mark.parametrize("fit_roi", [False, True])
def test_the_bundle_setting_fit_roi_reaches_the_inferer(fit_roi):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "retina_finetune" / "configs" / "inference.json"))
    parser["fit_roi"] = fit_roi
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, SliceWiseInferer) and inferer.fit_roi is fit_roi
