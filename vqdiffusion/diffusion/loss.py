"""The training objective and the importance sampler of training steps (VQ-Diffusion eq. 12-13;
docs/design.md §5)."""

from __future__ import annotations

import dataclasses
import math

import torch

from .posterior import posterior_log_probs
from .schedule import MaskReplaceSchedule


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
