"""The forward process q(x_t | x0) and the reverse posterior p(x_s | x_t) for any s < t (VQ-Diffusion eq. 4
and 11; docs/design.md §3-4)."""

from __future__ import annotations

import math

import torch

from .random import Generator, rand_uniform
from .tables import ScheduleTable, as_index, cumulative_table

# The references clamp log-probabilities at -70 before the posterior; we do the same so that the observed
# token of a real x_t never has exactly zero mass (exp(-70) ~ 4e-31 is still a normal float32).
LOG_EPS = -70.0


def q_sample(
    schedule: ScheduleTable, x0: torch.Tensor, t: int | torch.Tensor, generator: Generator = None
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
    t = as_index(t, B, x0.device, "t", 0, schedule.num_timesteps - 1)
    table = cumulative_table(schedule, x0.device)[t + 1]  # [B, 3]
    gbar = table[:, 2:3]
    replace = gbar + K * table[:, 1:2]  # cumulative threshold for mask-or-replace
    u = rand_uniform((B, 2, N), generator, x0.device)
    random_token = (u[:, 1] * K).long().clamp_(max=K - 1)
    x_t = torch.where(u[:, 0] < replace, random_token, x0)
    return torch.where(u[:, 0] < gbar, torch.full_like(x0, K), x_t)


def _posterior_coefficients(schedule: ScheduleTable, t: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 [B] scalars of the closed-form posterior for the pairs (s, t) (docs/design.md §4.2)."""
    table = cumulative_table(schedule, t.device)
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
    schedule: ScheduleTable,
    log_p_x0: torch.Tensor,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    s: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(x_s | x_t) = log sum_x0 q(x_s | x_t, x0) p(x0 | x_t)  (paper eq. 11; docs/design.md §4).

    q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0) with the two-time kernel q(x_t | x_s) of
    :meth:`~vqdiffusion.diffusion.schedule.MaskReplaceSchedule.transition`, so any -1 <= s < t is exact
    (s = t - 1 is the usual one step; s = -1 returns p(x0 | x_t) itself).  Writing w(x0) = p(x0) /
    q(x_t | x0) and summing over x0 in closed form gives, per position (a, b, g: cumulative; alpha, beta,
    gamma: the s -> t kernel):

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
    t = as_index(t, B, device, "t", 0, T - 1)
    s = t - 1 if s is None else as_index(s, B, device, "s", -1, T - 2)
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
