"""Whole-volume inference speed of the RETINA network against the naive protocol, in one run.

    python scripts/bench_inference.py [--shape 64,1024,1024] [--preset retina] [--roi_size 224]
        [--overlap 0.25] [--blend_mode gaussian] [--sw_batch_size 8] [--precision auto]
        [--channels_last true] [--compile false] [--fit_roi false] [--naive true] [--naive_orthoplane true]
        [--profile true] [--device cpu]

On a synthetic volume (random weights: speed does not depend on them) it prints, one ``name: value``
line each: the fp32 and bf16 matmul roofline (a large ``torch.matmul``, measured now), the network's
images/s at 224x224 batch 8 (prepared vs fp32 eager of the same weights), voxels/s of xy and
orthoplane inference, peak resident memory, model GFLOP/s (FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode``, one multiply-add = 2) and its fraction of both
rooflines; then the same for the naive protocol (the paper's: fp32 eager with the weight
standardisation recomputed at every forward, one slice at a time, 224 windows, overlap 0.5,
constant blending, batch 4) and the ratios new/naive; and a ``torch.profiler`` table of where the
xy time goes. Returns the figures as a dict.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import Any, Callable

import fire
import torch
from bench_network import (  # the same roofline as scripts/bench_network.py
    _sync,
    matmul_gflops,
)
from monai.inferers import SlidingWindowInferer
from torch.utils.flop_counter import FlopCounterMode

from custom.inference import SliceWiseInferer
from custom.networks import autocast_dtype, native_bf16, transunet_from_preset

NAIVE = dict(roi_size=224, overlap=0.5, mode="constant", sw_batch_size=4)


class Figures(dict):
    """The figures, each printed as a ``name: value`` line the moment it is measured (long runs show progress)."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)

    def update(self, other: dict) -> None:  # type: ignore[override]
        for key, value in other.items():
            self[key] = value


class CountingNetwork(torch.nn.Module):
    """``network`` that counts the windows (images) it is given: the FLOPs of an inference are windows x FLOPs/window."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.network(x)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (``getrusage``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_per_window(network: torch.nn.Module, roi: int, device: torch.device) -> float:
    """Forward FLOPs of one ``roi`` x ``roi`` window (dtype-independent)."""
    x = torch.zeros(1, 1, roi, roi, device=device)
    with FlopCounterMode(display=False) as counter:  # with autograd on: its module tracker wants grad_fns
        network(x)
    return float(counter.get_total_flops())


def naive_volume(network: torch.nn.Module, vol: torch.Tensor, roi_size: int = NAIVE["roi_size"]) -> torch.Tensor:
    """The paper's protocol: one xy slice at a time through MONAI's sliding window, fp32 eager, no fold.

    ``vol`` (1, 1, Z, Y, X) -> probabilities (1, K, Z, Y, X) (sigmoid / softmax of the blended logits).
    """
    sw = SlidingWindowInferer(roi_size=(roi_size,) * 2, overlap=NAIVE["overlap"], mode=NAIVE["mode"],
                              sw_batch_size=NAIVE["sw_batch_size"])
    with torch.no_grad():
        logits = torch.stack([sw(vol[:, :, z], network) for z in range(vol.shape[2])], dim=2)
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)


def naive_orthoplane_volume(network: torch.nn.Module, vol: torch.Tensor, roi_size: int = NAIVE["roi_size"]) -> torch.Tensor:
    """The naive protocol along z, y and x, probabilities averaged."""
    planes = [naive_volume(network, vol.movedim(axis, 2), roi_size).movedim(2, axis) for axis in (2, 3, 4)]
    return sum(planes) / 3


def network_throughput(network: torch.nn.Module, inferer: SliceWiseInferer, device: torch.device,
                       iters: int) -> dict:
    """Images/s at 224x224 batch 8: fp32 eager (unfolded) vs the inferer's prepared network."""
    x = torch.randn(8, 1, 224, 224, device=device)
    network.train().eval()  # train() drops any fold: the eager baseline standardises at every forward
    with torch.no_grad():
        network(x)
        _, t_eager = _timed(lambda: [network(x) for _ in range(iters)], device)
    run = inferer.runner(network, device)
    run(x)  # warm-up (and the compilation when compile is on)
    _, t_new = _timed(lambda: [run(x) for _ in range(iters)], device)
    return {"net_eager_fp32_images_per_s": 8 * iters / t_eager, "net_new_images_per_s": 8 * iters / t_new}


def profile_table(fn: Callable[[], Any], rows: int = 12) -> str:
    """``torch.profiler`` summary of ``fn`` (top ops by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _flag(value: Any) -> bool:
    """A command-line switch: fire passes ``--x false`` as the string "false"."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SystemExit(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)


def _shape(shape: Any) -> tuple[int, int, int]:
    dims = tuple(int(s) for s in (shape.split(",") if isinstance(shape, str) else shape))
    if len(dims) != 3:
        raise SystemExit(f"--shape needs Z,Y,X, got {shape!r}")
    return dims  # type: ignore[return-value]


def main(
    shape: Sequence[int] | str = "64,1024,1024",
    preset: str = "retina",
    roi_size: int = 224,
    overlap: float = 0.25,
    blend_mode: str = "gaussian",
    sw_batch_size: int = 8,
    precision: str = "auto",
    channels_last: bool = True,
    compile: bool = False,
    fit_roi: bool = False,
    orthoplane: bool = True,
    naive: bool = True,
    naive_orthoplane: bool = True,
    profile: bool = True,
    iters: int = 3,
    device: str = "cpu",
    seed: int = 0,
    matmul_size: int = 2048,
    naive_roi_size: int = NAIVE["roi_size"],
) -> dict:
    """``naive_roi_size`` other than 224 is for smoke tests only (the naive protocol is 224 windows)."""
    dev = torch.device(device)
    z, y, x = _shape(shape)
    channels_last, compile, fit_roi = _flag(channels_last), _flag(compile), _flag(fit_roi)
    orthoplane, naive, naive_orthoplane, profile = _flag(orthoplane), _flag(naive), _flag(naive_orthoplane), _flag(profile)
    torch.manual_seed(seed)
    network = transunet_from_preset(preset, out_channels=1).to(dev).eval()
    counted = CountingNetwork(network).eval()
    vol = torch.randn(1, 1, z, y, x, device=dev)
    res = Figures()
    cast = autocast_dtype(precision, dev)
    res.update({"shape": f"{z}x{y}x{x}", "voxels": z * y * x, "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                else f"cpu ({torch.backends.cpu.get_cpu_capability()})",
                "native_bf16": native_bf16(dev), "autocast": str(cast).replace("torch.", "") if cast else "fp32"})

    res["matmul_fp32_gflops"] = matmul_gflops(torch.float32, dev, n=matmul_size)
    res["matmul_bf16_gflops"] = matmul_gflops(torch.bfloat16, dev, n=matmul_size)
    settings = dict(roi_size=roi_size, overlap=overlap, mode=blend_mode, sw_batch_size=sw_batch_size,
                    precision=precision, channels_last=channels_last, compile=compile, fit_roi=fit_roi)
    res["settings"] = " ".join(f"{k}={v}" for k, v in settings.items())
    inferer = SliceWiseInferer(**settings)
    res.update(network_throughput(network, inferer, dev, iters))
    res["net_speedup_vs_eager_fp32"] = res["net_new_images_per_s"] / res["net_eager_fp32_images_per_s"]

    def measure(tag: str, fn: Callable[[], torch.Tensor], roi: int, planes: int, windows: Callable[[], int]) -> None:
        start = windows()
        _, secs = _timed(fn, dev)
        res[f"{tag}_seconds"] = secs
        res[f"{tag}_voxels_per_s"] = z * y * x / secs
        res[f"{tag}_peak_rss_mb"] = peak_rss_mb()
        if planes == 1:
            n = windows() - start
            gflops = n * flops_per_window(network, roi, dev) / secs / 1e9
            res[f"{tag}_windows"] = n
            res[f"{tag}_model_gflops"] = gflops
            res[f"{tag}_fraction_fp32_roofline"] = gflops / res["matmul_fp32_gflops"]
            res[f"{tag}_fraction_bf16_roofline"] = gflops / res["matmul_bf16_gflops"]

    xy = SliceWiseInferer(**settings)
    measure("new_xy", lambda: xy(vol, network), roi_size, 1, lambda: xy.windows)
    if orthoplane:
        ortho = SliceWiseInferer(**settings, planes="orthoplane")
        measure("new_orthoplane", lambda: ortho(vol, network), roi_size, 3, lambda: ortho.windows)
        res["new_orthoplane_over_xy_time"] = res["new_orthoplane_seconds"] / res["new_xy_seconds"]
    if naive:
        counted.train().eval()  # drops the fold: the naive protocol standardises at every forward
        network.to(memory_format=torch.contiguous_format)  # and runs in the default layout
        measure("naive_xy", lambda: naive_volume(counted, vol, naive_roi_size), naive_roi_size, 1,
                lambda: counted.windows)
        res["xy_speedup_new_over_naive"] = res["new_xy_voxels_per_s"] / res["naive_xy_voxels_per_s"]
        res["gflops_ratio_new_over_naive"] = res["new_xy_model_gflops"] / res["naive_xy_model_gflops"]
        if orthoplane and naive_orthoplane:
            measure("naive_orthoplane", lambda: naive_orthoplane_volume(counted, vol, naive_roi_size), naive_roi_size, 3,
                    lambda: counted.windows)
            res["orthoplane_speedup_new_over_naive"] = (res["new_orthoplane_voxels_per_s"]
                                                        / res["naive_orthoplane_voxels_per_s"])
    if profile:
        one = vol[:, :, : max(1, min(z, 2))]
        print("profile (new xy, first 2 slices), top ops by self CPU time:")
        print(profile_table(lambda: xy(one, network)))
    return res


if __name__ == "__main__":
    fire.Fire(lambda **kw: (main(**kw), None)[1])
