"""Math of the newer unmasking samplers (docs/design.md §6.6-6.9): pure functions over tensors, like
:mod:`vqdiffusion.diffusion`; the loops that call the model are in :mod:`vqdiffusion.sampling`.

* MaskGIT / aMUSEd-style confidence sampling (Chang et al. 2022, "MaskGIT: Masked Generative Image
  Transformer"; Patil et al. 2024, "aMUSEd"): not the trained chain.
* ReMDM remasking for mask-only schedules (Wang et al. 2025, "Remasking Discrete Diffusion Models with
  Inference-Time Scaling").
* First-hitting (exact) sampling of the mask-only ancestral chain (Zheng et al. 2024, "Masked diffusion
  models are secretly time-agnostic masked models and exploit inaccurate categorical sampling"; the idea of
  DNDM, Chen et al. 2024, "Fast Sampling via Discrete Non-Markov Diffusion Models").
* A Halton (low-discrepancy) order of the token grid (Besnier et al. 2025, "Halton Scheduler for Masked
  Generative Image Transformer").

Shapes follow :mod:`vqdiffusion.diffusion`: ``log_p_x0`` [B, K, N], tokens [B, N] long with [MASK] = K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .diffusion import Generator, MaskReplaceSchedule, rand_uniform, sample_categorical

# A schedule whose replace mass K * bbar_t never exceeds this is "mask-only" (the reference schedule has
# abar + gbar = 0.999999, i.e. a replace mass of 1e-6, "in effect mask only").
MASK_ONLY_TOLERANCE = 1e-5


def replace_mass(schedule: MaskReplaceSchedule) -> float:
    """max_t K * bbar_t: the largest probability of a uniformly replaced token in q(x_t | x0)."""
    return max(schedule.num_classes * b for b in schedule.cumulative[1])


def require_mask_only(schedule: MaskReplaceSchedule, sampler: str) -> None:
    """Raise a ValueError naming the sampler unless ``schedule`` is mask-only (replace mass <= 1e-5)."""
    mass = replace_mass(schedule)
    if mass > MASK_ONLY_TOLERANCE:
        raise ValueError(
            f"sampler={sampler!r} needs a mask-only schedule, but this model's schedule replaces tokens with "
            f"probability up to {mass:.3g} (K * bbar_t > {MASK_ONLY_TOLERANCE:g}); use sampler='ancestral'"
        )


def _gumbel(shape: Sequence[int], generator: Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise -log(-log U), float64 (see :func:`vqdiffusion.diffusion.rand_uniform`)."""
    return -torch.log(-torch.log(rand_uniform(shape, generator, device)))


# ---------------------------------------------------------------------------------------------------------
# MaskGIT / aMUSEd confidence sampler
# ---------------------------------------------------------------------------------------------------------
MASKING_SCHEDULES = ("cosine", "linear")


def confidence_masked_counts(num_tokens: int, num_steps: int, masking_schedule: str = "cosine") -> list[int]:
    """Masked positions left after each of ``num_steps`` confidence steps, starting from N = ``num_tokens``.

    m_i = min(m_{i-1} - 1, floor(N gamma((i + 1) / n))) (at least one position per step while any is left,
    never below 0), with gamma(r) = cos(pi r / 2) (``"cosine"``, MaskGIT's default) or 1 - r
    (``"linear"``); m_{n-1} = 0, so the last step leaves nothing masked.
    """
    if masking_schedule not in MASKING_SCHEDULES:
        raise ValueError(f"masking_schedule must be one of {list(MASKING_SCHEDULES)}, got {masking_schedule!r}")
    if num_steps < 1 or num_tokens < 1:
        raise ValueError(f"need num_steps >= 1 and num_tokens >= 1, got {num_steps} and {num_tokens}")
    counts, masked = [], num_tokens
    for i in range(num_steps):
        r = (i + 1) / num_steps
        gamma = math.cos(math.pi * r / 2) if masking_schedule == "cosine" else 1.0 - r
        masked = 0 if i == num_steps - 1 else max(0, min(masked - 1, math.floor(num_tokens * gamma)))
        counts.append(masked)
    return counts


def confidence_unmask_step(
    log_p_x0: torch.Tensor,
    x_t: torch.Tensor,
    num_masked_after: int,
    noise_scale: float,
    generator: Generator = None,
) -> torch.Tensor:
    """One MaskGIT step: draw a candidate x0 ~ p(x0 | x_t) at every position, score each masked position by
    its confidence log p(candidate) + ``noise_scale`` * G (G standard Gumbel), keep the
    ``num_masked_after`` lowest-scoring masked positions masked and fill the others with their candidates.

    Equivalently (for noise_scale tau > 0) the filled set is a draw without replacement with weights
    p(candidate)^(1 / tau) (Gumbel-top-k); tau = 0 is greedy by confidence.  Real tokens never change.

    Args:
        log_p_x0: [B, K, N]; x_t: [B, N] long; every row needs at least ``num_masked_after`` [MASK].
    Returns:
        [B, N] long.
    """
    B, K, N = log_p_x0.shape
    if x_t.shape != (B, N):
        raise ValueError(f"x_t must be [{B}, {N}] to match log_p_x0, got {tuple(x_t.shape)}")
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    is_mask = x_t == K
    candidates = sample_categorical(log_p_x0, generator)
    confidence = log_p_x0.float().gather(1, candidates[:, None]).squeeze(1).double()
    if noise_scale > 0:
        confidence = confidence + noise_scale * _gumbel((B, N), generator, log_p_x0.device)
    confidence = torch.where(is_mask, confidence, math.inf)  # real tokens are never chosen to stay masked
    stay = torch.zeros((B, N), dtype=torch.bool, device=x_t.device)
    if num_masked_after > 0:
        stay.scatter_(1, confidence.topk(num_masked_after, dim=1, largest=False).indices, True)
    return torch.where(is_mask & ~stay, candidates, x_t)


def nearest_step(schedule: MaskReplaceSchedule, masked_fraction: float) -> int:
    """The step index t whose gbar_t is nearest ``masked_fraction`` (the model's time input for a state that
    did not come from the trained chain)."""
    gbar = schedule.cumulative[2]
    return min(range(schedule.num_timesteps), key=lambda t: abs(gbar[t] - masked_fraction))


# ---------------------------------------------------------------------------------------------------------
# ReMDM remasking (Wang et al. 2025, sec. 3-4)
# ---------------------------------------------------------------------------------------------------------
REMASK_SCHEDULES = ("cap", "rescale")


def remask_sigma(schedule: MaskReplaceSchedule, t: int, s: int, remask_schedule: str, eta: float) -> float:
    """sigma_t of a ReMDM step from index t to s < t (s = -1: x0), with alpha = 1 - gbar (unmasked mass).

    sigma_max = min(1, (1 - alpha_s) / alpha_t) keeps the step's probabilities in [0, 1]; ``"cap"``:
    sigma = min(eta, sigma_max); ``"rescale"``: sigma = eta * sigma_max (eta in [0, 1]).  The last step
    (alpha_s = 1) never remasks.
    """
    if remask_schedule not in REMASK_SCHEDULES:
        raise ValueError(f"remask_schedule must be one of {list(REMASK_SCHEDULES)}, got {remask_schedule!r}")
    alpha_t = 1.0 - schedule.cumulative_at(t)[2]
    alpha_s = 1.0 - schedule.cumulative_at(s)[2]
    sigma_max = 1.0 if alpha_t <= 0 else min(1.0, (1.0 - alpha_s) / alpha_t)
    return min(eta, sigma_max) if remask_schedule == "cap" else eta * sigma_max


def remask_step(
    log_p_x0: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: float,
    alpha_s: float,
    sigma: float,
    generator: Generator = None,
) -> torch.Tensor:
    """One ReMDM step of a mask-only chain (Wang et al. 2025, eq. 8 with the MDLM parametrisation):

        real z_t = x:   z_s = [MASK] with prob sigma, else x
        [MASK] z_t:     z_s = x0 ~ p(x0 | z_t) with prob (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t),
                        else [MASK]

    sigma = 0 is the ancestral step of a mask-only schedule; it must lie in [0, min(1, (1 - alpha_s) /
    alpha_t)] (see :func:`remask_sigma`).  The marginal q(z_s | x0) is preserved for every such sigma.
    """
    B, K, N = log_p_x0.shape
    if x_t.shape != (B, N):
        raise ValueError(f"x_t must be [{B}, {N}] to match log_p_x0, got {tuple(x_t.shape)}")
    if not 0.0 <= alpha_t < 1.0 or not alpha_t <= alpha_s <= 1.0:
        raise ValueError(f"need 0 <= alpha_t < 1 and alpha_t <= alpha_s <= 1, got {alpha_t} and {alpha_s}")
    sigma_max = 1.0 if alpha_t == 0 else min(1.0, (1.0 - alpha_s) / alpha_t)
    if not 0.0 <= sigma <= sigma_max + 1e-12:
        raise ValueError(f"sigma must be in [0, {sigma_max:.6g}] for this step, got {sigma}")
    unmask = (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t)
    is_mask = x_t == K
    u = rand_uniform((B, N), generator, x_t.device)
    candidates = sample_categorical(log_p_x0, generator)
    filled = torch.where(u < unmask, candidates, x_t)
    remasked = torch.where(u < sigma, torch.full_like(x_t, K), x_t)
    return torch.where(is_mask, filled, remasked)


# ---------------------------------------------------------------------------------------------------------
# First-hitting sampler: every token's unmasking step first, then the model only where something unmasks
# ---------------------------------------------------------------------------------------------------------
def first_hitting_steps(
    schedule: MaskReplaceSchedule,
    timesteps: Sequence[int],
    batch_size: int,
    num_tokens: int,
    generator: Generator = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """For each token of an all-[MASK] start at ``timesteps[0]``, the position i in ``timesteps`` of the step
    at which the ancestral chain unmasks it, [B, N] long in [0, n).

    In the chain a [MASK] token stays [MASK] from t to the next index s with probability gbar_s / gbar_t
    whatever the model predicts (docs/design.md §4), so it is still masked after step i with probability
    S_i = gbar_{s_i} / gbar_{t_n} (S_{n-1} = 0: x0 has no [MASK]), independently of the other tokens.  With
    U uniform, the step is the number of i with S_i > U: P(step = i) = S_{i-1} - S_i.
    """
    steps = [int(t) for t in timesteps]
    start = schedule.cumulative_at(steps[0])[2]
    survival = [schedule.cumulative_at(s)[2] / start for s in steps[1:]] + [0.0]  # S_0 .. S_{n-1}
    s_table = torch.tensor(survival, dtype=torch.float64, device=device)
    u = rand_uniform((batch_size, num_tokens), generator, torch.device(device))
    return (s_table[None, None, :] > u[:, :, None]).sum(2)


def fill_positions(log_p_x0: torch.Tensor, x_t: torch.Tensor, fill: torch.Tensor, generator: Generator = None):
    """x_t with the positions of ``fill`` ([B, N] bool) replaced by draws x0 ~ p(x0 | x_t) (the others
    unchanged).  With one generator per image, only the images with something to fill draw from theirs."""
    rows = fill.any(1)
    if isinstance(generator, torch.Generator) or generator is None:
        return torch.where(fill, sample_categorical(log_p_x0, generator), x_t)
    index = torch.nonzero(rows).flatten().tolist()
    out = x_t.clone()
    if index:
        draws = sample_categorical(log_p_x0[index], [generator[b] for b in index])
        out[index] = torch.where(fill[index], draws, x_t[index])
    return out


# ---------------------------------------------------------------------------------------------------------
# Halton order of a 2-D token grid
# ---------------------------------------------------------------------------------------------------------
ORDERS = ("random", "halton")


def radical_inverse(index: torch.Tensor, base: int) -> torch.Tensor:
    """van der Corput radical inverse phi_b(i) = sum_k d_k b^-(k+1) for i = sum_k d_k b^k, float64."""
    i = index.long().clone()
    out = torch.zeros(i.shape, dtype=torch.float64, device=i.device)
    scale = 1.0 / base
    while bool((i > 0).any()):
        out += (i % base).double() * scale
        i //= base
        scale /= base
    return out


def halton_order(height: int, width: int, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """The cells of a ``height`` x ``width`` grid (row-major index r * width + c) in the order in which the
    2-D Halton sequence (phi_2(i), phi_3(i)), i = 0, 1, ..., shifted by ``shift`` modulo 1 (a random shift
    gives a randomised order; Cranley-Patterson rotation), first visits them: [h * w] long permutation.

    x = phi_2 picks the column floor(x w), y = phi_3 the row floor(y h).  Cells not visited within the first
    64 h w points (none for the grids tried) follow in row-major order.
    """
    n = height * width
    i = torch.arange(64 * n, dtype=torch.long)
    x = (radical_inverse(i, 2) + shift[0]) % 1.0
    y = (radical_inverse(i, 3) + shift[1]) % 1.0
    cell = (y * height).long().clamp_(max=height - 1) * width + (x * width).long().clamp_(max=width - 1)
    first = torch.full((n,), len(i), dtype=torch.long).scatter_reduce_(0, cell, i, reduce="amin")
    return torch.argsort(first, stable=True)


def halton_ranks(
    batch_size: int, height: int, width: int, generator: Generator = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[B, h * w] long: rank[b, n] = place of cell n in image b's :func:`halton_order`, each image with its own
    uniform random shift (two float64 draws from its generator)."""
    shifts = rand_uniform((batch_size, 2), generator, torch.device(device)).cpu().tolist()
    ranks = [torch.argsort(halton_order(height, width, (sx, sy))) for sx, sy in shifts]
    return torch.stack(ranks).to(device)
