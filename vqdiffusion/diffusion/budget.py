"""The step math of the fixed-budget samplers (Improved VQ-Diffusion sec. 3.2; docs/design.md §6.3-6.4):
how many [MASK] positions each step fills, and which ones (uniformly, by purity, or in a given order)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .adjustments import log_softmax_classes
from .random import Generator, rand_uniform, sample_categorical
from .schedule import MaskReplaceSchedule, check_timesteps


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
    u = rand_uniform((B, N), generator, weights.device)  # float64: see rand_uniform
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


def ordered_unmask_step(
    log_p_x0: torch.Tensor, x_t: torch.Tensor, count: int, rank: torch.Tensor, generator: Generator = None
) -> torch.Tensor:
    """A budget step in a fixed order: fill the ``count`` [MASK] positions of lowest ``rank`` ([B, N]) with
    x0 ~ p(x0 | x_t); every row needs at least ``count`` [MASK]."""
    B, K, N = log_p_x0.shape
    candidates = sample_categorical(log_p_x0, generator)
    key = torch.where(x_t == K, rank.to(torch.float64), math.inf)
    chosen = torch.zeros((B, N), dtype=torch.bool, device=x_t.device)
    if count > 0:
        chosen.scatter_(1, key.topk(count, dim=1, largest=False).indices, True)
    return torch.where(chosen, candidates, x_t)
