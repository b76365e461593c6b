"""Putting a network in shape for fast inference: folded weight standardisation, channels-last memory
layout, ``torch.compile``, and which autocast precision the device runs natively.

Everything here leaves the state dict's keys alone (checkpoints load as before) and training
unaffected: ``model.train()`` drops the folded weights (:meth:`StdConv2d.fold`).
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import nn

from .resnetv2 import StdConv2d

__all__ = ["PRECISIONS", "autocast_dtype", "fold_weight_standardisation", "native_bf16", "prepare_for_inference"]

logger = logging.getLogger(__name__)

#: the ``precision`` values an inference accepts
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def fold_weight_standardisation(model: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Fold every :class:`StdConv2d` of ``model`` (its standardised weight computed once); returns how many.

    ``dtype``: keep the folded weights in it (the autocast dtype the inference runs in).
    Only meaningful in eval mode: a training forward standardises again, and ``train()`` drops the fold.
    """
    convs = [m for m in model.modules() if isinstance(m, StdConv2d)]
    for conv in convs:
        conv.fold(dtype)
    return len(convs)


def prepare_for_inference(
    model: nn.Module, channels_last: bool = False, compile: bool = False, fold: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """``model`` in eval mode, weight standardisation folded, optionally channels-last and compiled.

    ``dtype``: the autocast dtype inference will run in (``None``: fp32); the folded weights are kept in it.

    Changes ``model`` in place (eval mode, the folded buffers, the parameters' memory layout) and
    returns it, or with ``compile`` a ``torch.compile`` wrapper of it (the wrapper shares its weights).
    Call it again after loading other weights (loading drops the fold).
    """
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)  # before folding: the folded weights take the layout
    if fold:
        fold_weight_standardisation(model, dtype)
    if compile:
        return torch.compile(model)
    return model


def native_bf16(device: Union[torch.device, str, None] = None) -> bool:
    """True where ``device`` computes bfloat16 matmuls natively (not emulated through fp32).

    CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)``. CPU: the instruction-set
    flags torch's own CPU kernels dispatch on, ``torch.cpu._is_avx512_bf16_supported()`` or
    ``torch.cpu._is_amx_tile_supported()`` (cpuinfo's avx512_bf16 / AMX). The public
    ``torch.backends.cpu.get_cpu_capability()`` says only "AVX512", which Skylake-class CPUs without
    bf16 report too, and oneDNN's ``_is_mkldnn_bf16_supported()`` is true there as well (emulated).
    """
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if dev.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


def autocast_dtype(precision: str, device: Union[torch.device, str, None] = None) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device``, ``None`` for full fp32.

    ``"auto"``: bf16 where the device has it natively (:func:`native_bf16`), else fp32 (an emulated
    bf16 is slower than fp32). ``"fp16"`` on a CPU runs fp32 (CPU fp16 kernels are slower than fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device if device is not None else "cpu")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(dev) else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if dev.type == "cpu":
            logger.warning("precision fp16 on a CPU runs in fp32 (CPU fp16 kernels are slow); use bf16 or auto")
            return None
        return torch.float16
    return None
