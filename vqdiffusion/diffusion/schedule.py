"""The mask-and-replace noise schedule (docs/design.md §3) and the step indices of a sampling run (§6.1)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import cached_property

import torch

from ..config import ConfigBase, ConfigError
from .posterior import posterior_log_probs, q_sample
from .random import Generator


@dataclasses.dataclass(frozen=True)
class MaskReplaceSchedule(ConfigBase):
    """Mask-and-replace noise schedule given by its cumulative endpoints (docs/design.md §3).

    The cumulative keep probability ``abar`` and mask probability ``gbar`` move linearly from their start
    (first step, index 0) to their end (last step, index T-1); ``bbar = (1 - abar - gbar) / K`` is the
    probability of becoming each specific real token.  The defaults are the authors' ``alpha1`` schedule,
    also diffusers' defaults: abar + gbar = 0.999999 at every step, i.e. in effect *mask only*.
    ``paper_mask_and_replace`` gives the paper's endpoints (gbar_T = 0.9, K * bbar_T = 0.1).
    """

    num_classes: int
    num_timesteps: int = 100
    alpha_cum_start: float = 0.99999
    alpha_cum_end: float = 0.000009
    gamma_cum_start: float = 0.000009
    gamma_cum_end: float = 0.99999

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ConfigError(f"{name}: num_classes must be an int >= 2, got {self.num_classes!r}")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ConfigError(f"{name}: num_timesteps must be an int >= 1, got {self.num_timesteps!r}")
        for field in ("alpha_cum_start", "alpha_cum_end", "gamma_cum_start", "gamma_cum_end"):
            value = getattr(self, field)
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{name}: {field} must lie in [0, 1], got {value!r}")
        if self.alpha_cum_end > self.alpha_cum_start:
            raise ConfigError(
                f"{name}: cumulative alpha must not increase (start {self.alpha_cum_start} < end {self.alpha_cum_end})"
            )
        if self.gamma_cum_end < self.gamma_cum_start:
            raise ConfigError(
                f"{name}: cumulative gamma must not decrease (start {self.gamma_cum_start} > end {self.gamma_cum_end})"
            )
        if self.gamma_cum_end <= 0.0:
            raise ConfigError(f"{name}: gamma_cum_end must be > 0 so that sampling can start from all [MASK]")
        abar, _, gbar = self.cumulative
        for i in range(self.num_timesteps):
            a_prev, g_prev = (1.0, 0.0) if i == 0 else (abar[i - 1], gbar[i - 1])
            alpha = abar[i] / a_prev if a_prev > 0 else 0.0
            gamma = 1.0 - (1.0 - gbar[i]) / (1.0 - g_prev) if g_prev < 1 else 1.0
            if abar[i] + gbar[i] > 1.0 + 1e-12 or 1.0 - alpha - gamma < -1e-12:
                raise ConfigError(
                    f"{name}: step {i} has a negative transition probability (abar={abar[i]:.3g}, "
                    f"gbar={gbar[i]:.3g}, 1 - alpha - gamma={1.0 - alpha - gamma:.3g}); choose endpoints "
                    "with abar + gbar <= 1 and abar falling at least as fast as 1 - gbar"
                )

    @classmethod
    def paper_mask_and_replace(cls, num_classes: int, num_timesteps: int = 100) -> MaskReplaceSchedule:
        """The paper's endpoints: gbar 0 -> 0.9 and K * bbar 0 -> 0.1 (abar 1 -> 0)."""
        return cls(
            num_classes,
            num_timesteps,
            alpha_cum_start=0.99999,
            alpha_cum_end=0.0,
            gamma_cum_start=0.000009,
            gamma_cum_end=0.9,
        )

    @property
    def mask_id(self) -> int:
        return self.num_classes

    # -- float64 tables (Python floats) -------------------------------------------------------------------
    @cached_property
    def cumulative(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """(abar, bbar, gbar) for step indices 0..T-1, in float64."""
        T, K = self.num_timesteps, self.num_classes
        frac = [i / (T - 1) if T > 1 else 1.0 for i in range(T)]
        abar = tuple(self.alpha_cum_start + f * (self.alpha_cum_end - self.alpha_cum_start) for f in frac)
        gbar = tuple(self.gamma_cum_start + f * (self.gamma_cum_end - self.gamma_cum_start) for f in frac)
        # 1 - abar - gbar below 1e-12 is round-off of a mask-only schedule: snap it to an exact 0.
        rest = [1.0 - a - g for a, g in zip(abar, gbar, strict=True)]
        bbar = tuple(r / K if r > 1e-12 else 0.0 for r in rest)
        return abar, bbar, gbar

    def cumulative_at(self, i: int) -> tuple[float, float, float]:
        """(abar_i, bbar_i, gbar_i) of q(x_i | x0); ``i = -1`` is x0 itself: (1, 0, 0)."""
        if i == -1:
            return 1.0, 0.0, 0.0
        if not 0 <= i < self.num_timesteps:
            raise ValueError(f"step index {i} outside [-1, {self.num_timesteps - 1}]")
        abar, bbar, gbar = self.cumulative
        return abar[i], bbar[i], gbar[i]

    @cached_property
    def step_params(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """Per-step (alpha_i, beta_i, gamma_i) of q(x_i | x_{i-1}) for i = 0..T-1 (float64)."""
        alphas, betas, gammas = [], [], []
        for i in range(self.num_timesteps):
            a, b, g = self.transition(i - 1, i)
            alphas.append(a)
            betas.append(b)
            gammas.append(g)
        return tuple(alphas), tuple(betas), tuple(gammas)

    def transition(self, s: int, t: int) -> tuple[float, float, float]:
        """(alpha, beta, gamma) of the two-time kernel q(x_t | x_s), -1 <= s < t (docs/design.md §3.3).

        alpha = abar_t / abar_s,  1 - gamma = (1 - gbar_t) / (1 - gbar_s),  beta = (1 - alpha - gamma) / K.
        """
        if not -1 <= s < t:
            raise ValueError(f"need -1 <= s < t, got s={s}, t={t}")
        a_s, _, g_s = self.cumulative_at(s)
        a_t, _, g_t = self.cumulative_at(t)
        alpha = a_t / a_s if a_s > 0 else 0.0
        keep = (1.0 - g_t) / (1.0 - g_s) if g_s < 1 else 1.0
        gamma = 1.0 - keep
        rest = 1.0 - alpha - gamma
        beta = rest / self.num_classes if rest > 1e-12 else 0.0
        return alpha, beta, gamma

    # -- thin wrappers over the pure functions below, so ``pipe.schedule`` is self-contained ----------------
    def posterior_log_probs(
        self,
        log_p_x0: torch.Tensor,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        s: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p(x_s | x_t) = log sum_x0 q(x_s | x_t, x0) p(x0 | x_t); see :func:`posterior_log_probs`."""
        return posterior_log_probs(self, log_p_x0, x_t, t, s)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """x_t ~ q(x_t | x0); see :func:`q_sample`."""
        return q_sample(self, x0, t, generator)


MASKING_SHAPES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class MaskingSchedule(MaskReplaceSchedule):
    """The mask-only schedule of a time-agnostic masked model (MaskGIT, aMUSEd; docs/design.md §12): no
    token is ever replaced, and the masked fraction at step index t is

        gbar_t = gamma(1 - (t + 1) / T),  gamma(r) = cos(pi r / 2) (``"cosine"``) or 1 - r (``"linear"``),

    so gbar_{T-1} = 1 (all [MASK]) and gbar_{-1} = 0 (x0); abar_t = 1 - gbar_t, bbar_t = 0.  A run of S
    uniformly spaced steps (S dividing T) leaves N gamma((i + 1) / S) positions masked after its step i, the
    counts of aMUSEd's own sampler.  The endpoint fields of the base class are unused.
    """

    masking_schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.masking_schedule not in MASKING_SHAPES:
            raise ConfigError(
                f"{type(self).__name__}: masking_schedule must be one of {list(MASKING_SHAPES)}, "
                f"got {self.masking_schedule!r}"
            )
        super().__post_init__()

    @cached_property
    def cumulative(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        T = self.num_timesteps
        gbar = tuple(masked_fraction(1.0 - (t + 1) / T, self.masking_schedule) for t in range(T))
        return tuple(1.0 - g for g in gbar), (0.0,) * T, gbar


def masked_fraction(progress: float, masking_schedule: str = "cosine") -> float:
    """gamma(r): the fraction of positions still masked after a share r in [0, 1] of a masked model's
    sampling run: cos(pi r / 2) or 1 - r (exactly 0 at r = 1, 1 at r = 0)."""
    if masking_schedule not in MASKING_SHAPES:
        raise ValueError(f"masking_schedule must be one of {list(MASKING_SHAPES)}, got {masking_schedule!r}")
    if progress >= 1.0:
        return 0.0
    return math.cos(math.pi * progress / 2) if masking_schedule == "cosine" else 1.0 - progress


def uniform_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced step indices T-1 = t_n > ... > t_1 >= 0 for ``num_steps`` model evaluations.

    t_i = round(i * T / n) - 1, so every jump covers T/n training steps and the last one goes from
    t_1 = T/n - 1 to x0; ``num_steps == T`` gives T-1, ..., 0.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"number of steps must be in [1, {num_timesteps}], got {num_steps}")
    return [round(i * num_timesteps / num_steps) - 1 for i in range(num_steps, 0, -1)]


SPACINGS = ("uniform", "quadratic")


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """Step indices T-1 = t_n > ... > t_1 >= 0 for ``num_steps`` model evaluations.

    ``"uniform"``: :func:`uniform_timesteps`.  ``"quadratic"``: t_i = ceil(T (i/n)^2) - 1, made strictly
    decreasing, so the jumps are long while most tokens are [MASK] (early in sampling) and short near x0,
    where the last tokens are filled in next to many already decided ones.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {list(SPACINGS)}, got {spacing!r}")
    if spacing == "uniform":
        return uniform_timesteps(num_timesteps, num_steps)
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"number of steps must be in [1, {num_timesteps}], got {num_steps}")
    ascending: list[int] = []
    for i in range(1, num_steps + 1):
        raw = math.ceil(num_timesteps * (i / num_steps) ** 2 - 1e-9) - 1
        low = ascending[-1] + 1 if ascending else 0
        high = num_timesteps - 1 - (num_steps - i)  # leave room for the remaining steps
        ascending.append(min(max(raw, low), high))
    return ascending[::-1]


def check_timesteps(schedule: MaskReplaceSchedule, timesteps: Sequence[int]) -> None:
    """ValueError unless ``timesteps`` are strictly decreasing step indices in [0, T)."""
    steps = list(timesteps)
    if not steps or any(a <= b for a, b in zip(steps, steps[1:], strict=False)) or steps[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing indices >= 0, got {steps}")
    if steps[0] >= schedule.num_timesteps:
        raise ValueError(f"timesteps must be < T={schedule.num_timesteps}, got {steps[0]}")
