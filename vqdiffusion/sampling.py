"""The reverse-process sampling loop: step subset, learned-null guidance and truncation combined.

Each option is a typed field of :class:`SamplingOptions`; the math lives in :mod:`vqdiffusion.diffusion`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .diffusion import (
    Generator,
    MaskReplaceSchedule,
    posterior_log_probs,
    sample_categorical,
    truncate_log_probs,
    uniform_timesteps,
)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Knobs of one sampling run (SPEC section 5).

    num_inference_steps: model evaluations, 1..T; fewer than T use the exact skip-step posterior.
    guidance_scale: classifier-free guidance s (log p_u + s (log p_c - log p_u)); 1 disables it (one pass).
    truncation_rate: keep the most likely x0 classes up to this cumulative mass, in (0, 1]; 1 disables it.
    """

    num_inference_steps: int = 100
    guidance_scale: float = 5.0
    truncation_rate: float = 1.0

    def validate(self, num_timesteps: int) -> None:
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in [1, {num_timesteps}], got {steps!r}")
        scale = self.guidance_scale
        if not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {scale!r}")
        rate = self.truncation_rate
        if not isinstance(rate, int | float) or not 0.0 < rate <= 1.0:
            raise ValueError(f"truncation_rate must be in (0, 1], got {rate!r}")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0


# (x_t [B, N] long, t int) -> log p(x0 | x_t) [B, K, N], guidance already combined
PredictFn = Callable[[torch.Tensor, int], torch.Tensor]


def guided_predictor(
    denoiser: torch.nn.Module,
    cond: torch.Tensor | None,
    null_cond: torch.Tensor | None,
    guidance_scale: float,
) -> PredictFn:
    """A closure x_t, t -> log p(x0 | x_t) with the condition's cross-attention keys/values computed once.

    With guidance the conditional and null inputs run as one batch of 2B and are combined as
    log_softmax((1 - s) * logits_u + s * logits_c); per-position constants cancel in the softmax, so the
    raw logits can be used directly (Improved VQ-Diffusion sec. 3.1).
    """
    if guidance_scale != 1.0 and null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a null condition; pass null_cond or use 1.0")
    if guidance_scale == 1.0:
        cond_kv = denoiser.precompute_cond_kv(cond) if cond is not None else None

        def predict(x_t: torch.Tensor, t: int) -> torch.Tensor:
            return denoiser(x_t, t, cond_kv=cond_kv, validate=False)

        return predict

    both_kv = denoiser.precompute_cond_kv(torch.cat([null_cond, cond]))
    scale = float(guidance_scale)

    def predict_guided(x_t: torch.Tensor, t: int) -> torch.Tensor:
        # x_t is shared by the two condition groups (the first self-attention runs once): [2B, K, N]
        logits = denoiser(x_t, t, cond_kv=both_kv, validate=False, return_logits=True)
        logits_u, logits_c = logits.chunk(2)  # [B, K, N] each
        return torch.log_softmax(torch.lerp(logits_u, logits_c, scale), dim=1)

    return predict_guided


def sample_tokens(
    predict: PredictFn,
    schedule: MaskReplaceSchedule,
    batch_size: int,
    num_tokens: int,
    options: SamplingOptions,
    *,
    generator: Generator = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Run the reverse chain from all-[MASK] at step T-1 down to x0 (paper sec. 3.3, SPEC section 3).

    Steps t_n > ... > t_1 come from :func:`uniform_timesteps`; each step samples x_s ~ p(x_s | x_t) with
    s the next step (or -1 = x0 after the last one) through the exact skip-step posterior.

    Returns:
        [B, N] long tokens in [0, K).
    """
    options.validate(schedule.num_timesteps)
    steps = uniform_timesteps(schedule.num_timesteps, options.num_inference_steps)
    x_t = torch.full((batch_size, num_tokens), schedule.mask_id, dtype=torch.long, device=device)
    for i, t in enumerate(tqdm(steps, desc="sampling", disable=not progress, leave=False)):
        s = steps[i + 1] if i + 1 < len(steps) else -1
        log_p_x0 = truncate_log_probs(predict(x_t, t), options.truncation_rate)
        if s == -1:  # the last step samples x0 itself: no [MASK] row needed
            x_t = sample_categorical(log_p_x0, generator)
        else:
            x_t = sample_categorical(posterior_log_probs(schedule, log_p_x0, x_t, t, s), generator)
    return x_t
