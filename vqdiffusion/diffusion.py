"""Discrete mask-and-replace diffusion (VQ-Diffusion, Gu et al. 2022, sec. 3-4; docs/design.md §3-6).

Pure functions over tensors plus a frozen schedule dataclass; no ``nn.Module`` state.

Conventions (used everywhere in the package):

* Token values ``0..K-1`` are real codebook entries, value ``K`` is [MASK] (``mask_id == K``).
* Steps are 0-based: index ``i`` is the paper's step ``i + 1``; ``i = 0`` is the first noising step and
  ``i = T - 1`` the last.  The index ``-1`` names the clean data x0 (cumulative alpha 1, gamma 0); it is
  handled explicitly, never by wrap-around indexing.
* ``log_p_x0`` tensors are ``[B, K, N]`` (classes on dim 1, N = h * w positions); distributions over
  x_t or x_s include [MASK] and are ``[B, K + 1, N]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import cached_property

import torch

from .config import ConfigBase, ConfigError

# The references clamp log-probabilities at -70 before the posterior; we do the same so that the observed
# token of a real x_t never has exactly zero mass (exp(-70) ~ 4e-31 is still a normal float32).
LOG_EPS = -70.0

Generator = torch.Generator | Sequence[torch.Generator] | None


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


# ---------------------------------------------------------------------------------------------------------
# Random numbers with an explicit generator (or one generator per batch row)
# ---------------------------------------------------------------------------------------------------------
def _rand(
    shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Uniform [0, 1) noise, float64 unless asked; a list of generators gives row b of the batch from
    generator b.

    The draws are float64 because float32 uniforms have a resolution of 2^-24: a Gumbel -log(-log U) built
    on them never exceeds about 16.6 and is coarse near its top, and an inverse-CDF draw cannot resolve a
    class of probability below about 1e-7 (Zheng et al. 2024, "Masked diffusion models are secretly
    time-agnostic masked models and exploit inaccurate categorical sampling").
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
    return torch.cat([torch.rand((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def sample_categorical(log_probs: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Sample one class per position from ``log_probs`` [B, C, N] (dim 1 = classes) -> [B, N] long.

    Inverse CDF with one float64 uniform per position: with p_c = exp(log p_c - max) (unnormalised inputs are
    fine), F_c = sum_{j <= c} p_j accumulated in float64 and v = (1 - U) F_C in (0, F_C], the draw is the first
    class whose cumulative mass reaches v.  Classes of zero mass (log p = -inf) are never drawn.  The float64
    uniform and sums resolve probabilities far below float32's 2^-24 (see :func:`_rand`); one uniform per
    position instead of one per class (Gumbel-max) keeps it cheap.

    The search runs in two levels of about sqrt(C) classes (docs/design.md §6.2): float64 block masses and
    their cumulative sum pick the block holding v, and only that block's classes are accumulated, so no
    [B, C, N] float64 tensor is built.  Any memory layout of ``log_probs`` works (e.g. the denoiser's
    transposed view).
    """
    B, C, N = log_probs.shape
    p = (log_probs - log_probs.amax(dim=1, keepdim=True)).exp_()  # [B, C, N] in (0, 1], input layout
    width = math.isqrt(C - 1) + 1 if C > 1 else 1  # classes per block: ceil(sqrt(C)) or just above
    full = C // width
    masses = [_block_masses(p[:, : full * width].unflatten(1, (full, width)))] if full else []
    if full * width < C:  # a shorter last block
        masses.append(p[:, full * width :].sum(1, keepdim=True, dtype=torch.float64))
    cum_block = torch.cat(masses, dim=1).cumsum_(1) if len(masses) > 1 else masses[0].cumsum(1)  # [B, nb, N]
    num_blocks = cum_block.shape[1]
    v = (1.0 - _rand((B, N), generator, log_probs.device)) * cum_block[:, -1]  # [B, N] in (0, F_C]
    block = (cum_block < v[:, None]).sum(1).clamp_(max=num_blocks - 1)  # first block whose mass reaches v
    before = cum_block.gather(1, (block - 1).clamp_(min=0)[:, None]).squeeze(1).masked_fill_(block == 0, 0.0)
    index = block[:, None] * width + torch.arange(width, device=p.device)[:, None]  # [B, width, N]
    inside = index < C  # the last block may be shorter
    values = p.gather(1, index.clamp_(max=C - 1)).double().masked_fill_(~inside, 0.0)
    cum_inner = values.cumsum_(1)  # [B, width, N] float64, the block's own cumulative mass
    # v - before > 0 exactly (v > before); the min keeps a rounding difference between the two summation
    # orders from stepping past the block's last class of positive mass.
    rest = torch.minimum(v - before, cum_inner[:, -1])
    offset = (cum_inner < rest[:, None]).sum(1)
    return (block * width + offset).clamp_(max=C - 1)


def _block_masses(p_blocks: torch.Tensor) -> torch.Tensor:
    """sum over dim 2 of [B, nb, width, N] in float64 -> [B, nb, N], a few positions at a time so that the
    float64 copy stays small (about 8 MB) instead of one [B, C, N] float64 tensor."""
    B, nb, width, N = p_blocks.shape
    step = max(1, 2**20 // max(1, B * nb * width))
    if step >= N:
        return p_blocks.sum(2, dtype=torch.float64)
    return torch.cat([part.sum(2, dtype=torch.float64) for part in p_blocks.split(step, dim=3)], dim=2)


# ---------------------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------------------
def _cumulative_table(schedule: MaskReplaceSchedule, device: torch.device) -> torch.Tensor:
    """[T + 1, 3] float64 table of (abar, bbar, gbar); row 0 is x0 (index -1), row i + 1 is step i."""
    rows = [schedule.cumulative_at(i) for i in range(-1, schedule.num_timesteps)]
    return torch.tensor(rows, dtype=torch.float64, device=device)


def _as_index(t: int | torch.Tensor, batch: int, device: torch.device, name: str, low: int, high: int) -> torch.Tensor:
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


def q_sample(
    schedule: MaskReplaceSchedule, x0: torch.Tensor, t: int | torch.Tensor, generator: Generator = None
) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0) (paper eq. 4 with cumulative parameters).

    Args:
        x0: [B, N] long clean tokens in [0, K).
        t: step index (int or [B] long) in [0, T).
    Returns:
        [B, N] long: [MASK] with prob gbar_t, a uniform real token with prob K * bbar_t, else x0.
    """
    if x0.ndim != 2:
        raise ValueError(f"x0 must be [B, N], got shape {tuple(x0.shape)}")
    B, N = x0.shape
    K = schedule.num_classes
    t = _as_index(t, B, x0.device, "t", 0, schedule.num_timesteps - 1)
    table = _cumulative_table(schedule, x0.device)[t + 1]  # [B, 3]
    gbar = table[:, 2:3]
    replace = gbar + K * table[:, 1:2]  # cumulative threshold for mask-or-replace
    u = _rand((B, 2, N), generator, x0.device)
    random_token = (u[:, 1] * K).long().clamp_(max=K - 1)
    x_t = torch.where(u[:, 0] < replace, random_token, x0)
    return torch.where(u[:, 0] < gbar, torch.full_like(x0, K), x_t)


# ---------------------------------------------------------------------------------------------------------
# Reverse process: posterior p(x_s | x_t) for any s < t, per position with gathers
# ---------------------------------------------------------------------------------------------------------
def _posterior_coefficients(schedule: MaskReplaceSchedule, t: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 [B] scalars of the closed-form posterior for the pairs (s, t) (docs/design.md §4.2)."""
    table = _cumulative_table(schedule, t.device)
    a_s, b_s, g_s = table[s + 1].unbind(-1)
    a_t, b_t, g_t = table[t + 1].unbind(-1)
    K = schedule.num_classes
    alpha = torch.where(a_s > 0, a_t / a_s.clamp_min(1e-300), torch.zeros_like(a_s))
    gamma = 1.0 - (1.0 - g_t) / (1.0 - g_s).clamp_min(1e-300)
    rest = 1.0 - alpha - gamma
    beta = torch.where(rest > 1e-12, rest / K, torch.zeros_like(rest))

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:  # 0 / 0 := 0 (impossible branch)
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))

    return {
        # x_t = [MASK]:  u(j) = gamma/g_t * (a_s p_j + b_s),  u(MASK) = g_s / g_t
        "mask_A": ratio(gamma * a_s, g_t),
        "mask_B": ratio(gamma * b_s, g_t),
        "mask_stay": ratio(g_s, g_t),
        # x_t = k real:  u(j != k) = r1 p_j + r2 (1 - p_k) + r3 p_k
        "r1": ratio(beta * a_s, b_t),
        "r2": ratio(beta * b_s, b_t),
        "r3": ratio(beta * b_s, a_t + b_t),
        # u(k) = c_keep p_k + c_other (1 - p_k)
        "c_keep": ratio((alpha + beta) * (a_s + b_s), a_t + b_t),
        "c_other": ratio((alpha + beta) * b_s, b_t),
    }


def posterior_log_probs(
    schedule: MaskReplaceSchedule,
    log_p_x0: torch.Tensor,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    s: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(x_s | x_t) = log sum_x0 q(x_s | x_t, x0) p(x0 | x_t)  (paper eq. 11; docs/design.md §4).

    q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0) with the two-time kernel q(x_t | x_s) of
    :meth:`MaskReplaceSchedule.transition`, so any -1 <= s < t is exact (s = t - 1 is the usual one step;
    s = -1 returns p(x0 | x_t) itself).  Writing w(x0) = p(x0) / q(x_t | x0) and summing over x0 in closed
    form gives, per position (a, b, g: cumulative; alpha, beta, gamma: the s -> t kernel):

    * x_t = [MASK]: p(MASK) = g_s / g_t and p(j) = gamma (a_s p_j + b_s) / g_t;
    * x_t = k:      p(MASK) = 0, p(j != k) = beta (a_s p_j / b_t + b_s W), p(k) = (alpha + beta)
      (a_s p_k / (a_t + b_t) + b_s W), with W = (1 - p_k) / b_t + p_k / (a_t + b_t).

    Every coefficient is a float64 scalar or a [B, N] tensor; the only [B, K, N] work is one
    ``logaddexp`` and a scatter.  The result is normalised exactly (analytic normaliser), which also covers
    schedules with b = 0 where some x0 are inconsistent with x_t.

    Args:
        log_p_x0: [B, K, N] log p(x0 | x_t), normalised over dim 1 (entries below -70 are raised to -70).
        x_t: [B, N] long in [0, K] (K = [MASK]).
        t: step index of x_t in [0, T) (int or [B] long).
        s: step index of x_s in [-1, t) (int or [B] long); defaults to t - 1.
    Returns:
        [B, K + 1, N] float32 log p(x_s | x_t); row K is [MASK].
    """
    if log_p_x0.ndim != 3 or x_t.ndim != 2:
        raise ValueError(
            f"expected log_p_x0 [B, K, N] and x_t [B, N], got {tuple(log_p_x0.shape)} and {tuple(x_t.shape)}"
        )
    B, K, N = log_p_x0.shape
    if schedule.num_classes != K:
        raise ValueError(f"log_p_x0 has {K} classes but the schedule has K={schedule.num_classes}")
    if x_t.shape != (B, N):
        raise ValueError(f"x_t must be [{B}, {N}] to match log_p_x0, got {tuple(x_t.shape)}")
    T = schedule.num_timesteps
    device = log_p_x0.device
    t = _as_index(t, B, device, "t", 0, T - 1)
    s = t - 1 if s is None else _as_index(s, B, device, "s", -1, T - 2)
    coef = {k: v[:, None] for k, v in _posterior_coefficients(schedule, t, s).items()}  # [B, 1] float64

    log_p = log_p_x0.float().clamp(min=LOG_EPS)
    is_mask = x_t == K  # [B, N]
    x_t_real = x_t.clamp(max=K - 1)
    log_p_k = log_p.gather(1, x_t_real[:, None]).squeeze(1).double()  # [B, N]
    p_k = log_p_k.exp()
    one_minus_p_k = -torch.expm1(log_p_k)

    # Real x_t = k: off-diagonal u(j) = A p_j + C, diagonal u(k), normaliser Z (= 1 when b_t > 0).
    off_const = coef["r2"] * one_minus_p_k + coef["r3"] * p_k
    u_k = coef["c_keep"] * p_k + coef["c_other"] * one_minus_p_k
    z_real = coef["r1"] * one_minus_p_k + (K - 1) * off_const + u_k
    # [MASK] x_t: u(j) = A p_j + C, u(MASK) = stay; the total is exactly 1 when p is normalised.
    z_mask = coef["mask_A"] + K * coef["mask_B"] + coef["mask_stay"]
    log_z = torch.where(is_mask, z_mask.expand(B, N), z_real).log()

    def log(x: torch.Tensor) -> torch.Tensor:
        # log(0) = -inf with a zero (not NaN) gradient: the inner where keeps 0 out of the log's backward.
        positive = x > 0
        return torch.where(positive, torch.where(positive, x, 1.0).log(), -math.inf) - log_z

    log_A = torch.where(is_mask, log(coef["mask_A"].expand(B, N)), log(coef["r1"].expand(B, N)))
    log_C = torch.where(is_mask, log(coef["mask_B"].expand(B, N)), log(off_const))
    # The entry at index x_t: u(k) for real positions, u(MASK) for masked ones.
    log_at_x_t = torch.where(is_mask, log(coef["mask_stay"].expand(B, N)), log(u_k))

    body = torch.logaddexp(log_p + log_A.float()[:, None], log_C.float()[:, None])  # [B, K, N], log_p's layout
    if body.stride(1) == 1:  # classes contiguous (the denoiser's layout): append [MASK] without a transpose
        out = torch.cat([body.transpose(1, 2), body.new_full((B, N, 1), -math.inf)], dim=2).transpose(1, 2)
    else:
        out = torch.cat([body, body.new_full((B, 1, N), -math.inf)], dim=1)
    return out.scatter_(1, x_t[:, None], log_at_x_t.float()[:, None])


# ---------------------------------------------------------------------------------------------------------
# Sampling knobs on log p(x0 | x_t)
# ---------------------------------------------------------------------------------------------------------
def log_softmax_classes(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over dim 1 (classes) of [B, C, N], in whichever layout ``x`` has.

    On the denoiser's classes-contiguous layout (a transposed [B, N, C] tensor) it runs along the contiguous
    dim, with no transposing copy; the result keeps that layout.
    """
    if x.ndim == 3 and x.stride(1) == 1 and x.shape[1] > 1:
        return torch.log_softmax(x.transpose(1, 2), dim=-1).transpose(1, 2)
    return torch.log_softmax(x, dim=1)


def guided_log_probs(log_p_uncond: torch.Tensor, log_p_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Improved VQ-Diffusion sec. 3.1): log_softmax(lu + s (lc - lu)) over dim 1."""
    return log_softmax_classes(log_p_uncond + scale * (log_p_cond - log_p_uncond))


# Truncation measures probability mass in integer quanta of 2^-30, so that every sum is exact and the kept
# set does not depend on the order of summation (a sort-based rule and the bisection agree exactly).
MASS_QUANTUM_BITS = 30


def truncation_quanta(log_p_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p, p, q): log_softmax over dim 1 and p = exp(log p) in float32, q = floor(p * 2^30) as int32,
    all [B, K, N].

    q is the probability mass that :func:`truncate_log_probs` adds up: integer, so sums are exact in any
    order; each entry is within 2^-30 of p (a total within K * 2^-30), and the total stays below 2^31.
    """
    log_p = log_softmax_classes(log_p_x0.float())
    p = log_p.exp()
    return log_p, p, (p * float(2**MASS_QUANTUM_BITS)).to(torch.int32)


def truncate_log_probs(log_p_x0: torch.Tensor, rate: float) -> torch.Tensor:
    """Truncation (paper sec. 4.3): per position keep the most likely classes, renormalised.

    With p = softmax(log p) and M(c) = 2^-30 sum_{j: p_j > p_c} q_j the mass of the classes strictly more
    likely than c (q: :func:`truncation_quanta`), class c is kept iff M(c) < rate; the top class is always kept
    and classes tied in p are kept or dropped together.  This is the sort-based rule of the references
    (sorted descending, class j kept when the mass before it is below ``rate``), with ties resolved
    upwards.  ``rate >= 1`` returns the input unchanged.

    Below 1 the kept set is {c : p_c >= theta} for the smallest threshold theta with H(theta) =
    sum_{p_j > theta} q_j < R (R = ceil(rate 2^30)); H falls as theta grows.  theta is found as a float32
    bit pattern (for p >= 0 the patterns order like the values; p <= 1 needs 30 bits), 10 bits at a time:
    a histogram of q over the next 10 bits of the classes that share the bits found so far (plus one bucket
    for the classes above them) gives H at every candidate at once (:func:`_threshold_digit`).  Three rounds
    of a few passes over [B, K, N], whatever the distribution; no sort.

    Args:
        log_p_x0: [B, K, N] log-probabilities (renormalised over dim 1 first).
        rate: truncation rate r in (0, 1].
    Returns:
        [B, K, N] float32 log-probabilities with dropped classes at -inf, renormalised over the kept ones.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"truncation rate must be in (0, 1], got {rate}")
    if rate >= 1.0:
        return log_p_x0
    log_p, p, q = truncation_quanta(log_p_x0)
    bits = p.view(torch.int32)  # p in [0, 1]: patterns 0 .. 0x3F800000 < 2^30, ordered like the values
    limit = math.ceil(rate * 2**MASS_QUANTUM_BITS)
    prefix = torch.zeros((p.shape[0], 1, p.shape[2]), dtype=torch.int32, device=p.device)  # [B, 1, N]
    for shift in (20, 10, 0):
        prefix = (prefix << 10) + _threshold_digit(bits, q, prefix, shift, limit)
    keep = bits >= prefix  # prefix is now theta's full bit pattern
    kept_mass = torch.where(keep, p, torch.zeros((), device=p.device)).sum(dim=1, keepdim=True)
    return torch.where(keep, log_p - kept_mass.log(), torch.full((), -math.inf, device=p.device))


def _threshold_digit(bits: torch.Tensor, q: torch.Tensor, prefix: torch.Tensor, shift: int, limit: int) -> torch.Tensor:
    """The next 10-bit digit d of the threshold of :func:`truncate_log_probs`, [B, 1, N] int32.

    Known: theta >> (shift + 10) == ``prefix``.  Bucket every class by v = (bits >> shift) - (prefix << 10)
    clamped to [-1, 1024] (-1: below the prefix, 1024: above it) and add up q per bucket; the mass above
    bucket d is H(top of candidate d), non-increasing in d, so d = the number of d' in 0..1023 with
    mass above d' >= R (H below the prefix is >= R by the previous digit).
    """
    B, K, N = bits.shape
    width = 1026  # buckets v + 1 = 0 .. 1025 per position
    # One flat histogram [B, N, width]: position (b, n) owns entries (b N + n) width + 0 .. width - 1.
    index_dtype = torch.int32 if B * N * width < 2**31 else torch.int64  # int32 indices: cheaper to build
    start = torch.arange(B * N, device=bits.device, dtype=index_dtype).view(B, 1, N) * width
    low = (prefix << 10).to(index_dtype) - 1  # v = -1
    index = ((bits >> shift).to(index_dtype) + (start - low)).clamp_(start, start + (width - 1))
    # index and q flattened in the same order (memory order for the denoiser's classes-contiguous layout)
    flat = (lambda x: x.transpose(1, 2).reshape(-1)) if q.stride(1) == 1 else (lambda x: x.reshape(-1))
    hist = torch.zeros(B * N * width, dtype=torch.int32, device=bits.device).index_add_(0, flat(index), flat(q))
    upto = hist.view(B, N, width).cumsum(2, dtype=torch.int32)  # exact: the total is below 2^31
    # mass above bucket v + 1 = total - upto[v + 1] >= R  <=>  upto[v + 1] <= total - R
    below = (upto[:, :, 1 : width - 1] <= upto[:, :, width - 1 :] - limit).sum(2, dtype=torch.int32)
    return below.view(B, 1, N)


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


def unmask_budget(schedule: MaskReplaceSchedule, timesteps: Sequence[int], num_tokens: int) -> list[int]:
    """How many [MASK] positions each step of a high-quality (fixed-budget) sampler fills.

    Starting from N = ``num_tokens`` masked positions at ``timesteps[0]``, the step from t_i to the next
    index s (-1 after the last) leaves m(s) = round(N * gbar_s / gbar_{t_n}) masked, the expected count of
    the forward process, so the budgets follow the schedule for any N and any step subset and add up to
    N (m(-1) = 0: nothing stays masked).  For the reference schedule (gbar linear in t) this is about N/T
    per training step, the authors' hard-coded tables for N = 1024.
    """
    steps = list(timesteps)
    check_timesteps(schedule, steps)
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    g_first = schedule.cumulative_at(steps[0])[2]
    targets = [num_tokens] + [round(num_tokens * schedule.cumulative_at(s)[2] / g_first) for s in steps[1:]] + [0]
    return [a - b for a, b in zip(targets, targets[1:], strict=False)]


def temper_log_probs(log_p_x0: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature on p(x0 | x_t): log_softmax(log p / tau) over dim 1; ``tau == 1`` returns the input."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if temperature == 1.0:
        return log_p_x0
    return log_softmax_classes(log_p_x0 / temperature)


PRIOR_RULES = ("uniform", "purity")


def purity_scores(log_p_x0: torch.Tensor) -> torch.Tensor:
    """Purity of every position (Improved VQ-Diffusion sec. 3.2): max_k p(x0 = k | x_t), divided by its
    maximum over the positions of each image.  ``[B, K, N] -> [B, N]`` float32 in (0, 1]."""
    purity = log_p_x0.float().amax(dim=1).exp()
    return purity / purity.amax(dim=1, keepdim=True).clamp_min(1e-30)


def select_positions(weights: torch.Tensor, count: int, generator: Generator = None) -> torch.Tensor:
    """Draw ``count`` positions per row without replacement, with probability proportional to ``weights``
    (successive draws among the positions not drawn yet), as a boolean mask.

    Gumbel-top-k: the ``count`` largest log w + G (G standard Gumbel) are such a draw.  Positions with
    weight 0 are never drawn; each row needs at least ``count`` positive weights.

    Args:
        weights: [B, N] non-negative.
    Returns:
        [B, N] bool, ``count`` True per row.
    """
    if weights.ndim != 2:
        raise ValueError(f"weights must be [B, N], got shape {tuple(weights.shape)}")
    B, N = weights.shape
    if not 0 <= count <= N:
        raise ValueError(f"count must be in [0, {N}], got {count}")
    chosen = torch.zeros((B, N), dtype=torch.bool, device=weights.device)
    if count == 0:
        return chosen
    u = _rand((B, N), generator, weights.device)  # float64: see _rand
    keys = weights.double().log() - torch.log(-torch.log(u))
    return chosen.scatter_(1, keys.topk(count, dim=1).indices, True)


def prior_unmask_step(
    log_p_x0: torch.Tensor,
    x_t: torch.Tensor,
    count: int,
    *,
    rule: str = "purity",
    prior_weight: float = 0.0,
    generator: Generator = None,
) -> torch.Tensor:
    """One step of high-quality inference (Improved VQ-Diffusion sec. 3.2, the authors' ``prior_rule``).

    Exactly ``count`` [MASK] positions of each image are filled; the others are unchanged.  A candidate
    token is drawn at every position from softmax((1 + r * score) * log p(x0 | x_t)) (eq. 11, r =
    ``prior_weight``; the plain p(x0 | x_t) when r = 0); the positions are drawn among the masked ones
    without replacement with probability proportional to the score: the purity (:func:`purity_scores`)
    for ``rule="purity"``, 1 for ``rule="uniform"`` (where r must be 0, as the scaling needs a score).

    Args:
        log_p_x0: [B, K, N] log p(x0 | x_t) (after guidance, temperature, truncation).
        x_t: [B, N] long, K = [MASK]; every row needs at least ``count`` masked positions.
    Returns:
        [B, N] long.
    """
    if rule not in PRIOR_RULES:
        raise ValueError(f"rule must be one of {list(PRIOR_RULES)}, got {rule!r}")
    if not prior_weight >= 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    if rule == "uniform" and prior_weight != 0:
        raise ValueError("prior_weight needs rule='purity' (the uniform rule has no score to scale by)")
    B, K, N = log_p_x0.shape
    if x_t.shape != (B, N):
        raise ValueError(f"x_t must be [{B}, {N}] to match log_p_x0, got {tuple(x_t.shape)}")
    is_mask = x_t == K
    score = purity_scores(log_p_x0) if rule == "purity" else torch.ones((B, N), device=log_p_x0.device)
    log_p = log_p_x0.float()
    if prior_weight > 0:
        log_p = log_softmax_classes((1.0 + prior_weight * score)[:, None] * log_p)
    candidates = sample_categorical(log_p, generator)  # [B, N]
    chosen = select_positions(torch.where(is_mask, score, torch.zeros_like(score)), count, generator)
    return torch.where(chosen, candidates, x_t)


# ---------------------------------------------------------------------------------------------------------
# Training objective (docs/design.md §5)
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LossTerms:
    """Per-example terms of the VQ-Diffusion objective, each [B] float32.

    ``vb``: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) summed over positions, or the decoder NLL
    -log p(x0 | x_1) at step index 0.  ``aux``: the auxiliary x0 cross-entropy (decoder NLL at index 0).
    ``aux_weight``: lambda, times (1 - t/T) + 1 when adaptive.
    """

    vb: torch.Tensor
    aux: torch.Tensor
    aux_weight: torch.Tensor

    def total(self, p_t: torch.Tensor | None = None) -> torch.Tensor:
        """(vb + aux_weight * aux) / p(t): the importance-weighted per-example loss [B]."""
        loss = self.vb + self.aux_weight * self.aux
        return loss if p_t is None else loss / p_t


def log_one_hot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, N] long -> [B, num_classes, N] float32 with 0 at the index and -inf elsewhere."""
    out = torch.full((x.shape[0], num_classes, x.shape[1]), -math.inf, device=x.device)
    return out.scatter_(1, x[:, None], 0.0)


def _kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """sum_c q_c (log q_c - log p_c) over dim 1, with 0 log 0 = 0."""
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(1)


def diffusion_loss(
    schedule: MaskReplaceSchedule,
    log_p_x0: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    aux_weight: float = 5e-4,
    adaptive_aux: bool = True,
    mask_weight: tuple[float, float] = (1.0, 1.0),
) -> LossTerms:
    """The VQ-Diffusion loss terms for a batch (paper eq. 12-13; docs/design.md §5).

    Args:
        log_p_x0: [B, K, N] model prediction log p_theta(x0 | x_t, y).
        x0: [B, N] clean tokens; x_t: [B, N] noised tokens from :func:`q_sample` at ``t``.
        t: [B] long step indices.
        mask_weight: (weight of positions where x_t is [MASK], weight of the others).
    """
    B, K, N = log_p_x0.shape
    log_model = posterior_log_probs(schedule, log_p_x0, x_t, t)  # [B, K+1, N]
    log_true = posterior_log_probs(schedule, log_one_hot(x0, K), x_t, t)
    is_mask = (x_t == K).float()
    weight = is_mask * mask_weight[0] + (1.0 - is_mask) * mask_weight[1]
    kl = (_kl(log_true, log_model) * weight).sum(1)
    decoder_nll = -log_model.gather(1, x0[:, None]).squeeze(1).sum(1)
    first = t == 0
    vb = torch.where(first, decoder_nll, kl)
    cross_entropy = (-log_p_x0.float().gather(1, x0[:, None]).squeeze(1) * weight).sum(1)
    aux = torch.where(first, decoder_nll, cross_entropy)
    w = torch.full((B,), aux_weight, device=x0.device)
    if adaptive_aux:
        w = w * ((1.0 - t.float() / schedule.num_timesteps) + 1.0)
    return LossTerms(vb=vb, aux=aux, aux_weight=w)


class ImportanceTimestepSampler:
    """Importance sampling of training steps (Nichol & Dhariwal 2021; VQ-Diffusion's ``sample_time``).

    Uniform until every step has been seen more than ``min_count`` times, then p(t) proportional to
    sqrt(E[L_t^2]) + 1e-4 (a running average per step, decay 0.1), with step 0 given step 1's weight.
    Sampling and updates stay on the device (no host synchronisation).
    """

    def __init__(
        self,
        num_timesteps: int,
        *,
        min_count: int = 10,
        decay: float = 0.1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_timesteps = num_timesteps
        self.min_count = min_count
        self.decay = decay
        self.loss_sq = torch.zeros(num_timesteps, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_timesteps, dtype=torch.long, device=device)

    def probabilities(self) -> torch.Tensor:
        """[T] float64 sampling distribution over step indices."""
        weight = torch.sqrt(self.loss_sq + 1e-10) + 1e-4
        weight = torch.cat([weight[1:2], weight[1:]]) if self.num_timesteps > 1 else weight
        importance = weight / weight.sum()
        uniform = torch.full_like(importance, 1.0 / self.num_timesteps)
        return torch.where((self.count > self.min_count).all(), importance, uniform)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ([B] long step indices, [B] float32 probabilities p(t))."""
        probs = self.probabilities()
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return t, probs[t].float()

    def update(self, t: torch.Tensor, vb: torch.Tensor) -> None:
        """Fold the per-example losses ``vb`` [B] observed at steps ``t`` [B] into the running averages.

        Examples sharing a step are averaged first, then one moving-average step is applied per step.
        """
        t = t.to(self.count.device)
        seen = torch.zeros_like(self.count).index_add_(0, t, torch.ones_like(t))
        total = torch.zeros_like(self.loss_sq).index_add_(0, t, vb.detach().double().to(self.loss_sq.device) ** 2)
        mean = total / seen.clamp_min(1)
        self.loss_sq = torch.where(seen > 0, self.decay * mean + (1 - self.decay) * self.loss_sq, self.loss_sq)
        self.count += seen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_sq": self.loss_sq.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("loss_sq", "count"):
            if state[key].shape != (self.num_timesteps,):
                raise ValueError(
                    f"sampler state {key} has shape {tuple(state[key].shape)}, expected ({self.num_timesteps},)"
                )
        self.loss_sq = state["loss_sq"].to(self.loss_sq)
        self.count = state["count"].to(self.count)
