"""The ancestral sampler: x_s ~ p(x_s | x_t) at every position, every step (VQ-Diffusion sec. 3.3)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..diffusion import posterior_log_probs, sample_categorical
from .base import Chain, Sampler


@dataclasses.dataclass(frozen=True)
class Ancestral(Sampler):
    """The trained chain: each step draws x_s ~ p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t) through the
    exact skip-step posterior (docs/design.md §4), s the next step index; the last step draws x0 itself."""

    name: ClassVar[str] = "ancestral"
    summary: ClassVar[str] = "every token at every step (the trained chain)"
    needs_timestep: ClassVar[bool] = True

    def run(self, chain: Chain) -> torch.Tensor:
        steps, x_t = chain.steps, chain.x_t
        for i, t in enumerate(chain.iterate(steps)):
            s = steps[i + 1] if i + 1 < len(steps) else -1
            log_p_x0 = chain.log_p_x0_at(x_t, t)
            if s == -1:  # the last step samples x0 itself: no [MASK] row needed
                x_t = chain.keep(sample_categorical(log_p_x0, chain.generator))
            else:
                log_p_s = posterior_log_probs(chain.schedule, log_p_x0, x_t, t, s)
                x_t = chain.keep(sample_categorical(log_p_s, chain.generator))
            chain.report(i + 1, len(steps))
        return x_t
