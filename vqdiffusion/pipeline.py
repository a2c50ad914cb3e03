"""Text-to-image pipeline: condition encoder -> discrete diffusion over VQ tokens -> VQ decoder.

Reads our own layout (JSON configs + safetensors, :mod:`vqdiffusion.formats.ours`) and diffusers'
VQ-Diffusion layout (:mod:`vqdiffusion.formats.diffusers`), writes ours.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .config import ConfigError
from .devices import available_memory, format_bytes, resolve_device
from .diffusion import Generator, MaskReplaceSchedule
from .editing import (
    DEFAULT_KNOWN_TOKEN_MODE,
    KNOWN_TOKEN_MODES,
    KnownTokens,
    place_on_canvas,
    token_mask,
    variation_start,
    variation_start_step,
    variation_timesteps,
)
from .formats import diffusers as diffusers_format
from .formats import hub as hub_format
from .formats import ours as ours_format
from .formats.components import PipelineComponents
from .image_inputs import ImageInput, MaskInput, image_batch, mask_batch
from .models.conditions import CLIPTextCondition, ConditionKind, LearnedNullCondition
from .models.denoiser import Denoiser, DenoiserConfig
from .models.vqvae import VQVAE
from .samplers import Sampler, sampler_settings
from .sampling import SamplingOptions, guided_predictor, sample_tokens

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# Models shipped inside the package (``vqdiffusion/assets/<name>``), loadable as ``"builtin:<name>"``.
BUILTIN_MODELS = ("shapes",)
DEFAULT_MODEL = "builtin:shapes"
OutputType = Literal["pil", "np", "pt", "tokens"]


# An editing method's per-run hook: (image rows [b] long, options, the rows' generator) -> the extra keywords
# of sample_tokens for those rows (known tokens, start state, steps).
_EditRows = Callable[[torch.Tensor, SamplingOptions, Generator], dict[str, Any]]


# Per-model default sampling settings (``defaults.json``), used for every knob a call does not give.
PipelineDefaults = SamplingOptions


@dataclasses.dataclass
class PipelineOutput:
    """``images``: PIL list, float array [B, H, W, 3] or tensor [B, 3, H, W] in [0, 1], or None for
    ``output_type="tokens"``; ``tokens``: [B, h, w] long."""

    images: Any
    tokens: torch.Tensor


class VQDiffusionPipeline:
    """VQ-Diffusion text-to-image sampling (Gu et al. 2022; Tang et al. 2022).

    Components: ``vqvae`` (tokens <-> pixels), ``denoiser`` ((x_t, t, cond) -> log p(x0)), ``schedule``
    (the mask-and-replace process and its posterior), ``text_encoder`` (CLIP text condition) and
    ``null_condition`` (the learned null text for classifier-free guidance; None means the encoding of
    the empty prompt is used, as diffusers does for non-learnable models).

    Class-conditional models (the authors' ImageNet transformer) have no text encoder: their "prompts" are
    integer class labels, embedded inside the denoiser, and ``null_class_label`` (the last label row, if
    the model has one) is the unconditional input of guidance.  Unconditional models (FFHQ) have neither.
    """

    def __init__(
        self,
        *,
        vqvae: VQVAE,
        denoiser: Denoiser,
        schedule: MaskReplaceSchedule,
        text_encoder: CLIPTextCondition | None = None,
        null_condition: LearnedNullCondition | None = None,
        defaults: PipelineDefaults | None = None,
        null_class_label: int | None = None,
    ) -> None:
        cfg = denoiser.config
        if schedule.num_classes != cfg.num_classes:
            raise ConfigError(f"schedule has K={schedule.num_classes} but the denoiser has K={cfg.num_classes}")
        if schedule.num_timesteps != cfg.num_timesteps:
            raise ConfigError(
                f"schedule has T={schedule.num_timesteps} but the denoiser embeds {cfg.num_timesteps} steps"
            )
        if vqvae.config.num_embeddings != cfg.num_classes:
            raise ConfigError(
                f"VQ-VAE codebook has {vqvae.config.num_embeddings} entries but the denoiser has K={cfg.num_classes}"
            )
        _check_condition_parts(cfg, text_encoder, null_condition, null_class_label)
        if text_encoder is not None and text_encoder.hidden_size != cfg.cond_dim:
            raise ConfigError(f"text encoder width {text_encoder.hidden_size} != denoiser cond_dim {cfg.cond_dim}")
        if null_condition is not None and tuple(null_condition.embedding.shape) != (
            text_encoder.max_length,
            text_encoder.hidden_size,
        ):
            raise ConfigError(
                f"null condition has shape {tuple(null_condition.embedding.shape)}, expected "
                f"({text_encoder.max_length}, {text_encoder.hidden_size})"
            )
        self.vqvae = vqvae.eval()
        self.denoiser = denoiser.eval()
        self.schedule = schedule
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.null_condition = null_condition.eval() if null_condition is not None else None
        self.null_class_label = null_class_label
        # Without defaults: the library's, with at most T steps (a model of fewer steps gets all of its T).
        self.defaults = defaults or PipelineDefaults(
            num_inference_steps=min(PipelineDefaults.num_inference_steps, schedule.num_timesteps)
        )
        try:
            self.defaults.validate(schedule.num_timesteps)
        except ValueError as err:
            raise ConfigError(f"the default sampling settings do not fit the model: {err}") from None

    # -- device and dtype -------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"vqvae": self.vqvae, "denoiser": self.denoiser}
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder
        if self.null_condition is not None:
            out["null_condition"] = self.null_condition
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VQDiffusionPipeline:
        """Move every component; ``dtype`` applies to the denoiser (bf16 sampling keeps log-probs in float32),
        the VQ decoder and the null condition; the text encoder stays in float32 on CPU for exactness
        unless the device is CUDA.  ``device`` is checked first (:func:`vqdiffusion.devices.resolve_device`:
        DeviceError, a ValueError, for a name this machine cannot run on; ``"auto"`` picks CUDA if present)."""
        if device is not None:
            device = resolve_device(device)
        for name, module in self.modules().items():
            target_dtype = dtype
            if name == "text_encoder" and dtype is not None and torch.device(device or self.device).type == "cpu":
                target_dtype = None
            module.to(device=device, dtype=target_dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # -- conditions -------------------------------------------------------------------------------------
    @property
    def condition_kind(self) -> ConditionKind:
        """The condition kind: "text", "class" (prompts are integer labels) or "none" (unconditional)."""
        return self.denoiser.config.condition_kind

    @property
    def num_class_labels(self) -> int | None:
        """Valid class labels of a class-conditional model, [0, n) (the null label excluded)."""
        labels = self.denoiser.config.num_class_labels
        if labels is None:
            return None
        return labels - (1 if self.null_class_label is not None else 0)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | list[int]) -> torch.Tensor:
        """CLIP text condition [B, L, D] (final layer norm output, L2-normalised per position); for a
        class-conditional model, the integer labels as a [B] long tensor."""
        kind = self.condition_kind
        if kind == ConditionKind.CLASS:
            n = self.num_class_labels
            bad = [p for p in prompts if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n]
            if bad:
                raise ValueError(
                    f"this model is class-conditional: prompts must be class labels in [0, {n}), got {bad[:3]}"
                )
            return torch.tensor(list(prompts), dtype=torch.long, device=self.device)
        if kind == ConditionKind.NONE:
            raise ValueError("this model is unconditional: it takes no prompt (sample with cond=None)")
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    @torch.no_grad()
    def null_embeddings(self, batch_size: int) -> torch.Tensor:
        """The unconditional input for guidance [B, L, D]: the learned null text, else the empty prompt;
        for a class-conditional model, the null label [B] (an error if the model has none)."""
        if self.condition_kind == ConditionKind.CLASS:
            if self.null_class_label is None:
                raise ValueError("this class-conditional model has no null class; use guidance_scale=1")
            return torch.full((batch_size,), self.null_class_label, dtype=torch.long, device=self.device)
        if self.null_condition is not None:
            return self.null_condition(batch_size).to(self.device, self.dtype)
        return self.text_encoder.encode_unconditional(batch_size).to(self.device, self.dtype)

    # -- sampling ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | list[int] | None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        truncation_rate: float | None = None,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: OutputType = "pil",
        progress: bool = True,
        *,
        sampler: str | Sampler | None = None,
        spacing: str | None = None,
        temperature: float | None = None,
        batch_size: int | None = None,
        callback: Callable[[int, int], None] | None = None,
        **sampler_settings: Any,
    ) -> PipelineOutput:
        """Generate images for ``prompt``: one string or a list (text models), a list of class labels
        (class-conditional models), or None (unconditional models: ``num_images_per_prompt`` images).

        Every sampling knob left at None takes the model's default (``self.defaults``); see
        :class:`~vqdiffusion.sampling.SamplingOptions` for their meaning.

        Args:
            num_inference_steps: 1..T steps (exact skip-step posterior below T).
            guidance_scale: classifier-free guidance scale; 1.0 costs one forward pass per step.
            truncation_rate: keep the most likely classes up to this mass, in (0, 1].
            sampler: a strategy object (``Purity(prior_weight=1.0)``, :mod:`vqdiffusion.samplers`) or the
                name of one in the registry :data:`vqdiffusion.samplers.SAMPLERS`.
            sampler_settings: the chosen strategy's own settings as flat keywords, e.g.
                ``sampler="purity", prior_weight=1.0`` or ``tokens_per_call=8`` (see its class).
            spacing: "uniform" or "quadratic" step indices.
            temperature: temperature of p(x0 | x_t).
            num_images_per_prompt: images per prompt (prompt-major order).
            generator: a ``torch.Generator`` (or one per image) for reproducible sampling.
            output_type: "pil", "np" ([B, H, W, 3] float in [0, 1]), "pt" ([B, 3, H, W] in [0, 1]) or
                "tokens" (no decoding).
            progress: show a progress bar.
            batch_size: images per reverse-chain run (None: all at once, or as many as fit in the device's
                free memory; see :meth:`plan_batches`).  With one ``generator`` the samples depend on it; with
                a list of generators, one per image, they do not.
            callback: called as ``callback(done, total)`` after each sampling step, counted over all batches
                of the call (``total`` = steps x batches), e.g. to drive a progress bar of a user interface.
        """
        given = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "truncation_rate": truncation_rate,
            "sampler": sampler,
            "spacing": spacing,
            "temperature": temperature,
            **sampler_settings,
        }
        return self._generate(
            prompt, given, num_images_per_prompt, generator, output_type, progress, batch_size, callback
        )

    def _generate(
        self,
        prompt: str | list[str] | list[int] | None,
        given: dict[str, Any],
        num_images_per_prompt: int,
        generator: Generator,
        output_type: OutputType,
        progress: bool,
        batch_size: int | None,
        callback: Callable[[int, int], None] | None,
        edit: _EditRows | None = None,
    ) -> PipelineOutput:
        """:meth:`__call__` with the sampling knobs as ``given`` (None = the model's default) and, for the
        editing methods, ``edit(rows, options, generator)``: the extra :func:`sample_tokens` keywords (known
        tokens, start state, steps) of the image rows ``rows`` ([b] long) of one chain run."""
        guidance_scale = given.get("guidance_scale")
        unconditional = self.condition_kind == ConditionKind.NONE
        if unconditional:
            if prompt is not None:
                raise ValueError("this model is unconditional: pass prompt=None and num_images_per_prompt")
            if guidance_scale not in (None, 1.0):
                raise ValueError(f"an unconditional model has no guidance; got guidance_scale={guidance_scale}")
            given = {**given, "guidance_scale": 1.0}
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not unconditional and (not isinstance(prompts, list) or not prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of strings")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or (num_images_per_prompt < 1)
        ):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np", "pt", "tokens"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'tokens', got {output_type!r}")
        options = self.sampling_options(**given)

        batch = num_images_per_prompt * (1 if unconditional else len(prompts))
        chunks = self.plan_batches(batch, output_type, options.uses_guidance, batch_size)
        encoded = None if unconditional else self.encode_prompt(prompts)  # [P, ...]: one row per prompt
        per_image = isinstance(generator, (list, tuple))
        cfg = self.denoiser.config
        token_parts, image_parts = [], []
        for chunk_index, (start, stop) in enumerate(chunks):
            n = stop - start
            cond = None
            if encoded is not None:  # prompt-major: row r is prompt r // num_images_per_prompt
                cond = encoded[torch.arange(start, stop, device=encoded.device) // num_images_per_prompt]
            null_cond = self.null_embeddings(n) if options.uses_guidance else None
            predict = guided_predictor(self.denoiser, cond, null_cond, options.guidance_scale)
            rows_generator = generator[start:stop] if per_image else generator
            extra = {} if edit is None else edit(torch.arange(start, stop), options, rows_generator)
            tokens = sample_tokens(
                predict,
                self.schedule,
                n,
                cfg.height * cfg.width,
                options,
                generator=rows_generator,
                device=self.device,
                progress=progress,
                callback=_batch_callback(callback, chunk_index, len(chunks)),
                token_shape=(cfg.height, cfg.width),
                **extra,
            ).view(n, cfg.height, cfg.width)
            token_parts.append(tokens)
            if output_type != "tokens":
                image_parts.append(to_output_type(self.decode(tokens), output_type))
        tokens = token_parts[0] if len(token_parts) == 1 else torch.cat(token_parts)
        if output_type == "tokens":
            return PipelineOutput(images=None, tokens=tokens)
        return PipelineOutput(images=_join(image_parts, output_type), tokens=tokens)

    # -- editing (docs/design.md §10) ----------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the model's images."""
        cfg, factor = self.denoiser.config, self.vqvae.config.downsample_factor
        return cfg.width * factor, cfg.height * factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The VQ encoder's tokens of ``images`` [B, 3, H, W] in [0, 1] -> [B, h, w] long."""
        vq_dtype = next(self.vqvae.parameters()).dtype
        return self.vqvae.encode(images.to(self.device, vq_dtype) * 2 - 1)

    @torch.inference_mode()
    def inpaint(
        self,
        prompt: str | list[str] | list[int] | None,
        image: ImageInput,
        mask: MaskInput,
        *,
        known_tokens: str = DEFAULT_KNOWN_TOKEN_MODE,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: OutputType = "pil",
        progress: bool = True,
        batch_size: int | None = None,
        callback: Callable[[int, int], None] | None = None,
        **sampling: Any,
    ) -> PipelineOutput:
        """Regenerate the masked part of ``image`` for ``prompt`` (docs/design.md §10.1).

        Args:
            image: the image to edit at the model's size (:mod:`vqdiffusion.image_inputs`), one for all
                prompts or one per prompt.
            mask: white / True = regenerate, same size, one or one per prompt.  A token is regenerated when
                its f x f pixel patch holds a masked pixel; every other token of the output is the image's
                token, unchanged (the decoder's overlap still changes the pixels next to the mask a little).
            known_tokens: what the model sees at the kept positions: ``"renoise"`` (q(x_t | x0) drawn before
                every call, like training inputs) or ``"clean"`` (the tokens themselves).
            sampling: any sampling keyword of :meth:`__call__` (``num_inference_steps``, ``guidance_scale``,
                ``truncation_rate``, ``sampler``, ...); the other arguments are those of :meth:`__call__`.
        """
        size, factor = self.image_size, self.vqvae.config.downsample_factor
        images = image_batch(image, size)
        regenerate = token_mask(mask_batch(mask, size), factor).flatten(1)  # [M, N]
        count = regenerate.sum(1)
        if bool((count == 0).any()):
            raise ValueError("the mask is empty: paint (white) the part of the image to regenerate")
        if bool((count == regenerate.shape[1]).any()):
            raise ValueError(
                "the mask covers every token, so nothing of the image is kept; use plain generation (pipe(prompt)) "
                "or a variation (pipe.variation)"
            )
        if known_tokens not in KNOWN_TOKEN_MODES:  # before anything is encoded or sampled
            raise ValueError(f"known_tokens must be one of {list(KNOWN_TOKEN_MODES)}, got {known_tokens!r}")
        x0 = self.encode_images(images).flatten(1)  # [I, N] on the device
        regenerate = regenerate.to(x0.device)
        prompts = self._edit_prompts(prompt, (("image", len(x0)), ("mask", len(regenerate))))
        x0, regenerate = _per_prompt(x0, len(prompts)), _per_prompt(regenerate, len(prompts))
        n = num_images_per_prompt

        def edit(rows: torch.Tensor, options: SamplingOptions, rows_generator: Generator) -> dict[str, Any]:
            row_prompt = rows.to(x0.device) // n
            return {"known": KnownTokens(x0[row_prompt], ~regenerate[row_prompt], known_tokens)}

        given = _sampling_given(sampling)
        options = self.sampling_options(**given)
        counts = regenerate.sum(1).tolist()
        if options.sampler.fills_fixed_count and len(set(counts)) > 1:
            # a counting sampler needs equal [MASK] counts per run: one run per mask size, rows put back in order
            groups = [[p for p, c in enumerate(counts) if c == value] for value in sorted(set(counts))]
            return self._edit_in_groups(
                prompts, groups, given, n, generator, output_type, progress, batch_size, callback, edit
            )
        return self._generate(
            self._as_prompt(prompt, prompts), given, n, generator, output_type, progress, batch_size, callback, edit
        )

    @torch.inference_mode()
    def outpaint(
        self,
        prompt: str | list[str] | list[int] | None,
        image: ImageInput,
        offset: tuple[int, int] = (0, 0),
        **kwargs: Any,
    ) -> PipelineOutput:
        """Extend or shift ``image`` within the model's canvas (docs/design.md §10.2): the image (any size) is
        placed with its top-left corner at ``offset`` = (x, y) pixels on a black canvas of the model's size,
        and the part it does not cover is inpainted.  ``kwargs`` are those of :meth:`inpaint`."""
        width, height = self.image_size
        parts = image if isinstance(image, list | tuple) else [image]
        canvases, masks = [], []
        for part in parts:
            pixels = image_batch(part, None, "image")
            for one in pixels:
                canvas, uncovered = place_on_canvas(one, (height, width), tuple(int(v) for v in offset))
                if not bool(uncovered.any()):
                    raise ValueError(
                        f"the image covers the whole {width}x{height} canvas at offset {tuple(offset)}: nothing to "
                        "outpaint; shift it (offset) or give a smaller image"
                    )
                canvases.append(canvas)
                masks.append(uncovered)
        return self.inpaint(prompt, torch.stack(canvases), torch.stack(masks), **kwargs)

    @torch.inference_mode()
    def variation(
        self,
        prompt: str | list[str] | list[int] | None,
        image: ImageInput,
        strength: float = 0.6,
        *,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: OutputType = "pil",
        progress: bool = True,
        batch_size: int | None = None,
        callback: Callable[[int, int], None] | None = None,
        **sampling: Any,
    ) -> PipelineOutput:
        """Image-to-image (docs/design.md §10.3): x_t ~ q(x_t | x0(image)) at the step t = ceil(strength T) - 1,
        then the reverse chain from there (the steps of a ``num_inference_steps`` run below t).  ``strength``
        in (0, 1]: near 0 the image comes back almost unchanged, 1 is plain generation from all-[MASK]
        (the same draws as :meth:`__call__`).  Other arguments as :meth:`inpaint`."""
        start_step = variation_start_step(strength, self.schedule.num_timesteps)
        x0 = self.encode_images(image_batch(image, self.image_size)).flatten(1)
        prompts = self._edit_prompts(prompt, (("image", len(x0)),))
        x0 = _per_prompt(x0, len(prompts))
        n = num_images_per_prompt

        def edit(rows: torch.Tensor, options: SamplingOptions, rows_generator: Generator) -> dict[str, Any]:
            if strength == 1:
                return {}
            row_prompt = rows.to(x0.device) // n
            steps = variation_timesteps(
                strength, self.schedule.num_timesteps, options.num_inference_steps, options.spacing
            )
            x_init = variation_start(
                self.schedule, x0[row_prompt], start_step, options.sampler.fills_fixed_count, rows_generator
            )
            return {"x_init": x_init, "timesteps": steps}

        given = _sampling_given(sampling)
        return self._generate(
            self._as_prompt(prompt, prompts), given, n, generator, output_type, progress, batch_size, callback, edit
        )

    def _edit_prompts(self, prompt: Any, inputs: tuple[tuple[str, int], ...]) -> list[Any]:
        """The prompt as a list (``[None]`` for an unconditional model), with each input's count checked: one,
        or one per prompt."""
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        for what, count in inputs:
            if count not in (1, len(prompts)):
                raise ValueError(
                    f"got {count} {what}s for {len(prompts)} prompt(s): give one {what} or one per prompt"
                )
        return prompts

    @staticmethod
    def _as_prompt(prompt: Any, prompts: list[Any]) -> Any:
        return prompt if isinstance(prompt, str) or prompt is None else prompts

    def _edit_in_groups(
        self,
        prompts: list[Any],
        groups: list[list[int]],
        given: dict[str, Any],
        n: int,
        generator: Generator,
        output_type: OutputType,
        progress: bool,
        batch_size: int | None,
        callback: Callable[[int, int], None] | None,
        edit: _EditRows,
    ) -> PipelineOutput:
        """:meth:`_generate` once per group of prompt indices, each group's rows mapped back to the whole
        call's rows (for ``edit`` and a list of generators), the outputs in the call's row order."""
        per_image = isinstance(generator, list | tuple)
        outputs, order = [], []
        for g, group in enumerate(groups):
            rows = [p * n + i for p in group for i in range(n)]
            index = torch.tensor(rows)

            def group_edit(
                rows: torch.Tensor, options: SamplingOptions, rows_generator: Generator, index: torch.Tensor = index
            ) -> dict[str, Any]:
                return edit(index[rows.cpu()], options, rows_generator)

            outputs.append(
                self._generate(
                    [prompts[p] for p in group],
                    given,
                    n,
                    [generator[r] for r in rows] if per_image else generator,
                    output_type,
                    progress,
                    batch_size,
                    _batch_callback(callback, g, len(groups)),
                    group_edit,
                )
            )
            order.extend(rows)
        back = torch.argsort(torch.tensor(order))
        tokens = torch.cat([o.tokens for o in outputs])[back]
        if output_type == "tokens":
            return PipelineOutput(images=None, tokens=tokens)
        images = _join([o.images for o in outputs], output_type)
        if output_type == "pil":
            return PipelineOutput(images=[images[i] for i in back.tolist()], tokens=tokens)
        return PipelineOutput(images=images[back.numpy() if output_type == "np" else back], tokens=tokens)

    def memory_per_image(self, output_type: OutputType = "pil", guidance: bool = True) -> tuple[int, int]:
        """Rough upper estimates, in bytes per image: (working memory of one reverse-chain run and its decoding,
        the results kept until the call returns).

        Working memory counts the [K+1, N] float32 tensors of one step (log-probabilities, posterior, noise),
        the denoiser's activations (twice with guidance: the null condition runs in the same batch) and the
        VQ decoder's full-resolution activations; results are the tokens plus the images of ``output_type``.
        """
        cfg, vq = self.denoiser.config, self.vqvae.config
        n = cfg.height * cfg.width
        context = self.text_encoder.max_length if self.text_encoder is not None else 1
        passes = 2 if guidance else 1
        width = max(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        denoiser = passes * (
            8 * n * cfg.dim + 2 * n * width + 2 * cfg.num_heads * n * (n + context) + n * cfg.num_classes
        )
        side_h, side_w = cfg.height * vq.downsample_factor, cfg.width * vq.downsample_factor
        decoder = 6 * max(vq.block_out_channels) * side_h * side_w
        working = 4 * (8 * (cfg.num_classes + 1) * n + denoiser + decoder)
        pixels = 3 * side_h * side_w
        result = 8 * n + {"pil": pixels, "np": 4 * pixels, "pt": 4 * pixels, "tokens": 0}[output_type]
        return working, result

    def plan_batches(
        self, total: int, output_type: OutputType = "pil", guidance: bool = True, batch_size: int | None = None
    ) -> list[tuple[int, int]]:
        """The (start, stop) image ranges that one call samples in turn: ``batch_size`` images per reverse-chain
        run, or (None) all at once when they fit in the device's free memory, else as many as fit.

        Raises ValueError (nothing is computed) when the results of ``total`` images alone, or one image's
        working memory, would exceed the memory available (estimates of :meth:`memory_per_image`).
        """
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        working, result = self.memory_per_image(output_type, guidance)
        free = available_memory(self.device)
        chunk = batch_size or total
        if free is not None:
            if total * result > 0.8 * free:
                raise ValueError(
                    f"{total} images need about {format_bytes(total * result)} of memory for the results alone, "
                    f"but {format_bytes(free)} are available; ask for fewer images (--num-images, "
                    "num_images_per_prompt) per call"
                )
            budget = 0.7 * free - total * result
            fits = int(budget // working) if working > 0 else total
            if fits < 1:
                raise ValueError(
                    f"sampling one image needs about {format_bytes(working)} of working memory, but only "
                    f"{format_bytes(max(budget, 0))} of {format_bytes(free)} are left for it; use a machine with "
                    "more memory"
                )
            if fits < chunk:
                logger.info("sampling %d images in batches of %d (free memory: %s)", total, fits, format_bytes(free))
                chunk = fits
        return [(start, min(start + chunk, total)) for start in range(0, total, chunk)]

    def sampling_options(self, **overrides: Any) -> SamplingOptions:
        """The model's defaults with the non-None ``overrides`` applied (:meth:`SamplingOptions.with_values`),
        validated for this model.

        Choosing another sampler than the default keeps only the default's settings that the new sampler
        also has (a budget sampler's ``tokens_per_call``); the others start at their defaults.
        """
        options = self.defaults.with_values(**overrides)
        options.validate(self.schedule.num_timesteps)
        return options

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, h, w] tokens -> [B, 3, H, W] float32 images in [0, 1]."""
        return ((self.vqvae.decode_tokens(tokens).float() + 1) / 2).clamp(0, 1)

    # -- components and persistence -------------------------------------------------------------------
    @property
    def components(self) -> PipelineComponents:
        """The parts of this pipeline (what the model folder readers and writers exchange)."""
        return PipelineComponents(
            vqvae=self.vqvae,
            denoiser=self.denoiser,
            schedule=self.schedule,
            text_encoder=self.text_encoder,
            null_condition=self.null_condition,
            defaults=self.defaults,
            null_class_label=self.null_class_label,
        )

    @classmethod
    def from_components(cls, components: PipelineComponents) -> VQDiffusionPipeline:
        """A pipeline of ``components`` (checked to fit together)."""
        return cls(**{f.name: getattr(components, f.name) for f in dataclasses.fields(components)})

    def save_pretrained(self, path: str | os.PathLike, *, weights_dtype: torch.dtype | None = None) -> None:
        """Write our layout (:func:`vqdiffusion.formats.ours.save_ours`): ``vqdiffusion.json`` index, JSON
        configs and safetensors weights.

        ``weights_dtype`` (e.g. ``torch.float16``) stores the VQ-VAE, denoiser and null-condition floating
        point weights in that dtype (half the size); loading casts them back to the modules' dtype.  The
        text encoder is always stored as it is.
        """
        ours_format.save_ours(self.components, path, weights_dtype=weights_dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        text_pad_token_id: int | None | Literal["auto"] = "auto",
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> VQDiffusionPipeline:
        """Load a model directory: ours (``vqdiffusion.json``) or diffusers' (``model_index.json``), a
        model shipped with the package, ``"builtin:shapes"``, or a Hugging Face Hub id such as
        ``"microsoft/vq-diffusion-ithq"`` (see :func:`resolve_model_path`).

        Hub ids are downloaded into (or, with ``local_files_only`` or ``HF_HUB_OFFLINE=1``, only read from)
        the Hugging Face cache (``cache_dir``, default the user's), at ``revision`` (a branch, tag or commit;
        default ``"main"``; ``"fp16"`` is the published models' half-precision branch), fetching only the
        files the pipeline reads (:func:`vqdiffusion.formats.hub.download_model`).  ``torch_dtype`` is
        diffusers' name for ``dtype``.

        ``text_pad_token_id`` overrides the id that pads prompts after the end-of-text token ("auto":
        what the model was trained with; for a diffusers-layout directory that is the authors' 0, since the
        published models were trained with the authors' tokenizer, not diffusers' ``<|endoftext|>``
        padding; None: the tokenizer's own padding).
        """
        dtype = _one_dtype(dtype, torch_dtype)
        if device is not None:
            device = resolve_device(device)  # before anything is read
        root = resolve_model_path(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        if not root.exists():
            raise FileNotFoundError(f"model directory not found: {root}")
        if not root.is_dir():
            raise ValueError(f"{root} is a file, not a model directory")
        if (root / ours_format.INDEX_FILE).is_file():
            components = ours_format.load_ours(root, text_pad_token_id=text_pad_token_id)
        elif (root / diffusers_format.INDEX_FILE).is_file():
            components = diffusers_format.load_diffusers(root, text_pad_token_id=text_pad_token_id)
        else:
            raise ValueError(
                f"{root} is not a model directory: expected {ours_format.INDEX_FILE} (vqdiffusion layout) or "
                f"{diffusers_format.INDEX_FILE} (diffusers layout)"
            )
        pipe = cls.from_components(components)
        if device is not None or dtype is not None:
            pipe.to(device, dtype)
        return pipe


def resolve_model_path(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A model directory: a local folder as is, ``"builtin:<name>"`` mapped to the package's ``assets/<name>``
    folder, and a Hub id ``org/name`` (that is not an existing local path) to its snapshot folder in the
    Hugging Face cache, downloaded if needed (:func:`vqdiffusion.formats.hub.download_model`).

    ``revision``, ``cache_dir`` and ``local_files_only`` apply to Hub ids only (ValueError otherwise).
    """
    text = os.fspath(path)
    if hub_format.is_hub_id(text):
        return hub_format.download_model(
            text, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
    hub_only = {"revision": revision, "cache_dir": cache_dir}
    given = [name for name, value in hub_only.items() if value is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to Hugging Face Hub ids (org/name) only, not to the local model {text!r}"
        )
    if not text.startswith(BUILTIN_PREFIX):
        return Path(text)
    name = text[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {text!r}; built-in models: {known}")
    root = Path(__file__).resolve().parent / "assets" / name
    if not (root / ours_format.INDEX_FILE).is_file():
        raise FileNotFoundError(
            f"the built-in model {text!r} is missing from this installation ({root}); reinstall vqdiffusion "
            "or rebuild it with scripts/train_default.sh"
        )
    return root


def _sampling_given(sampling: dict[str, Any]) -> dict[str, Any]:
    """The sampling keywords of an editing call, checked against :class:`SamplingOptions`' fields and the
    strategies' settings."""
    fields = [f.name for f in dataclasses.fields(SamplingOptions)] + list(sampler_settings())
    unknown = sorted(set(sampling) - set(fields))
    if unknown:
        raise ValueError(f"unknown sampling keyword(s) {unknown}; the sampling keywords are {fields}")
    return dict(sampling)


def _per_prompt(x: torch.Tensor, prompts: int) -> torch.Tensor:
    """Rows of ``x`` [1 or P, ...] for each of ``prompts`` prompts."""
    return x.expand(prompts, *x.shape[1:]) if len(x) == 1 else x


def _batch_callback(
    callback: Callable[[int, int], None] | None, index: int, batches: int
) -> Callable[[int, int], None] | None:
    """A per-batch step callback reporting to ``callback`` the steps done over all ``batches`` of a call."""
    if callback is None:
        return None

    def report(done: int, total: int) -> None:
        callback(index * total + done, batches * total)

    return report


def _one_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` or its diffusers spelling ``torch_dtype`` (ValueError if both are given and differ)."""
    for name, value in (("dtype", dtype), ("torch_dtype", torch_dtype)):
        if value is not None and not isinstance(value, torch.dtype):
            raise ValueError(f"{name} must be a torch.dtype such as torch.float16, got {value!r}")
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one of them (they are the same)")
    return dtype if dtype is not None else torch_dtype


def to_output_type(images: torch.Tensor, output_type: OutputType) -> Any:
    """[B, 3, H, W] float in [0, 1] -> the requested type."""
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def _join(parts: list[Any], output_type: OutputType) -> Any:
    """The per-batch outputs of one call as one output of ``output_type``."""
    if len(parts) == 1:
        return parts[0]
    if output_type == "pt":
        return torch.cat(parts)
    if output_type == "np":
        return np.concatenate(parts)
    return [image for part in parts for image in part]


# The largest grid written (PIL's decompression-bomb limit: image viewers and PIL itself open nothing larger).
MAX_GRID_PIXELS = 178_956_970


def grid_shape(count: int, columns: int | None = None) -> tuple[int, int]:
    """(columns, rows) of a grid of ``count`` images: ``columns`` or a square."""
    columns = columns or int(np.ceil(np.sqrt(count)))
    return columns, int(np.ceil(count / columns))


def check_grid_size(count: int, width: int, height: int, columns: int | None = None) -> None:
    """ValueError when a grid of ``count`` images of ``width`` x ``height`` exceeds :data:`MAX_GRID_PIXELS`."""
    cols, rows = grid_shape(count, columns)
    if cols * width * rows * height > MAX_GRID_PIXELS:
        raise ValueError(
            f"a grid of {count} images of {width} x {height} would be {cols * width} x {rows * height} pixels, more "
            f"than the {MAX_GRID_PIXELS} an image may have; write the images to a folder or make fewer"
        )


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste equally sized images into a grid, row-major (at most :data:`MAX_GRID_PIXELS` pixels)."""
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    check_grid_size(len(images), w, h, columns)
    columns, rows = grid_shape(len(images), columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def _check_condition_parts(
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
