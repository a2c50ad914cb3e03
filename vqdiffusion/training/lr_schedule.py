"""Learning-rate schedules: a pure function of the step, so a resumed run gets the same rates."""

from __future__ import annotations

import math

import torch

__all__ = ["LR_SCHEDULES", "lr_at", "set_lr"]


LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, base_lr: float, warmup: int, total: int, kind: str = "constant", min_lr: float = 0.0) -> float:
    """Learning rate of optimizer update ``step`` (0-based).

    Linear warm-up ``base_lr * (step + 1) / warmup`` for ``step < warmup``; then ``base_lr`` (``"constant"``)
    or a cosine from ``base_lr`` at ``step = warmup`` to ``min_lr`` at ``step = total`` and after
    (``"cosine"``).
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {LR_SCHEDULES}")
    if step < 0 or warmup < 0 or total < 0:
        raise ValueError(f"lr_at: step, warmup and total must be >= 0, got {step}, {warmup}, {total}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
