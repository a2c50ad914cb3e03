"""ReMDM remasking for mask-only schedules (Wang et al. 2025; docs/design.md §6.7).  The step math is in
:mod:`vqdiffusion.unmasking`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import setting
from ..unmasking import REMASK_SCHEDULES, remask_sigma, remask_step
from .base import Chain, Sampler


@dataclasses.dataclass(frozen=True)
class ReMDM(Sampler):
    """The mask-only chain where each step also re-masks real tokens with probability sigma_t:
    ``remask_schedule`` ``"cap"`` (min(eta, sigma_max)) or ``"rescale"`` (eta * sigma_max), eta =
    ``remask_eta`` in [0, 1]; the marginal q(z_s | x0) is preserved."""

    name: ClassVar[str] = "remdm"
    summary: ClassVar[str] = "remasking: real tokens may be masked again (mask-only schedules)"
    needs_mask_only_schedule: ClassVar[bool] = True

    remask_schedule: str = setting(
        "cap",
        "cap or rescale remasking probability",
        label="Remask schedule",
        choices=REMASK_SCHEDULES,
    )
    remask_eta: float = setting(0.04, "eta in [0, 1]", label="Remask eta", low=0.0, high=1.0, step=0.01)

    def run(self, chain: Chain) -> torch.Tensor:
        steps, x_t, schedule = chain.steps, chain.x_t, chain.schedule
        for i, t in enumerate(chain.iterate(steps)):
            s = steps[i + 1] if i + 1 < len(steps) else -1
            sigma = remask_sigma(schedule, t, s, self.remask_schedule, self.remask_eta)
            alpha_t, alpha_s = 1.0 - schedule.cumulative_at(t)[2], 1.0 - schedule.cumulative_at(s)[2]
            x_t = chain.keep(remask_step(chain.log_p_x0_at(x_t, t), x_t, alpha_t, alpha_s, sigma, chain.generator))
            chain.report(i + 1, len(steps))
        return x_t
