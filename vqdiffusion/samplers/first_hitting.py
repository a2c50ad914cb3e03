"""First-hitting (exact) sampling of the mask-only ancestral chain (Zheng et al. 2024; docs/design.md
§6.8).  The step math is in :mod:`vqdiffusion.unmasking`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..unmasking import fill_positions, first_hitting_steps
from .base import Chain, Sampler


@dataclasses.dataclass(frozen=True)
class FirstHitting(Sampler):
    """The ancestral chain of a mask-only schedule with every token's unmasking step drawn first
    (:func:`~vqdiffusion.unmasking.first_hitting_steps`): one model call per distinct step at which a token
    of the batch unmasks, in chain order, plus the last step, where x0 ~ p(x0 | x_t) is drawn at every
    position; x_t does not change between those calls."""

    name: ClassVar[str] = "first_hitting"
    summary: ClassVar[str] = "the exact chain, one model call per unmasking step (mask-only schedules)"
    needs_mask_only_schedule: ClassVar[bool] = True

    def run(self, chain: Chain) -> torch.Tensor:
        x_t, steps, mask_id = chain.x_t, chain.steps, chain.schedule.mask_id
        batch_size, num_tokens = x_t.shape
        hit = first_hitting_steps(chain.schedule, steps, batch_size, num_tokens, chain.generator, x_t.device)
        last = len(steps) - 1
        calls = sorted(set(hit[x_t == mask_id].tolist()) | {last})  # steps where a masked token unmasks
        for done, i in enumerate(chain.iterate(calls), start=1):
            fill = (hit == i) & (x_t == mask_id) if i < last else torch.ones_like(hit, dtype=torch.bool)
            x_t = chain.keep(fill_positions(chain.log_p_x0_at(x_t, steps[i]), x_t, fill, chain.generator))
            chain.report(done, len(calls))
        return x_t
