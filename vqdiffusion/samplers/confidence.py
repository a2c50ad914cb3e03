"""MaskGIT / aMUSEd confidence sampling (Chang et al. 2022; Patil et al. 2024; docs/design.md §6.6): not the
trained chain.  The step math is in :mod:`vqdiffusion.unmasking`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import setting
from ..unmasking import MASKING_SCHEDULES, confidence_masked_counts, confidence_unmask_step, nearest_step
from .base import Chain, Sampler

MAX_CHOICE_TEMPERATURE = 1000.0


@dataclasses.dataclass(frozen=True)
class Confidence(Sampler):
    """Every step draws candidates at all masked positions and keeps those of highest Gumbel-perturbed
    confidence, leaving floor(N gamma((i + 1) / n)) masked; the Gumbel scale starts at
    ``choice_temperature`` and is annealed linearly to 0.  The model sees the step index whose gbar_t is
    nearest the masked fraction of the free positions."""

    name: ClassVar[str] = "confidence"
    summary: ClassVar[str] = "MaskGIT-style: the most confident candidates first (not the trained chain)"
    fills_fixed_count: ClassVar[bool] = True

    masking_schedule: str = setting(
        "cosine",
        "cosine or linear masked fraction",
        label="Masking schedule",
        choices=MASKING_SCHEDULES,
    )
    choice_temperature: float = setting(
        4.5,
        "Gumbel scale, annealed to 0",
        label="Choice temperature",
        low=0.0,
        high=MAX_CHOICE_TEMPERATURE,
        step=0.1,
        ui_high=20.0,
    )

    def run(self, chain: Chain) -> torch.Tensor:
        x_t, schedule = chain.x_t, chain.schedule
        num_steps = len(chain.steps)
        masked = int((x_t[0] == schedule.mask_id).sum())
        counts = confidence_masked_counts(masked, num_steps, self.masking_schedule)
        for i, after in enumerate(chain.iterate(counts)):
            if after < masked:  # (equal: nothing left to fill, more steps than tokens)
                noise = self.choice_temperature * (1.0 - (i + 1) / num_steps)  # annealed to 0
                t = nearest_step(schedule, masked / chain.free)
                x_t = confidence_unmask_step(chain.log_p_x0_at(x_t, t), x_t, after, noise, chain.generator)
                masked = after
            chain.report(i + 1, num_steps)
        return x_t
