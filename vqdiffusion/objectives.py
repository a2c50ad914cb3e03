"""Training objectives of the denoiser (docs/design.md §5.3), per example over a batch.

All three take the model's log p_theta(x0 | x_t) [B, K, N], the clean tokens x0 [B, N], the corrupted tokens
x_t [B, N] drawn from q(x_t | x0) at step indices t [B], and return :class:`~vqdiffusion.diffusion.LossTerms`
(``vb`` the objective's term [B] summed over positions, ``aux`` and ``aux_weight`` the auxiliary loss):

- ``vlb``: VQ-Diffusion's variational bound (Gu et al. 2022, eq. 12-13): the KL between the true and the
  model's posterior p(x_{t-1} | x_t) at every position (the decoder NLL at index 0) plus the auxiliary x0
  cross-entropy; the steps are importance-sampled and the term divided by p(t).
- ``masked_ce``: the MaskGIT / MUSE loss (Chang et al. 2022, Chang et al. 2023): the unweighted cross-entropy
  -log p(x0_n | x_t) summed over the positions that are corrupted at t (x_t != x0: [MASK] or replaced);
  uniform steps.
- ``elbo``: the masked-diffusion bound (MD4, Shi et al. 2024; MDLM, Sahoo et al. 2024) in discrete time:
  r_t * sum over [MASK] positions of -log p(x0_n | x_t), with r_t = q(x_{t-1} = x0 | x_t = [MASK], x0) the
  probability that a masked token is unmasked at step t (r_0 = 1: the decoder term).  For a mask-only
  schedule this is exactly the ``vlb`` step term (the KL at an unmasked position is 0, at a masked one
  r_t * CE); uniform steps, so T * E_t[term] is the bound.
"""

from __future__ import annotations

import torch

from .diffusion import LossTerms, MaskReplaceSchedule, diffusion_loss
from .diffusion.tables import cumulative_table

__all__ = [
    "IMPORTANCE_SAMPLED",
    "is_mask_only",
    "masked_cross_entropy",
    "masked_elbo",
    "objective_loss",
    "unmask_probabilities",
]

# Objectives whose steps are importance-sampled (the term divided by p(t)); the others draw t uniformly.
IMPORTANCE_SAMPLED = frozenset({"vlb"})

# The largest total replacement probability K * bbar_t of a schedule that counts as mask only (the reference
# schedule has 1e-6: abar + gbar = 0.999999).
MASK_ONLY_TOLERANCE = 1e-4


def is_mask_only(schedule: MaskReplaceSchedule) -> bool:
    """Whether no step replaces more than :data:`MASK_ONLY_TOLERANCE` of the tokens (K * bbar_t)."""
    _, bbar, _ = schedule.cumulative
    return max(bbar) * schedule.num_classes <= MASK_ONLY_TOLERANCE


def unmask_probabilities(schedule: MaskReplaceSchedule) -> torch.Tensor:
    """[T] float64 r_t = q(x_{t-1} = x0 | x_t = [MASK], x0) = (abar_{t-1} + bbar_{t-1}) gamma_t / gbar_t (r_0 = 1).

    Bayes: every real token is masked at step t with gamma_t = 1 - (1 - gbar_t) / (1 - gbar_{t-1}), and
    q(x_{t-1} = x0 | x0) = abar_{t-1} + bbar_{t-1}; for a mask-only schedule (abar = 1 - gbar, bbar = 0)
    r_t = (gbar_t - gbar_{t-1}) / gbar_t.
    """
    values = []
    for t in range(schedule.num_timesteps):
        abar_prev, bbar_prev, _ = schedule.cumulative_at(t - 1)
        _, _, gbar = schedule.cumulative_at(t)
        _, _, gamma = schedule.transition(t - 1, t)
        values.append((abar_prev + bbar_prev) * gamma / gbar if gbar > 0 else 0.0)
    return torch.tensor(values, dtype=torch.float64)


def _token_nll(log_p_x0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """[B, N] float32 -log p(x0_n | x_t)."""
    return -log_p_x0.float().gather(1, x0[:, None]).squeeze(1)


def masked_cross_entropy(log_p_x0: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """[B] sum over corrupted positions (x_t != x0) of -log p(x0_n | x_t)."""
    return (_token_nll(log_p_x0, x0) * (x_t != x0)).sum(1)


def masked_elbo(
    schedule: MaskReplaceSchedule, log_p_x0: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """[B] r_t * sum over [MASK] positions of -log p(x0_n | x_t) (see :func:`unmask_probabilities`), r_t read
    from the schedule's cached cumulative table at the batch's steps only."""
    table = cumulative_table(schedule, log_p_x0.device)  # [T + 1, 3]: row 0 is x0, row i + 1 is step i
    prev, cur = table[t], table[t + 1]  # [B, 3] at steps t - 1 and t
    gamma = 1.0 - (1.0 - cur[:, 2]) / (1.0 - prev[:, 2])
    r = torch.where(cur[:, 2] > 0, (prev[:, 0] + prev[:, 1]) * gamma / cur[:, 2], torch.zeros_like(gamma)).float()
    return r * (_token_nll(log_p_x0, x0) * (x_t == schedule.mask_id)).sum(1)


def objective_loss(
    objective: str,
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
    """The loss terms of ``objective`` (``"vlb"``, ``"masked_ce"`` or ``"elbo"``) for a batch.

    ``aux_weight``, ``adaptive_aux`` and ``mask_weight`` are the ``vlb`` settings of :func:`diffusion_loss`;
    the other objectives have no auxiliary term.
    """
    if objective == "vlb":
        return diffusion_loss(
            schedule, log_p_x0, x0, x_t, t, aux_weight=aux_weight, adaptive_aux=adaptive_aux, mask_weight=mask_weight
        )
    if objective == "masked_ce":
        term = masked_cross_entropy(log_p_x0, x0, x_t)
    elif objective == "elbo":
        term = masked_elbo(schedule, log_p_x0, x0, x_t, t)
    else:
        raise ValueError(f"objective must be one of 'vlb', 'masked_ce', 'elbo', got {objective!r}")
    zeros = torch.zeros_like(term)
    return LossTerms(vb=term, aux=zeros, aux_weight=zeros)
