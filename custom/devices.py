"""Which device a bundle runs on: CUDA, then Apple MPS, then the CPU; what it supports; its peak memory.

Every config's ``device`` is ``{"_target_": "custom.devices.pick_device"}``; ``--device cpu`` (or
``cuda:1``, ``mps``) replaces it with that string, which torch, MONAI and Ignite accept wherever a
device goes. The multi-GPU overlays use :func:`distributed_device` instead (this rank's GPU).
"""

from __future__ import annotations

import os
import sys
from typing import Union

import torch

__all__ = ["amp_supported", "ddp_device_ids", "distributed_device", "peak_memory_mb", "pick_device"]

DeviceLike = Union[str, torch.device]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(preferred: DeviceLike | None = None) -> torch.device:
    """``preferred`` when given (e.g. ``"cpu"``, ``"cuda:1"``), else ``cuda:0``, else ``mps``, else ``cpu``.

    Raises:
        custom.errors.ConfigError: ``preferred`` is no device name, or names a kind this machine lacks.
    """
    if preferred not in (None, ""):
        from custom.errors import ConfigError

        try:
            device = torch.device(preferred)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device: {preferred!r} is not a device (write cpu, cuda, cuda:1 or mps)") from None
        present = {"cuda": torch.cuda.is_available(), "mps": _mps_available()}.get(device.type, True)
        if not present:
            raise ConfigError(f"device: {preferred!r} asked for, but this machine has no {device.type.upper()} device")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_supported(device: DeviceLike) -> bool:
    """Whether MONAI's trainers can use mixed precision on ``device``: they autocast ``"cuda"`` and use a
    CUDA ``GradScaler``, so CUDA devices only (on MPS and the CPU ``amp=True`` would silently do nothing)."""
    return torch.device(device).type == "cuda"


def distributed_device(backend: str | None = None) -> torch.device:
    """Join the ``torchrun`` process group (once) and return this rank's device.

    NCCL and ``cuda:<LOCAL_RANK>`` (made the current CUDA device) when CUDA is available, else
    gloo and the CPU, so the multi-GPU overlays also run as CPU processes. The multi-GPU configs
    use it as ``device``: everything placed on the device (the DDP network first) then finds the
    process group ready.
    """
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    if not cuda:
        return torch.device("cpu")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    torch.cuda.set_device(device)
    return device


def ddp_device_ids(device: DeviceLike) -> list | None:
    """``DistributedDataParallel``'s ``device_ids``: ``[device]`` for one GPU, None on the CPU."""
    device = torch.device(device)
    return [device] if device.type == "cuda" else None


def peak_memory_mb(device: DeviceLike) -> float:
    """Peak memory of this process on ``device`` in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors); MPS: ``torch.mps.driver_allocated_memory``
    (what Metal holds now: MPS keeps no peak); CPU: the process's peak resident set size
    (``resource.getrusage``: KiB on Linux, bytes on macOS; psutil's current one on Windows).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    try:
        import resource
    except ImportError:  # Windows: no peak there, the current resident set size
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
