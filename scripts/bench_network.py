"""Throughput of the RETINA TransUNet on this machine, against its own dense-matmul roofline.

    python scripts/bench_network.py [--preset retina] [--size 224] [--batch 8] [--iters 5] [--device cpu]

Prints forward and forward+backward images/s, model GFLOPs per image (counted by
``torch.utils.flop_counter``; a multiply-add counts 2), the fp32 and bf16 matmul GFLOP/s of a
large square matmul measured in the same run, the fraction of the fp32 roofline reached, and for
reference a dense 3x3 convolution's GFLOP/s (on CPUs the convolution library may exceed the matmul).
"""

from __future__ import annotations

import time

import fire
import torch
from torch.utils.flop_counter import FlopCounterMode

from custom.networks import transunet_from_preset


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, iters: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` (2 n^3 flops each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, device, iters) / 1e9


def conv_gflops(device: torch.device, iters: int = 3) -> float:
    """GFLOP/s of a dense 3x3 convolution (8x256x56x56 -> 256 channels), the network's dominant op."""
    x = torch.randn(8, 256, 56, 56, device=device)
    w = torch.randn(256, 256, 3, 3, device=device)
    flops = 2 * 8 * 256 * 256 * 9 * 56 * 56
    return flops / _time(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, iters) / 1e9


def main(preset: str = "retina", size: int = 224, batch: int = 8, iters: int = 5, device: str = "cpu") -> dict:
    dev = torch.device(device)
    model = transunet_from_preset(preset, img_size=size).to(dev)
    x = torch.rand(batch, 1, size, size, device=dev)
    with FlopCounterMode(display=False) as counter:
        model(x)
    gflop_fwd = counter.get_total_flops() / batch / 1e9
    with FlopCounterMode(display=False) as counter:
        model(x).mean().backward()
    gflop_train = counter.get_total_flops() / batch / 1e9

    model.eval()
    with torch.no_grad():
        t_fwd = _time(lambda: model(x), dev, iters)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(x).mean().backward()

    t_train = _time(step, dev, iters)
    fp32 = matmul_gflops(torch.float32, dev)
    bf16 = matmul_gflops(torch.bfloat16, dev)
    conv = conv_gflops(dev)
    res = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "gflop_per_image_fwd": gflop_fwd,
        "gflop_per_image_fwd_bwd": gflop_train,
        "fwd_images_per_s": batch / t_fwd,
        "fwd_bwd_images_per_s": batch / t_train,
        "matmul_fp32_gflops": fp32,
        "matmul_bf16_gflops": bf16,
        "conv3x3_fp32_gflops": conv,
    }
    res["fwd_achieved_gflops"] = res["fwd_images_per_s"] * gflop_fwd
    res["fwd_bwd_achieved_gflops"] = res["fwd_bwd_images_per_s"] * gflop_train
    res["fwd_fraction_of_fp32_roofline"] = res["fwd_achieved_gflops"] / fp32
    res["fwd_bwd_fraction_of_fp32_roofline"] = res["fwd_bwd_achieved_gflops"] / fp32
    print(f"TransUNet preset={preset} ({res['params']:,} params) {size}x{size} batch {batch} on {res['device']}, "
          f"{res['threads']} threads")
    print(f"  model:        {gflop_fwd:.2f} GFLOP/image forward, {gflop_train:.2f} GFLOP/image forward+backward")
    print(f"  forward:      {res['fwd_images_per_s']:.2f} images/s = {res['fwd_achieved_gflops']:.1f} GFLOP/s "
          f"({100 * res['fwd_fraction_of_fp32_roofline']:.1f}% of fp32 matmul roofline)")
    print(f"  fwd+backward: {res['fwd_bwd_images_per_s']:.2f} images/s = {res['fwd_bwd_achieved_gflops']:.1f} GFLOP/s "
          f"({100 * res['fwd_bwd_fraction_of_fp32_roofline']:.1f}% of fp32 matmul roofline)")
    print(f"  roofline:     fp32 matmul {fp32:.1f} GFLOP/s, bf16 matmul {bf16:.1f} GFLOP/s (2048^3)")
    print(f"  reference:    fp32 3x3 conv {conv:.1f} GFLOP/s (the convolution library can beat the matmul figure; "
          f"forward reaches {100 * res['fwd_achieved_gflops'] / conv:.1f}% of it)")
    return res


if __name__ == "__main__":
    fire.Fire(lambda **kw: (main(**kw), None)[1])
