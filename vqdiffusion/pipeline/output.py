"""What a pipeline call returns, and the helpers that put the parts of a call (batches, groups) together."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass
class PipelineOutput:
    """``images``: PIL list, float array [B, H, W, 3] or tensor [B, 3, H, W] in [0, 1], or None for
    ``output_type="tokens"``; ``tokens``: [B, h, w] long."""

    images: Any
    tokens: torch.Tensor


def batch_callback(
    callback: Callable[[int, int], None] | None, index: int, batches: int
) -> Callable[[int, int], None] | None:
    """A per-batch step callback reporting to ``callback`` the steps done over all ``batches`` of a call."""
    if callback is None:
        return None

    def report(done: int, total: int) -> None:
        callback(index * total + done, batches * total)

    return report
