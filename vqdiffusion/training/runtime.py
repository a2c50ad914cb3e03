"""Run-time settings shared by the trainers: autocast and global seeding (devices: :mod:`vqdiffusion.devices`)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["MIXED_PRECISION", "autocast_context", "seed_everything"]


MIXED_PRECISION = ("no", "bf16", "fp16")


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
