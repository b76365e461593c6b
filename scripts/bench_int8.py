"""int8 post-training quantization of the RETINA network (PyTorch's PT2E flow, torchao's x86 quantizer)
against fp32 eager and the bf16 inference path, in one run.

    pip install torchao==0.18.0      # not a project dependency: this is a probe, int8 is not adopted
    python scripts/bench_int8.py [--preset retina] [--checkpoint models/model.pt] [--batch 8] [--iters 3]

It exports the folded network (``torch.export``), quantizes it with
``X86InductorQuantizer`` (int8 weights per channel, uint8 activations), calibrates on synthetic EM
windows (``custom.synthetic.em_image``), compiles it with inductor (``TORCHINDUCTOR_FREEZING=1``, the
documented switch that lets inductor fold the quantized weights into oneDNN int8 kernels), and prints:
how many quantize / dequantize nodes the graph holds (0 means the quantizer silently quantized
nothing, as on some torch versions, pytorch#160095), the seconds quantizing and compiling took,
images/s of fp32 eager, of the bundle's bf16 + channels_last path (where bf16 is native) and of int8,
the largest logit difference, and the agreement (IoU) of int8 and fp32 masks thresholded at 0.5 —
meaningful only with ``--checkpoint`` trained weights (random weights predict no structure).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_FREEZING", "1")  # read when inductor is imported

import time  # noqa: E402

import fire  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from custom.inference import SliceWiseInferer  # noqa: E402
from custom.networks import native_bf16, prepare_for_inference, transunet_from_preset  # noqa: E402
from custom.synthetic import em_image  # noqa: E402


def _windows(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` synthetic EM windows (n, 1, size, size), standardised like the bundle's input."""
    x = torch.from_numpy(np.stack([em_image((size, size), seed=seed + i) for i in range(n)]).astype(np.float32))[:, None]
    return (x - x.mean()) / x.std().clamp(min=1e-6)


def _rate(fn, batch: int, iters: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch * iters / (time.perf_counter() - t0)


def main(preset: str = "retina", checkpoint: str | None = None, batch: int = 8, iters: int = 3, size: int = 224,
         calibration_batches: int = 4, seed: int = 0) -> dict:
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        raise SystemExit("bench_int8: needs torchao (pip install torchao==0.18.0); it is not a project dependency")
    torch.manual_seed(seed)
    net = transunet_from_preset(preset, img_size=size, out_channels=1)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("network", state) if isinstance(state, dict) else state)
    prepare_for_inference(net)  # eval mode, weight standardisation folded (exported as constants)
    x = _windows(batch, size, seed)
    res: dict = {}

    def show(key, value):
        res[key] = value
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)

    t0 = time.perf_counter()
    with torch.no_grad():
        ref = net(x)
        exported = torch.export.export(net, (x,)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for i in range(calibration_batches):
            prepared(_windows(batch, size, seed + 1000 * (i + 1)))
        quantized = convert_pt2e(prepared)
    show("quantize_seconds", time.perf_counter() - t0)
    targets = [str(n.target) for n in quantized.graph.nodes if n.op == "call_function"]
    show("quantize_nodes", sum("quantize_per" in t for t in targets))
    show("dequantize_nodes", sum("dequantize_per" in t for t in targets))
    if res["quantize_nodes"] == 0:
        raise SystemExit("bench_int8: the quantizer quantized nothing (pytorch#160095?); no int8 figures")
    with torch.no_grad():
        compiled = torch.compile(quantized)
        t0 = time.perf_counter()
        out = compiled(x)
        show("compile_seconds", time.perf_counter() - t0)
        show("fp32_eager_images_per_s", _rate(lambda: net(x), batch, iters))
        show("int8_images_per_s", _rate(lambda: compiled(x), batch, iters))
    if native_bf16("cpu"):
        run = SliceWiseInferer(precision="bf16", channels_last=True).runner(net, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            show("bf16_channels_last_images_per_s", _rate(lambda: run(x), batch, iters))
        show("int8_over_bf16", res["int8_images_per_s"] / res["bf16_channels_last_images_per_s"])
    show("int8_over_fp32_eager", res["int8_images_per_s"] / res["fp32_eager_images_per_s"])
    show("max_logit_difference", float((out - ref).abs().max()))
    a, b = torch.sigmoid(ref) > 0.5, torch.sigmoid(out) > 0.5
    union = int((a | b).sum())
    show("mask_agreement_iou", float((a & b).sum()) / union if union else 1.0)
    return res


if __name__ == "__main__":
    fire.Fire(lambda **kw: (main(**kw), None)[1])
