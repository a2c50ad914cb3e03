"""Run-time settings shared by the trainers: device resolution, autocast and global seeding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["MIXED_PRECISION", "autocast_context", "resolve_device", "seed_everything"]


MIXED_PRECISION = ("no", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; any other name is checked and returned as a device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"invalid device {name!r} ({err}); use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def autocast_context(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a ``mixed_precision`` setting (``"no"``, ``"bf16"``, ``"fp16"``) on ``device``."""
    if mode == "no":
        return contextlib.nullcontext()
    if mode not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {mode!r}")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
