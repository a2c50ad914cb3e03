"""What the process math reads of a schedule: its cumulative table as a tensor, and step indices as tensors.

The functions take any object with ``num_classes``, ``num_timesteps`` and ``cumulative_at`` (the
:class:`ScheduleTable` protocol), so that :mod:`.posterior` does not depend on the schedule class, whose
methods call it (:class:`~vqdiffusion.diffusion.schedule.MaskReplaceSchedule`).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch


class ScheduleTable(Protocol):
    """The cumulative (abar, bbar, gbar) of q(x_i | x0) for i in [-1, T) (docs/design.md §3)."""

    num_classes: int
    num_timesteps: int

    def cumulative_at(self, i: int) -> tuple[float, float, float]: ...


def cumulative_table(schedule: ScheduleTable, device: torch.device | str) -> torch.Tensor:
    """[T + 1, 3] float64 table of (abar, bbar, gbar); row 0 is x0 (index -1), row i + 1 is step i.

    Built once per (schedule, device) and reused (read-only: callers index it, never write to it), so a
    training or sampling step does not rebuild it from Python floats nor copy it to the device again.
    """
    device = torch.device(device)
    try:
        return _cached_table(schedule, device)
    except TypeError:  # an unhashable schedule-like object: build it each time
        return _build_table(schedule, device)


def _build_table(schedule: ScheduleTable, device: torch.device) -> torch.Tensor:
    rows = [schedule.cumulative_at(i) for i in range(-1, schedule.num_timesteps)]
    return torch.tensor(rows, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=32)
def _cached_table(schedule: ScheduleTable, device: torch.device) -> torch.Tensor:
    return _build_table(schedule, device)


def as_index(t: int | torch.Tensor, batch: int, device: torch.device, name: str, low: int, high: int) -> torch.Tensor:
    """An int or 0-d/[B] tensor of step indices -> [B] long tensor on ``device``."""
    if isinstance(t, int):
        if not low <= t <= high:
            raise ValueError(f"{name}={t} outside [{low}, {high}]")
        return torch.full((batch,), t, dtype=torch.long, device=device)
    t = torch.as_tensor(t, device=device)
    if t.dtype.is_floating_point:
        raise ValueError(f"{name} must be an integer step index, got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be an int or a [{batch}] tensor, got shape {tuple(t.shape)}")
    return t.long()
