"""Checks of the pipeline's inputs and outputs that are not one component's own: the dtype a pipeline is
moved to, the text of prompts, an outpainting offset, the condition parts a denoiser needs, and the numerical
guards of a run (docs/design.md §6.11): NaN or infinite log-probabilities during sampling and NaN or infinite
pixels after decoding are an error that names the component at fault and the fix, never an image.

The guards cost nothing measurable: :func:`vqdiffusion.sampling.sample_tokens` keeps one small reduction per
model call on the device and syncs once per run, the decoded batch is checked once; the component is named by
:func:`log_probs_error` and :func:`decoder_error`, which run only after a check failed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch

from ..config import ConfigError
from ..models.conditions import CLIPTextCondition, ConditionKind, LearnedNullCondition
from ..models.denoiser import DenoiserConfig

# The dtypes a pipeline runs in (``dtype=`` of from_pretrained and ``to``); float16 runs the VQ decoder in
# float32 unless its config's force_upcast is false.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# How much of a long prompt an error message shows around the bad character.


class NonFiniteError(ValueError):
    """A component of the model produced NaN or infinite values: its weights are broken or absurdly large."""


def check_dtype(dtype: Any, name: str = "dtype") -> None:
    """ValueError unless ``dtype`` is None or one of :data:`FLOAT_DTYPES`."""
    if dtype is None or dtype in FLOAT_DTYPES:
        return
    allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name} must be a torch.dtype such as torch.float16 ({allowed}), got {dtype!r}")
    raise ValueError(f"{name}={dtype} is not a floating point dtype the pipeline runs in; use one of {allowed}")


def check_images_per_prompt(count: Any) -> None:
    """ValueError unless ``num_images_per_prompt`` is a positive integer."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {count!r}")


def check_offset(offset: Any) -> tuple[int, int]:
    """An outpainting offset as (x, y) integers: ValueError for anything else (1.5 is not rounded)."""
    if not isinstance(offset, list | tuple) or len(offset) != 2:
        raise ValueError(f"offset must be two integers (x, y) in pixels, got {offset!r}")
    bad = [v for v in offset if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if bad:
        hint = ""
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in offset):
            hint = f", e.g. offset=({round(offset[0])}, {round(offset[1])})"
        raise ValueError(
            f"offset must be two integers (x, y) in pixels, got {tuple(offset)!r}; give whole pixels{hint}"
        )
    return int(offset[0]), int(offset[1])


def largest_weight(module: torch.nn.Module | None) -> float:
    """The largest |value| among ``module``'s parameters and buffers (floating point), 0.0 for none."""
    if module is None:
        return 0.0
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return 0.0
    return max(float(t.detach().abs().max()) for t in tensors)


def _is_finite(x: Any) -> bool:
    """Whether every floating tensor of ``x`` (a tensor, None, or a condition dataclass of tensors such as
    aMUSEd's hidden states + pooled embedding + micro-conditions) is finite."""
    if x is None:
        return True
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if dataclasses.is_dataclass(x):
        return all(_is_finite(getattr(x, f.name)) for f in dataclasses.fields(x))
    return True


def _weights_note(module: torch.nn.Module | None) -> str:
    peak = largest_weight(module)
    return f"largest |weight| {peak:.3g}" if peak == peak and peak != float("inf") else "it holds NaN or inf"


def check_condition(cond: Any, text_encoder: torch.nn.Module | None) -> None:
    """NonFiniteError when the encoded prompts ``cond`` (float; class labels pass) hold NaN or inf."""
    if not _is_finite(cond):
        raise NonFiniteError(
            f"the text encoder's condition is NaN or infinite ({_weights_note(text_encoder)}), so any image would "
            "be garbage; its weights are broken or absurdly large: re-export the model's text encoder"
        )


@torch.no_grad()
def log_probs_error(
    pipe: Any,
    cond: torch.Tensor | None,
    null_cond: torch.Tensor | None,
    t: int,
    *,
    guidance_scale: float,
) -> NonFiniteError:
    """The error for a run whose log p(x0 | x_t) was NaN or infinite at step ``t``, naming the component: one
    model call each on all-[MASK] input with the condition and with the null condition tells whether the
    denoiser itself or the null condition of guidance is at fault (the condition was checked before the run:
    :func:`check_condition`)."""
    denoiser = pipe.denoiser
    cfg = denoiser.config
    x = torch.full((1, cfg.num_tokens), pipe.schedule.mask_id, dtype=torch.long, device=pipe.device)
    where = f"at step t={t}"
    retrain = "re-export or retrain the model"

    def finite_with(condition: torch.Tensor | None) -> bool | None:
        """Whether one call on ``condition``'s first row gives finite logits (None: the call did not run)."""
        try:
            out = denoiser(x, t, condition[:1] if condition is not None else None, return_logits=True)
        except (TypeError, ValueError, RuntimeError):  # a model kind with another signature: no diagnosis
            return None
        return _is_finite(out)

    if finite_with(cond) is False:
        return NonFiniteError(
            f"sampling stopped: the denoiser's log-probabilities are NaN or infinite {where} "
            f"({_weights_note(denoiser)}), so any image would be garbage; its weights are broken or absurdly "
            f"large: {retrain}"
        )
    if null_cond is not None and finite_with(null_cond) is False:
        null = pipe.null_condition if null_cond.is_floating_point() else None
        return NonFiniteError(
            f"sampling stopped: the null condition of classifier-free guidance gives NaN or infinite "
            f"log-probabilities {where} ({_weights_note(null) if null is not None else 'the null label'}); "
            f"{retrain}, or sample without guidance (guidance_scale=1)"
        )
    return NonFiniteError(
        f"sampling stopped: the denoiser's guided log-probabilities are NaN or infinite {where} (guidance scale "
        f"{guidance_scale:g}; {_weights_note(denoiser)}): its logits are too large to combine; {retrain}, or use a "
        "smaller guidance_scale"
    )


def encoder_error(vqvae: torch.nn.Module, dtype: torch.dtype) -> NonFiniteError:
    """The error for NaN or infinite latents out of the VQ-VAE encoder running in ``dtype`` (editing)."""
    half = " (float16 overflowed: run the VQ-VAE in float32, pipe.vqvae.float())" if dtype == torch.float16 else ""
    return NonFiniteError(
        f"the VQ-VAE encoder produced NaN or infinite latents for the image{half} ({_weights_note(vqvae)}), so its "
        "tokens would be garbage; its weights are broken or absurdly large: re-export or retrain the VQ-VAE"
    )


def decoder_error(vqvae: torch.nn.Module, dtype: torch.dtype) -> NonFiniteError:
    """The error for NaN or infinite pixels out of the VQ-VAE decoder running in ``dtype``."""
    if dtype == torch.float16:
        return NonFiniteError(
            "the VQ-VAE decoder produced NaN or infinite pixels in float16 (an activation above 65504); run it in "
            "float32: keep force_upcast true in the model's vqvae/config.json (the default) or call pipe.vqvae.float()"
        )
    return NonFiniteError(
        f"the VQ-VAE decoder produced NaN or infinite pixels ({_weights_note(vqvae)}), so the image would be "
        "garbage; its weights are broken or absurdly large: re-export or retrain the VQ-VAE"
    )


def check_condition_parts(
    config: DenoiserConfig,
    text_encoder: CLIPTextCondition | None,
    null_condition: LearnedNullCondition | None,
    null_class_label: int | None,
) -> None:
    """The components a denoiser's condition kind needs (text: a text encoder; class/none: neither)."""
    kind = config.condition_kind
    if kind == ConditionKind.TEXT and text_encoder is None:
        raise ConfigError(f"the denoiser is text-conditional (cond_dim={config.cond_dim}); give a text_encoder")
    if kind != ConditionKind.TEXT and (text_encoder is not None or null_condition is not None):
        raise ConfigError(
            f"the denoiser is {'class-conditional' if kind == 'class' else 'unconditional'}; "
            "it takes no text encoder or null text"
        )
    if null_class_label is not None:
        last = (config.num_class_labels or 0) - 1
        if kind != ConditionKind.CLASS or isinstance(null_class_label, bool) or null_class_label != last:
            raise ConfigError(
                f"null_class_label={null_class_label!r} must be the last label row ({last}) of a class-conditional "
                "denoiser, or None"
            )
