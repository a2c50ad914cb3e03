"""The reverse-process sampling loop: step subset, learned-null guidance, temperature, truncation and the
ancestral, high-quality (purity prior), confidence, remasking or first-hitting sampler combined.

Each option is a typed field of :class:`SamplingOptions`; the math lives in :mod:`vqdiffusion.diffusion`
and :mod:`vqdiffusion.unmasking`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .config import ConfigBase
from .diffusion import (
    PRIOR_RULES,
    SPACINGS,
    Generator,
    MaskReplaceSchedule,
    guided_log_probs,
    posterior_log_probs,
    prior_unmask_step,
    sample_categorical,
    spaced_timesteps,
    temper_log_probs,
    truncate_log_probs,
    unmask_budget,
)
from .editing import COUNTING_SAMPLERS, KnownTokens, keep_known, model_input
from .unmasking import (
    MASKING_SCHEDULES,
    ORDERS,
    REMASK_SCHEDULES,
    confidence_masked_counts,
    confidence_unmask_step,
    fill_positions,
    first_hitting_steps,
    halton_ranks,
    nearest_step,
    ordered_unmask_step,
    remask_sigma,
    remask_step,
    require_mask_only,
)

SAMPLERS = ("ancestral", *PRIOR_RULES, "confidence", "remdm", "first_hitting")
# The sampler-specific fields and the samplers that use them; any other sampler needs the field's default.
SAMPLER_FIELDS: dict[str, tuple[str, ...]] = {
    "prior_weight": ("purity",),
    "tokens_per_call": PRIOR_RULES,
    "order": ("uniform",),
    "masking_schedule": ("confidence",),
    "choice_temperature": ("confidence",),
    "remask_schedule": ("remdm",),
    "remask_eta": ("remdm",),
}
MAX_CHOICE_TEMPERATURE = 1000.0
# The guidance scale of a model that does not say (SamplingOptions' default; the diffusers reader's for a
# learned null text, which diffusers' own pipeline also defaults to).
DEFAULT_GUIDANCE_SCALE = 5.0
# Bounds of the knobs that scale log-probabilities: beyond them the float32 (or bfloat16) arithmetic of the
# chain overflows or cancels and the samples are garbage (far below them they are already near-greedy).
MAX_GUIDANCE_SCALE = 1000.0
MAX_PRIOR_WEIGHT = 1000.0
MIN_TEMPERATURE = 1e-3


@dataclasses.dataclass(frozen=True)
class SamplingOptions(ConfigBase):
    """Knobs of one sampling run (docs/design.md §6; Improved VQ-Diffusion sec. 3).

    num_inference_steps: steps of the chain, 1..T; fewer than T use the exact skip-step posterior.
    spacing: which step indices: ``"uniform"`` or ``"quadratic"`` (see :func:`spaced_timesteps`).
    guidance_scale: classifier-free guidance s (log p_u + s (log p_c - log p_u)); 1 disables it (one pass).
    truncation_rate: keep the most likely x0 classes up to this cumulative mass, in (0, 1]; 1 disables it.
    temperature: tau of p(x0 | x_t)^(1 / tau), > 0; 1 leaves it unchanged.
    sampler: ``"ancestral"`` (x_s ~ p(x_s | x_t), every position independently) or high-quality inference
        with a fixed unmasking budget per step (:func:`unmask_budget`), the positions drawn uniformly
        (``"uniform"``, the authors' prior_rule 1) or by purity (``"purity"``, prior_rule 2).  Those two keep
        tokens once unmasked (exact for mask-only schedules such as the reference one).
    prior_weight: r of ``sampler="purity"``: candidates come from softmax((1 + r * purity) log p(x0 | x_t)).
    tokens_per_call: with a budget sampler, fill at most this many positions per model evaluation (the
        authors' "more steps for higher quality", prior_ps); None = one evaluation per step.
    order: ``sampler="uniform"`` only: which masked positions a step fills, ``"random"`` (uniformly without
        replacement) or ``"halton"`` (the next ones of a randomly shifted 2-D Halton order of the grid).
    sampler ``"confidence"``: MaskGIT / aMUSEd confidence sampling (not the trained chain): every step draws
        candidates at all masked positions and keeps those of highest Gumbel-perturbed confidence, leaving
        N gamma((i + 1) / n) masked; ``masking_schedule`` gamma is ``"cosine"`` or ``"linear"``,
        ``choice_temperature`` the Gumbel scale at the start, annealed linearly to 0.
    sampler ``"remdm"``: ReMDM remasking (mask-only schedules): each step also re-masks real tokens with
        probability sigma_t, ``remask_schedule`` ``"cap"`` (min(eta, sigma_max)) or ``"rescale"``
        (eta * sigma_max), eta = ``remask_eta`` in [0, 1].
    sampler ``"first_hitting"``: the ancestral chain of a mask-only schedule, exactly, with every token's
        unmasking step drawn first and the model called only at steps where some token unmasks.
    """

    num_inference_steps: int = 100
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    truncation_rate: float = 1.0
    spacing: str = "uniform"
    temperature: float = 1.0
    sampler: str = "ancestral"
    prior_weight: float = 0.0
    tokens_per_call: int | None = None
    order: str = "random"
    masking_schedule: str = "cosine"
    choice_temperature: float = 4.5
    remask_schedule: str = "cap"
    remask_eta: float = 0.04

    def __post_init__(self) -> None:
        """The checks that do not depend on the model (see :meth:`validate` for the step count's upper bound).

        Every message starts with ``"<field> must ..."``, so a caller can name its own spelling of the field.
        """
        steps = self.num_inference_steps
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
        scale = self.guidance_scale
        if not _is_number(scale) or not 0 <= scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"guidance_scale must be a number in [0, {MAX_GUIDANCE_SCALE:g}] (typically 1 to 10), got {scale!r}"
            )
        rate = self.truncation_rate
        if not _is_number(rate) or not 0.0 < rate <= 1.0:
            raise ValueError(f"truncation_rate must be in (0, 1], got {rate!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {list(SPACINGS)}, got {self.spacing!r}")
        tau = self.temperature
        if not _is_number(tau) or not math.isfinite(tau) or not tau >= MIN_TEMPERATURE:
            raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (1 = off), got {tau!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        weight = self.prior_weight
        if not _is_number(weight) or not 0 <= weight <= MAX_PRIOR_WEIGHT:
            raise ValueError(f"prior_weight must be a number in [0, {MAX_PRIOR_WEIGHT:g}], got {weight!r}")
        if weight != 0 and self.sampler != "purity":
            raise ValueError(
                f"prior_weight must be 0 unless sampler='purity' (it is r of the purity sampler); "
                f"got prior_weight={weight} with sampler={self.sampler!r}"
            )
        per_call = self.tokens_per_call
        if per_call is not None:
            if not _is_int(per_call) or per_call < 1:
                raise ValueError(f"tokens_per_call must be a positive integer or None, got {per_call!r}")
            if self.sampler not in PRIOR_RULES:
                raise ValueError(
                    f"tokens_per_call must be None with sampler={self.sampler!r} (it needs a budget sampler, "
                    f"'uniform' or 'purity'); got tokens_per_call={per_call}"
                )
        for field, choices in (
            ("order", ORDERS),
            ("masking_schedule", MASKING_SCHEDULES),
            ("remask_schedule", REMASK_SCHEDULES),
        ):
            if getattr(self, field) not in choices:
                raise ValueError(f"{field} must be one of {list(choices)}, got {getattr(self, field)!r}")
        noise = self.choice_temperature
        if not _is_number(noise) or not 0 <= noise <= MAX_CHOICE_TEMPERATURE:
            raise ValueError(f"choice_temperature must be a number in [0, {MAX_CHOICE_TEMPERATURE:g}], got {noise!r}")
        eta = self.remask_eta
        if not _is_number(eta) or not 0 <= eta <= 1:
            raise ValueError(f"remask_eta must be a number in [0, 1], got {eta!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for field, samplers in SAMPLER_FIELDS.items():
            if field in ("prior_weight", "tokens_per_call"):
                continue  # checked above, with their own messages
            value = getattr(self, field)
            if value != defaults[field] and self.sampler not in samplers:
                raise ValueError(
                    f"{field} must be {defaults[field]!r} unless sampler is one of {list(samplers)}; "
                    f"got {field}={value!r} with sampler={self.sampler!r}"
                )

    def validate(self, num_timesteps: int) -> None:
        """The checks that need the model's T (the fields themselves were checked on construction)."""
        steps = self.num_inference_steps
        if not steps <= num_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in [1, {num_timesteps}], got {steps!r}")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    :func:`~vqdiffusion.diffusion.guided_log_probs` (log_softmax((1 - s) * logits_u + s * logits_c));
    per-position constants cancel in the softmax, so the raw logits can be used directly (Improved
    VQ-Diffusion sec. 3.1).
    """
    if guidance_scale != 1.0 and null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs a null condition; pass null_cond or use 1.0")
    if guidance_scale == 1.0:
        cond_cache = denoiser.precompute_condition(cond) if cond is not None else None

        def predict(x_t: torch.Tensor, t: int) -> torch.Tensor:
            return denoiser(x_t, t, cond_cache=cond_cache, validate=False)

        return predict

    both_kv = denoiser.precompute_condition(torch.cat([null_cond, cond]))
    scale = float(guidance_scale)

    def predict_guided(x_t: torch.Tensor, t: int) -> torch.Tensor:
        # x_t is shared by the two condition groups (the first self-attention runs once): [2B, K, N]
        logits = denoiser(x_t, t, cond_cache=both_kv, validate=False, return_logits=True)
        logits_u, logits_c = logits.chunk(2)  # [B, K, N] each
        return guided_log_probs(logits_u, logits_c, scale)

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
) -> torch.Tensor:
    """Run the reverse chain from all-[MASK] (or ``x_init``) at step ``timesteps[0]`` down to x0 (paper
    sec. 3.3).

    Each model output goes through temperature and truncation; then the ancestral sampler draws
    x_s ~ p(x_s | x_t) with s the next step index (-1 = x0 after the last one) through the exact
    skip-step posterior, or a budget sampler fills :func:`unmask_budget` masked positions with
    :func:`prior_unmask_step` (steps with an empty budget cost no model call).

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
            The counting samplers (``uniform``, ``purity``, ``confidence``) need the same number of [MASK]
            positions in every row of the start and fill only those.
    Returns:
        [B, N] long tokens in [0, K).
    """
    options.validate(schedule.num_timesteps)
    if timesteps is None:
        steps = spaced_timesteps(schedule.num_timesteps, options.num_inference_steps, options.spacing)
    else:
        steps = [int(t) for t in timesteps]
    x_t = _start_state(schedule, batch_size, num_tokens, device, known, x_init)
    masked = _start_mask_count(x_t, schedule.mask_id, options.sampler)
    budgets = unmask_budget(schedule, steps, masked or num_tokens)  # also validates explicit indices
    if options.sampler == "ancestral":
        budgets = None
    if masked == 0:  # a counting sampler with nothing masked: nothing to fill
        return x_t

    def log_p_x0_at(x_t: torch.Tensor, t: int) -> torch.Tensor:
        log_p = temper_log_probs(predict(model_input(x_t, known, schedule, t, generator), t), options.temperature)
        return truncate_log_probs(log_p, options.truncation_rate)

    def keep(x: torch.Tensor) -> torch.Tensor:
        return keep_known(x, known)

    loop = _OTHER_LOOPS.get(options.sampler)
    if loop is not None:
        free = num_tokens - (int(known.known[0].sum()) if known is not None and batch_size else 0)
        return loop(log_p_x0_at, schedule, steps, x_t, options, generator, progress, callback, keep, free)
    rank = None
    if options.order == "halton":
        h, w = _grid_shape(num_tokens, token_shape)
        rank = halton_ranks(batch_size, h, w, generator, device)
    for i, t in enumerate(tqdm(steps, desc="sampling", disable=not progress, leave=False)):
        s = steps[i + 1] if i + 1 < len(steps) else -1
        if budgets is not None:
            for count in _split(budgets[i], options.tokens_per_call):
                if rank is not None:
                    x_t = ordered_unmask_step(log_p_x0_at(x_t, t), x_t, count, rank, generator)
                    continue
                x_t = prior_unmask_step(
                    log_p_x0_at(x_t, t),
                    x_t,
                    count,
                    rule=options.sampler,
                    prior_weight=options.prior_weight,
                    generator=generator,
                )
        elif s == -1:  # the last step samples x0 itself: no [MASK] row needed
            x_t = keep(sample_categorical(log_p_x0_at(x_t, t), generator))
        else:
            x_t = keep(sample_categorical(posterior_log_probs(schedule, log_p_x0_at(x_t, t), x_t, t, s), generator))
        if callback is not None:
            callback(i + 1, len(steps))
    return x_t


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


def _start_mask_count(x_t: torch.Tensor, mask_id: int, sampler: str) -> int | None:
    """The [MASK] count of every row of the start, for the counting samplers (None for the others)."""
    if sampler not in COUNTING_SAMPLERS:
        return None
    counts = sorted(set((x_t == mask_id).sum(1).tolist()))
    if len(counts) > 1:
        raise ValueError(
            f"sampler={sampler!r} fills a fixed number of [MASK] positions per step, so every row must start with "
            f"the same number of them; got {counts[:4]}: sample rows with different masks separately"
        )
    return counts[0] if counts else 0


def _split(total: int, chunk: int | None) -> list[int]:
    """``total`` as near-equal parts of at most ``chunk`` (one part when ``chunk`` is None; none for 0)."""
    if total == 0:
        return []
    parts = 1 if chunk is None else -(-total // chunk)
    return [total // parts + (1 if j < total % parts else 0) for j in range(parts)]


def _grid_shape(num_tokens: int, token_shape: tuple[int, int] | None) -> tuple[int, int]:
    if token_shape is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"order='halton' needs the token grid: pass token_shape=(h, w) ({num_tokens} tokens is not square)"
            )
        return side, side
    h, w = (int(v) for v in token_shape)
    if h * w != num_tokens:
        raise ValueError(f"token_shape {tuple(token_shape)} does not hold {num_tokens} tokens")
    return h, w


LogProbFn = Callable[[torch.Tensor, int], torch.Tensor]


def _confidence_loop(
    log_p_x0_at: LogProbFn,
    schedule: MaskReplaceSchedule,
    steps: list[int],
    x_t: torch.Tensor,
    options: SamplingOptions,
    generator: Generator,
    progress: bool,
    callback: Callable[[int, int], None] | None,
    keep: Callable[[torch.Tensor], torch.Tensor],
    free: int,
) -> torch.Tensor:
    """MaskGIT / aMUSEd sampling (:func:`~vqdiffusion.unmasking.confidence_unmask_step`) over len(steps)
    steps, starting from the (equal) [MASK] count of the rows; the model sees the step index whose gbar_t is
    nearest the masked fraction of the ``free`` (not known) positions."""
    num_steps = len(steps)
    masked = int((x_t[0] == schedule.mask_id).sum())
    counts = confidence_masked_counts(masked, num_steps, options.masking_schedule)
    for i, after in enumerate(tqdm(counts, desc="sampling", disable=not progress, leave=False)):
        if after < masked:  # (equal: nothing left to fill, more steps than tokens)
            noise = options.choice_temperature * (1.0 - (i + 1) / num_steps)  # annealed to 0
            t = nearest_step(schedule, masked / free)
            x_t = confidence_unmask_step(log_p_x0_at(x_t, t), x_t, after, noise, generator)
            masked = after
        if callback is not None:
            callback(i + 1, num_steps)
    return x_t


def _remdm_loop(
    log_p_x0_at: LogProbFn,
    schedule: MaskReplaceSchedule,
    steps: list[int],
    x_t: torch.Tensor,
    options: SamplingOptions,
    generator: Generator,
    progress: bool,
    callback: Callable[[int, int], None] | None,
    keep: Callable[[torch.Tensor], torch.Tensor],
    free: int,
) -> torch.Tensor:
    """The mask-only chain with ReMDM remasking (:func:`~vqdiffusion.unmasking.remask_step`) at every step."""
    require_mask_only(schedule, "remdm")
    for i, t in enumerate(tqdm(steps, desc="sampling", disable=not progress, leave=False)):
        s = steps[i + 1] if i + 1 < len(steps) else -1
        sigma = remask_sigma(schedule, t, s, options.remask_schedule, options.remask_eta)
        alpha_t, alpha_s = 1.0 - schedule.cumulative_at(t)[2], 1.0 - schedule.cumulative_at(s)[2]
        x_t = keep(remask_step(log_p_x0_at(x_t, t), x_t, alpha_t, alpha_s, sigma, generator))
        if callback is not None:
            callback(i + 1, len(steps))
    return x_t


def _first_hitting_loop(
    log_p_x0_at: LogProbFn,
    schedule: MaskReplaceSchedule,
    steps: list[int],
    x_t: torch.Tensor,
    options: SamplingOptions,
    generator: Generator,
    progress: bool,
    callback: Callable[[int, int], None] | None,
    keep: Callable[[torch.Tensor], torch.Tensor],
    free: int,
) -> torch.Tensor:
    """The ancestral chain of a mask-only schedule with the unmasking steps drawn first
    (:func:`~vqdiffusion.unmasking.first_hitting_steps`): one model call per distinct step at which a token
    of the batch unmasks, in chain order, plus the last step, where the ancestral sampler draws x0 ~
    p(x0 | x_t) at every position (docs/design.md §6.2); x_t does not change between those calls."""
    require_mask_only(schedule, "first_hitting")
    batch_size, num_tokens = x_t.shape
    hit = first_hitting_steps(schedule, steps, batch_size, num_tokens, generator, x_t.device)
    last = len(steps) - 1
    calls = sorted(set(hit[x_t == schedule.mask_id].tolist()) | {last})  # steps where a masked token unmasks
    for done, i in enumerate(tqdm(calls, desc="sampling", disable=not progress, leave=False), start=1):
        fill = (hit == i) & (x_t == schedule.mask_id) if i < last else torch.ones_like(hit, dtype=torch.bool)
        x_t = keep(fill_positions(log_p_x0_at(x_t, steps[i]), x_t, fill, generator))
        if callback is not None:
            callback(done, len(calls))
    return x_t


_OTHER_LOOPS = {"confidence": _confidence_loop, "remdm": _remdm_loop, "first_hitting": _first_hitting_loop}
