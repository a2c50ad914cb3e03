"""The reverse-process sampling loop: step subset, learned-null guidance, temperature and truncation shared
by every run, and the sampling strategy (:mod:`vqdiffusion.samplers`) that runs the chain.

:class:`SamplingOptions` holds the shared settings and the strategy object; the math lives in
:mod:`vqdiffusion.diffusion` and :mod:`vqdiffusion.unmasking`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import ConfigBase, ConfigError, is_int, is_number, setting
from .diffusion import (
    SPACINGS,
    Generator,
    MaskReplaceSchedule,
    check_generators,
    check_timesteps,
    spaced_timesteps,
    temper_log_probs,
    truncate_log_probs,
)
from .editing import KnownTokens, keep_known, model_input
from .samplers import (
    MAX_CHOICE_TEMPERATURE,
    MAX_PRIOR_WEIGHT,
    SAMPLERS,
    Ancestral,
    Chain,
    Sampler,
    check_model_kind,
    make_sampler,
    sampler_settings,
)

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "MAX_CHOICE_TEMPERATURE",
    "MAX_GUIDANCE_SCALE",
    "MAX_PRIOR_WEIGHT",
    "MIN_TEMPERATURE",
    "SAMPLERS",
    "NonFiniteLogProbsError",
    "PredictFn",
    "SamplingOptions",
    "guided_predictor",
    "sample_tokens",
]

# The guidance scale of a model that does not say (SamplingOptions' default; the diffusers reader's for a
# learned null text, which diffusers' own pipeline also defaults to).
DEFAULT_GUIDANCE_SCALE = 5.0
# Bounds of the knobs that scale log-probabilities: beyond them the float32 (or bfloat16) arithmetic of the
# chain overflows or cancels and the samples are garbage (far below them they are already near-greedy).
MAX_GUIDANCE_SCALE = 1000.0
MIN_TEMPERATURE = 1e-3


@dataclasses.dataclass(frozen=True, init=False)
class SamplingOptions(ConfigBase):
    """Knobs of one sampling run (docs/design.md §6; Improved VQ-Diffusion sec. 3): the settings every
    strategy shares and the strategy itself.

    num_inference_steps: steps of the chain, 1..T; fewer than T use the exact skip-step posterior.
    guidance_scale: classifier-free guidance s (log p_u + s (log p_c - log p_u)); 1 disables it (one pass).
    truncation_rate: keep the most likely x0 classes up to this cumulative mass, in (0, 1]; 1 disables it.
    spacing: which step indices: ``"uniform"`` or ``"quadratic"`` (see :func:`spaced_timesteps`).
    temperature: tau of p(x0 | x_t)^(1 / tau), > 0; 1 leaves it unchanged.
    sampler: the strategy (:mod:`vqdiffusion.samplers`: :class:`~vqdiffusion.samplers.Ancestral`,
        :class:`~vqdiffusion.samplers.Uniform`, :class:`~vqdiffusion.samplers.Purity`, ...), which owns its
        own settings.

    The constructor also takes the flat spelling ``SamplingOptions(sampler="purity", prior_weight=1.0)``:
    a registered name and that strategy's settings as keywords (see
    :func:`~vqdiffusion.samplers.make_sampler`); :meth:`to_dict` writes that flat form (``defaults.json``).
    """

    num_inference_steps: int = setting(100, "sampling steps, 1..T", label="Steps", low=1, step=1)
    guidance_scale: float = setting(
        DEFAULT_GUIDANCE_SCALE,
        "classifier-free guidance scale (1 = off, one pass per step)",
        label="Guidance",
        low=0.0,
        high=MAX_GUIDANCE_SCALE,
        step=0.1,
        ui_high=20.0,
    )
    truncation_rate: float = setting(
        1.0, "truncation rate in (0, 1] (1 = off)", label="Truncation", low=0.01, high=1.0, step=0.01
    )
    spacing: str = setting("uniform", "step indices: uniform or quadratic", label="Spacing", choices=SPACINGS)
    temperature: float = setting(
        1.0, "temperature of p(x0 | x_t), > 0", label="Temperature", low=0.05, high=3.0, step=0.05
    )
    # the choices are the registry itself, so the CLI and the demo offer every registered strategy
    sampler: Sampler = setting(Ancestral(), "the sampling strategy", label="Sampler", choices=SAMPLERS)

    def __init__(
        self,
        num_inference_steps: int = 100,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        truncation_rate: float = 1.0,
        spacing: str = "uniform",
        temperature: float = 1.0,
        sampler: str | Sampler = Ancestral(),  # noqa: B008 (a frozen strategy: immutable)
        **sampler_values: Any,
    ) -> None:
        shared = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "truncation_rate": truncation_rate,
            "spacing": spacing,
            "temperature": temperature,
        }
        for name, value in shared.items():
            object.__setattr__(self, name, value)
        self._check_shared()
        object.__setattr__(self, "sampler", make_sampler(sampler, **sampler_values))

    def _check_shared(self) -> None:
        """The checks of the shared settings that do not depend on the model (see :meth:`validate` for the
        step count's upper bound).

        Every message starts with ``"<field> must ..."``, so a caller can name its own spelling of the field.
        """
        steps = self.num_inference_steps
        if not is_int(steps) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
        scale = self.guidance_scale
        if not is_number(scale) or not 0 <= scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"guidance_scale must be a number in [0, {MAX_GUIDANCE_SCALE:g}] (typically 1 to 10), got {scale!r}"
            )
        rate = self.truncation_rate
        if not is_number(rate) or not 0.0 < rate <= 1.0:
            raise ValueError(f"truncation_rate must be in (0, 1], got {rate!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {list(SPACINGS)}, got {self.spacing!r}")
        tau = self.temperature
        if not is_number(tau) or not math.isfinite(tau) or not tau >= MIN_TEMPERATURE:
            raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (1 = off), got {tau!r}")

    def validate(self, num_timesteps: int) -> None:
        """The checks that need the model's T (the fields themselves were checked on construction)."""
        steps = self.num_inference_steps
        if not steps <= num_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in [1, {num_timesteps}], got {steps!r}")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0

    def with_values(self, **values: Any) -> SamplingOptions:
        """These options with the non-None ``values`` (shared settings, ``sampler`` as a name or strategy,
        and flat strategy settings) applied.  Another sampler keeps the settings of the current one that it
        also has (``tokens_per_call`` from ``purity`` to ``uniform``) and starts the others at their defaults."""
        given = {k: v for k, v in values.items() if v is not None}
        shared = {f.name: given.pop(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)}
        chosen = shared.pop("sampler")
        if isinstance(chosen, str) and chosen == self.sampler.name:
            chosen = self.sampler
        strategy = make_sampler(chosen, base=self.sampler, **given)
        return SamplingOptions(**shared, sampler=strategy)

    def to_dict(self) -> dict[str, Any]:
        """The flat form: the shared settings, ``"sampler"`` (the name) and the strategy's own settings."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sampler"}
        return {**shared, **self.sampler.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingOptions:
        """Read the flat form (also the files that list every strategy's settings at their defaults)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} | set(sampler_settings())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)


class NonFiniteLogProbsError(ValueError):
    """The model's log p(x0 | x_t) held NaN or infinite values; ``t`` is the first step index at which it did."""

    def __init__(self, message: str, t: int) -> None:
        super().__init__(message)
        self.t = t


class FiniteWatch:
    """The numerical guard of a sampling run: :meth:`add` keeps, per model call, one number on the device
    (the sum over positions of the largest log-probability, NaN or infinite iff some position's
    log-probabilities are NaN, +inf or all -inf), and :meth:`check` looks at all of them with one host sync
    at the end of the run, so the loop never waits on it."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.sums: list[torch.Tensor] = []

    def add(self, log_p: torch.Tensor, t: int) -> torch.Tensor:
        self.steps.append(t)
        self.sums.append(log_p.amax(dim=1).sum(dtype=torch.float32))
        return log_p

    def check(self, non_finite: Callable[[int], Exception] | None = None) -> None:
        """NonFiniteLogProbsError naming the first step whose log-probabilities were not finite, or
        ``non_finite(t)`` (the caller's error naming the component at fault) when given."""
        if not self.sums:
            return
        finite = torch.isfinite(torch.stack(self.sums))
        if bool(finite.all()):
            return
        t = self.steps[int((~finite).nonzero()[0, 0])]
        if non_finite is not None:
            raise non_finite(t)
        raise NonFiniteLogProbsError(
            f"the model's log p(x0 | x_t) is NaN or infinite at step t={t}, so the samples would be garbage; its "
            "weights are broken or absurdly large: re-export or retrain the model",
            t,
        )


# (x_t [B, N] long, t int) -> log p(x0 | x_t) [B, K, N], guidance already combined
PredictFn = Callable[[torch.Tensor, int], torch.Tensor]


def guided_predictor(
    denoiser: torch.nn.Module,
    cond: torch.Tensor | None,
    null_cond: torch.Tensor | None,
    guidance_scale: float,
    normalize: bool = True,
) -> PredictFn:
    """A closure x_t, t -> log p(x0 | x_t) with the condition's cross-attention keys/values computed once.

    With guidance the conditional and null inputs run as one batch of 2B and are combined as
    :func:`~vqdiffusion.diffusion.guided_log_probs` (log_softmax((1 - s) * logits_u + s * logits_c));
    per-position constants cancel in the softmax, so the raw logits can be used directly (Improved
    VQ-Diffusion sec. 3.1), and since the denoiser's head is affine it combines its input instead
    (``Denoiser.forward(..., guidance_scale=s)``: the head runs on B rows, not 2B).
    ``normalize=False`` skips the final log_softmax (for a strategy that
    :attr:`~vqdiffusion.samplers.Sampler.reads_logits`): the same distribution, up to a per-position constant.
    """
    if guidance_scale != 1.0 and null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a null condition; pass null_cond or use 1.0")
    if guidance_scale == 1.0:
        cond_cache = denoiser.precompute_condition(cond) if cond is not None else None

        def predict(x_t: torch.Tensor, t: int) -> torch.Tensor:
            return denoiser(x_t, t, cond_cache=cond_cache, validate=False, return_logits=not normalize)

        return predict

    both_kv = denoiser.precompute_condition(torch.cat([null_cond, cond]))
    scale = float(guidance_scale)

    def predict_guided(x_t: torch.Tensor, t: int) -> torch.Tensor:
        # x_t is shared by the two condition groups (the first block's self-attention and queries run once);
        # the denoiser combines them before its affine head: [B, K, N]
        return denoiser(x_t, t, cond_cache=both_kv, validate=False, return_logits=not normalize, guidance_scale=scale)

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
    timesteps: Sequence[int] | None = None,
    callback: Callable[[int, int], None] | None = None,
    token_shape: tuple[int, int] | None = None,
    known: KnownTokens | None = None,
    x_init: torch.Tensor | None = None,
    time_agnostic: bool = False,
    non_finite: Callable[[int], Exception] | None = None,
) -> torch.Tensor:
    """Run the reverse chain from all-[MASK] (or ``x_init``) at step ``timesteps[0]`` down to x0 (paper
    sec. 3.3).

    Each model output goes through temperature and truncation; then ``options.sampler`` runs its loop
    (:meth:`vqdiffusion.samplers.Sampler.run`): the ancestral sampler draws x_s ~ p(x_s | x_t) with s the
    next step index (-1 = x0 after the last one) through the exact skip-step posterior, a budget sampler
    fills :func:`~vqdiffusion.diffusion.unmask_budget` masked positions per step, and so on.

    Args:
        timesteps: explicit strictly decreasing step indices (default: ``options.num_inference_steps``
            indices with ``options.spacing``, starting at T-1).  Anything but T-1 first is not the trained
            process; it exists to reproduce other samplers (e.g. diffusers' steps n-1..0).
        generator: one ``torch.Generator`` or a list with one per image (then each image's samples do not
            depend on the batch it is in).
        callback: called as ``callback(done, total)`` after each of the ``total`` steps (e.g. a progress bar
            of a user interface).
        token_shape: (h, w) of the token grid, h * w = ``num_tokens`` (``order="halton"`` needs it; None:
            a square grid).
        known: observed x0 tokens (inpainting, docs/design.md §10): they start and stay in the state, the
            chain fills only the other positions, and the model sees them as ``known.mode`` says.
        x_init: [B, N] long start state in [0, K] (a variation's x_t ~ q(x_t | x0)); default all [MASK].
            A strategy that fills a fixed count per step (``fills_fixed_count``) needs the same number of
            [MASK] positions in every row of the start and fills only those.
        time_agnostic: ``predict`` ignores t (a masked model such as aMUSEd): a strategy that
            ``needs_timestep`` is refused (ValueError naming the ones that apply).
        non_finite: ``t -> exception`` raised instead of :class:`NonFiniteLogProbsError` when the model's
            log-probabilities were NaN or infinite (the pipeline's names the component at fault).
    Returns:
        [B, N] long tokens in [0, K).
    Raises:
        NonFiniteLogProbsError: the model's log p(x0 | x_t) was NaN or infinite at some step (checked once,
            after the run: :class:`FiniteWatch`), unless ``non_finite`` gives another exception.
    """
    options.validate(schedule.num_timesteps)
    check_generators(generator, batch_size)
    if timesteps is None:
        steps = spaced_timesteps(schedule.num_timesteps, options.num_inference_steps, options.spacing)
    else:
        steps = [int(t) for t in timesteps]
    check_timesteps(schedule, steps)
    strategy = options.sampler
    check_model_kind(strategy, time_agnostic)
    x_t = _start_state(schedule, batch_size, num_tokens, device, known, x_init)
    if strategy.fills_fixed_count and _start_mask_count(x_t, schedule.mask_id, strategy) == 0:
        return x_t  # nothing to fill
    strategy.check_schedule(schedule)
    watch = FiniteWatch()

    def log_p_x0_at(x_t: torch.Tensor, t: int) -> torch.Tensor:
        log_p = watch.add(predict(model_input(x_t, known, schedule, t, generator), t), t)
        return truncate_log_probs(temper_log_probs(log_p, options.temperature), options.truncation_rate)

    chain = Chain(
        log_p_x0_at=log_p_x0_at,
        schedule=schedule,
        steps=steps,
        x_t=x_t,
        generator=generator,
        keep=lambda x: keep_known(x, known),
        free=num_tokens - (int(known.known[0].sum()) if known is not None and batch_size else 0),
        token_shape=token_shape,
        progress=progress,
        callback=callback,
    )
    tokens = strategy.run(chain)
    watch.check(non_finite)
    return tokens


def _start_state(
    schedule: MaskReplaceSchedule,
    batch_size: int,
    num_tokens: int,
    device: torch.device | str,
    known: KnownTokens | None,
    x_init: torch.Tensor | None,
) -> torch.Tensor:
    """The chain's first state [B, N]: ``x_init`` or all [MASK], with the known tokens in place."""
    shape = (batch_size, num_tokens)
    if x_init is None:
        x_t = torch.full(shape, schedule.mask_id, dtype=torch.long, device=device)
    else:
        if tuple(x_init.shape) != shape or x_init.dtype != torch.long:
            raise ValueError(f"x_init must be a [{batch_size}, {num_tokens}] long tensor, got {tuple(x_init.shape)}")
        if x_init.numel() and bool(((x_init < 0) | (x_init > schedule.mask_id)).any()):
            raise ValueError(f"x_init must hold tokens in [0, {schedule.mask_id}] ({schedule.mask_id} = [MASK])")
        x_t = x_init.to(device)
    if known is not None:
        if tuple(known.tokens.shape) != shape:
            raise ValueError(f"known tokens must be [{batch_size}, {num_tokens}], got {tuple(known.tokens.shape)}")
        x_t = keep_known(x_t, known)
    return x_t


def _start_mask_count(x_t: torch.Tensor, mask_id: int, strategy: Sampler) -> int:
    """The [MASK] count of every row of the start, for a strategy that fills a fixed count per step."""
    counts = sorted(set((x_t == mask_id).sum(1).tolist()))
    if len(counts) > 1:
        raise ValueError(
            f"sampler={strategy.name!r} fills a fixed number of [MASK] positions per step, so every row must start "
            f"with the same number of them; got {counts[:4]}: sample rows with different masks separately"
        )
    return counts[0] if counts else 0
