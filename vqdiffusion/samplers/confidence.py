"""MaskGIT / aMUSEd confidence sampling (Chang et al. 2022; Patil et al. 2024; docs/design.md §6.6): not the
trained chain.  The step math is in :mod:`vqdiffusion.unmasking` (the library's step) and
:mod:`vqdiffusion.maskgit` (aMUSEd's scheduler step, draw for draw)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import setting
from ..maskgit import amused_confidence_step, amused_temperatures
from ..unmasking import MASKING_SCHEDULES, confidence_masked_counts, confidence_unmask_step, nearest_step
from .base import Chain, Sampler

MAX_CHOICE_TEMPERATURE = 1000.0
# "maskgit": the library's step (float64 draws); "amused": aMUSEd's scheduler step, draw for draw.
STEP_RULES = ("maskgit", "amused")


@dataclasses.dataclass(frozen=True)
class Confidence(Sampler):
    """Every step draws candidates at all masked positions and keeps those of highest Gumbel-perturbed
    confidence, leaving floor(N gamma((i + 1) / n)) masked; the Gumbel scale starts at
    ``choice_temperature`` and is annealed linearly to 0.  The model sees the step index whose gbar_t is
    nearest the masked fraction of the free positions.

    ``step_rule="amused"`` runs diffusers' ``AmusedScheduler`` steps instead, draw for draw from the same
    generator (:func:`~vqdiffusion.maskgit.amused_confidence_step`): float32 multinomial candidates, Gumbel
    scale linspace(``choice_temperature``, 0, S)[i], max(1, min(#masked - 1, floor(N gamma((i + 1) / S))))
    left masked (N the whole grid), the last step filling every position."""

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
    step_rule: str = setting(
        "maskgit",
        "maskgit (the library's draws) or amused (aMUSEd's scheduler, draw for draw)",
        label="Step rule",
        choices=STEP_RULES,
    )

    @property
    def reads_logits(self) -> bool:
        """aMUSEd's step reads only softmax(logits) (its candidates and their probabilities)."""
        return self.step_rule == "amused"

    def run(self, chain: Chain) -> torch.Tensor:
        if self.step_rule == "amused":
            return self._run_amused(chain)
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

    def _run_amused(self, chain: Chain) -> torch.Tensor:
        x_t, num_steps = chain.x_t, len(chain.steps)
        temperatures = amused_temperatures(num_steps, (float(self.choice_temperature), 0.0), device=x_t.device)
        generators = chain.generator if isinstance(chain.generator, (list, tuple)) else None
        for i, t in enumerate(chain.iterate(chain.steps)):
            log_p = chain.log_p_x0_at(x_t, t)  # guided logits: their softmax is the distribution aMUSEd draws from
            step = dict(temperatures=temperatures, masking_schedule=self.masking_schedule)
            if generators is None:
                x_t, _ = amused_confidence_step(log_p, x_t, i, num_steps, generator=chain.generator, **step)
            else:  # one generator per image: each row draws from its own
                rows = [
                    amused_confidence_step(log_p[r : r + 1], x_t[r : r + 1], i, num_steps, generator=g, **step)[0]
                    for r, g in enumerate(generators)
                ]
                x_t = torch.cat(rows)
            chain.report(i + 1, num_steps)
        return x_t
