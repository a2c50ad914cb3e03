"""High-quality inference with a fixed unmasking budget per step (Improved VQ-Diffusion sec. 3.2; the
authors' ``prior_rule``): :class:`Uniform` (rule 1, optionally in a Halton order) and :class:`Purity`
(rule 2).  The step math is in :mod:`vqdiffusion.diffusion.budget`."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ..config import setting
from ..diffusion import ordered_unmask_step, prior_unmask_step, unmask_budget
from ..unmasking import ORDERS, halton_ranks
from .base import Chain, Sampler

# r beyond this overflows or cancels the float32 arithmetic of the scaled log-probabilities
MAX_PRIOR_WEIGHT = 1000.0


@dataclasses.dataclass(frozen=True)
class Budget(Sampler):
    """Fill :func:`~vqdiffusion.diffusion.unmask_budget` [MASK] positions per step (m(s) = round(N gbar_s /
    gbar_{t_n}) left masked after the step to s) and keep every token once unmasked (exact for mask-only
    schedules such as the reference one); steps with an empty budget cost no model call."""

    fills_fixed_count: ClassVar[bool] = True

    tokens_per_call: int | None = setting(
        None,
        "fill at most this many positions per model call (None: one call per step)",
        label="Tokens per call",
        low=1,
    )

    def step(self, log_p_x0: torch.Tensor, x_t: torch.Tensor, count: int, chain: Chain, state: object) -> torch.Tensor:
        """Fill ``count`` [MASK] positions of every row of ``x_t``."""
        raise NotImplementedError

    def start(self, chain: Chain) -> object:
        """Per-run state of :meth:`step` (e.g. an order of the positions)."""
        return None

    def run(self, chain: Chain) -> torch.Tensor:
        x_t, steps = chain.x_t, chain.steps
        masked = int((x_t[0] == chain.schedule.mask_id).sum())
        budgets = unmask_budget(chain.schedule, steps, masked)
        state = self.start(chain)
        for i, t in enumerate(chain.iterate(steps)):
            for count in split_count(budgets[i], self.tokens_per_call):
                x_t = self.step(chain.log_p_x0_at(x_t, t), x_t, count, chain, state)
            chain.report(i + 1, len(steps))
        return x_t


@dataclasses.dataclass(frozen=True)
class Uniform(Budget):
    """The budget's positions drawn uniformly among the masked ones (prior_rule 1), or taken in a randomly
    shifted 2-D Halton order of the grid (``order="halton"``, Besnier et al. 2025)."""

    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "a fixed number of tokens per step, positions drawn uniformly"

    order: str = setting(
        "random", "random or halton order of the positions filled", label="Order", choices=ORDERS
    )

    def start(self, chain: Chain) -> torch.Tensor | None:
        if self.order != "halton":
            return None
        h, w = grid_shape(chain.x_t.shape[1], chain.token_shape)
        return halton_ranks(chain.x_t.shape[0], h, w, chain.generator, chain.x_t.device)

    def step(self, log_p_x0, x_t, count, chain, state):  # noqa: D102
        if state is not None:
            return ordered_unmask_step(log_p_x0, x_t, count, state, chain.generator)
        return prior_unmask_step(log_p_x0, x_t, count, rule="uniform", generator=chain.generator)


@dataclasses.dataclass(frozen=True)
class Purity(Budget):
    """The budget's positions drawn by purity max_k p(x0 = k | x_t) (prior_rule 2), candidates from
    softmax((1 + r * purity) log p(x0 | x_t)) with r = ``prior_weight`` (Improved VQ-Diffusion eq. 11)."""

    name: ClassVar[str] = "purity"
    summary: ClassVar[str] = "a fixed number of tokens per step, the most certain positions first"

    prior_weight: float = setting(
        0.0,
        "r, how strongly confident tokens are unmasked first, >= 0",
        label="Prior weight",
        low=0.0,
        high=MAX_PRIOR_WEIGHT,
        step=0.1,
        ui_high=10.0,
    )

    def step(self, log_p_x0, x_t, count, chain, state):  # noqa: D102
        return prior_unmask_step(
            log_p_x0, x_t, count, rule="purity", prior_weight=self.prior_weight, generator=chain.generator
        )


def split_count(total: int, chunk: int | None) -> list[int]:
    """``total`` as near-equal parts of at most ``chunk`` (one part when ``chunk`` is None; none for 0)."""
    if total == 0:
        return []
    parts = 1 if chunk is None else -(-total // chunk)
    return [total // parts + (1 if j < total % parts else 0) for j in range(parts)]


def grid_shape(num_tokens: int, token_shape: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of the token grid: ``token_shape`` (checked to hold ``num_tokens``) or a square."""
    if token_shape is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"order='halton' needs the token grid: pass token_shape=(h, w) ({num_tokens} tokens is not square)"
            )
        return side, side
    h, w = (int(v) for v in token_shape)
    if h * w != num_tokens:
        raise ValueError(f"token_shape {tuple(token_shape)} does not hold {num_tokens} tokens")
    return h, w
