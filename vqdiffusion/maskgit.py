"""aMUSEd's own confidence step, draw for draw (the reference for conformance; docs/design.md §12).

:func:`vqdiffusion.unmasking.confidence_unmask_step` is the library's MaskGIT step (float64 inverse-CDF
and Gumbel draws).  aMUSEd's scheduler (diffusers' ``AmusedScheduler.step``) makes the same kind of step with
other draws and two details of its own; :func:`amused_confidence_step` reproduces it exactly from the same
``torch.Generator``, so a run can be compared with diffusers' ``AmusedPipeline`` token for token:

* candidates: one ``torch.multinomial`` draw per position from softmax(logits) in float32 (all positions,
  known ones are then kept);
* confidence: log p(candidate) (probabilities clamped at 1e-20) + tau_i * G with float32 Gumbel noise
  -log(-log U) from one ``uniform_`` of [B, N]; known positions get confidence log(float32 max);
* count: m = max(1, min(#masked - 1, floor(N * gamma((i + 1) / S)))) per row, gamma = cos(pi r / 2) or 1 - r
  evaluated in float32; the positions whose confidence is below the m-th smallest stay masked; the last step
  (i = S - 1) fills every position and draws no noise;
* temperatures: tau_i = linspace(t0, t1, S)[i] (default (2, 0)).

Shapes: logits [B, K, N] (any layout), tokens [B, N] long with [MASK] = K (our convention).
"""

from __future__ import annotations

import math

import torch

__all__ = ["AMUSED_MASKING_SCHEDULES", "amused_confidence_step", "amused_mask_ratio", "amused_temperatures"]

AMUSED_MASKING_SCHEDULES = ("cosine", "linear")


def amused_temperatures(
    num_steps: int, temperature: float | tuple[float, float] = (2.0, 0.0), device: torch.device | str | None = None
) -> torch.Tensor:
    """[S] float32 Gumbel scales: linspace(t0, t1, S), or linspace(t, 0.01, S) for a single number."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    start, end = temperature if isinstance(temperature, (tuple, list)) else (temperature, 0.01)
    return torch.linspace(start, end, num_steps, device=device)


def amused_mask_ratio(step: int, num_steps: int, masking_schedule: str = "cosine") -> torch.Tensor:
    """0-d float32: the fraction of the grid still masked after step ``step`` (0-based) of ``num_steps``."""
    if masking_schedule not in AMUSED_MASKING_SCHEDULES:
        raise ValueError(f"masking_schedule must be one of {AMUSED_MASKING_SCHEDULES}, got {masking_schedule!r}")
    ratio = torch.tensor(step + 1, dtype=torch.float32) / num_steps
    return torch.cos(ratio * math.pi / 2) if masking_schedule == "cosine" else 1 - ratio


def amused_confidence_step(
    logits: torch.Tensor,
    x_t: torch.Tensor,
    step: int,
    num_steps: int,
    *,
    temperatures: torch.Tensor,
    masking_schedule: str = "cosine",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of aMUSEd's sampler (see the module docstring).

    Args:
        logits: [B, K, N] (guided) logits over the K codes; x_t: [B, N] long in [0, K], K = [MASK].
        step: the 0-based step i of ``num_steps``; temperatures: [S] from :func:`amused_temperatures`.
    Returns:
        (x_next [B, N] long with K where still masked, x0 candidates [B, N] long: x_t's known tokens kept).
    """
    B, K, N = logits.shape
    if x_t.shape != (B, N):
        raise ValueError(f"x_t must be [{B}, {N}] to match logits, got {tuple(x_t.shape)}")
    if not 0 <= step < num_steps:
        raise ValueError(f"step must lie in [0, {num_steps}), got {step}")
    unknown = x_t == K
    probs = logits.transpose(1, 2).softmax(dim=-1)  # [B, N, K]
    draw = probs.to(generator.device) if generator is not None else probs  # draws on the generator's device
    draw = draw if draw.dtype == torch.float32 or draw.device.type != "cpu" else draw.float()
    candidates = torch.multinomial(draw.reshape(-1, K), 1, generator=generator)[:, 0].view(B, N).to(x_t.device)
    candidates = torch.where(unknown, candidates, x_t)
    if step == num_steps - 1:
        return candidates, candidates
    mask_len = (N * amused_mask_ratio(step, num_steps, masking_schedule)).floor().to(logits.device)
    mask_len = torch.minimum(unknown.sum(dim=-1, keepdim=True) - 1, mask_len)
    mask_len = torch.clamp(mask_len, min=1)
    selected = probs.gather(-1, candidates[:, :, None])[:, :, 0]
    selected = torch.where(unknown, selected, torch.finfo(selected.dtype).max)
    where = generator.device if generator is not None else selected.device
    noise = torch.zeros_like(selected, device=where).uniform_(0, 1, generator=generator).to(selected.device)
    gumbel = -torch.log((-torch.log(noise.clamp(1e-20))).clamp(1e-20))
    confidence = torch.log(selected.clamp(1e-20)) + temperatures[step] * gumbel
    cut_off = confidence.sort(dim=-1).values.gather(1, mask_len.long())
    return torch.where(confidence < cut_off, K, candidates), candidates
