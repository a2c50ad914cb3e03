"""The editing methods of the pipeline (docs/design.md §10): inpainting, outpainting and variations, each a
run of the pipeline's generation with known tokens or a start state, and the regrouping of rows that a
sampler filling a fixed count per step needs (one run per mask size, the rows put back in order).

:class:`EditingMixin` reads of the pipeline only its components (``vqvae``, ``denoiser``, ``schedule``,
``device``), :meth:`call_options` and :meth:`_generate`; the math is in :mod:`vqdiffusion.editing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import torch

from ..diffusion import Generator, check_generators
from ..editing import (
    KNOWN_TOKEN_MODES,
    KnownTokens,
    place_on_canvas,
    token_mask,
    variation_start,
    variation_start_step,
    variation_timesteps,
)
from ..image_inputs import ImageInput, MaskInput, image_batch, mask_batch
from ..image_outputs import OutputType, join_outputs
from ..models.conditions import check_prompt_text
from ..samplers import sampler_settings
from ..sampling import SamplingOptions
from .checks import check_images_per_prompt, check_offset, encoder_error
from .output import PipelineOutput, batch_callback

# An editing method's per-run hook: (image rows [b] long, options, the rows' generator) -> the extra keywords
# of sample_tokens for those rows (known tokens, start state, steps).
EditRows = Callable[[torch.Tensor, SamplingOptions, Generator], dict[str, Any]]


class EditingMixin:
    """``inpaint``, ``outpaint`` and ``variation`` of :class:`~vqdiffusion.pipeline.VQDiffusionPipeline`."""

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the model's images."""
        cfg, factor = self.denoiser.config, self.vqvae.config.downsample_factor
        return cfg.width * factor, cfg.height * factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The VQ encoder's tokens of ``images`` [B, 3, H, W] in [0, 1] -> [B, h, w] long.

        Raises :class:`~vqdiffusion.pipeline.checks.NonFiniteError` (naming the VQ-VAE encoder) when its
        latents are NaN or infinite (one check of the batch)."""
        vq_dtype = next(self.vqvae.parameters()).dtype
        latents = self.vqvae.encode_latents(images.to(self.device, vq_dtype) * 2 - 1)
        if not bool(torch.isfinite(latents).all()):
            raise encoder_error(self.vqvae, latents.dtype)
        return self.vqvae.quantize(latents)[1]

    @torch.inference_mode()
    def inpaint(
        self,
        prompt: str | list[str] | list[int] | None,
        image: ImageInput,
        mask: MaskInput,
        *,
        known_tokens: str | None = None,
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
                every call, like training inputs) or ``"clean"`` (the tokens themselves); None: the model's
                ``default_known_tokens`` (``"renoise"``; ``"clean"`` for a time-agnostic masked model).
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
        if known_tokens is None:
            known_tokens = self.default_known_tokens
        if known_tokens not in KNOWN_TOKEN_MODES:  # before anything is encoded or sampled
            raise ValueError(f"known_tokens must be one of {list(KNOWN_TOKEN_MODES)}, got {known_tokens!r}")
        prompts = self._edit_prompts(prompt, (("image", len(images)), ("mask", len(regenerate))))
        n = num_images_per_prompt
        check_images_per_prompt(n)
        check_generators(generator, len(prompts) * n)
        x0 = self.encode_images(images).flatten(1)  # [I, N] on the device
        regenerate = regenerate.to(x0.device)
        x0, regenerate = _per_prompt(x0, len(prompts)), _per_prompt(regenerate, len(prompts))

        def edit(rows: torch.Tensor, options: SamplingOptions, rows_generator: Generator) -> dict[str, Any]:
            row_prompt = rows.to(x0.device) // n
            return {"known": KnownTokens(x0[row_prompt], ~regenerate[row_prompt], known_tokens)}

        sampling = dict(sampling)
        condition = self._split_condition(sampling)  # the model's own condition keywords (aMUSEd's micro-conditions)
        options = self.call_options(**_sampling_given(sampling))  # once for the whole call
        counts = regenerate.sum(1).tolist()
        if options.sampler.fills_fixed_count and len(set(counts)) > 1:
            # a counting sampler needs equal [MASK] counts per run: one run per mask size, rows put back in order
            groups = [[p for p, c in enumerate(counts) if c == value] for value in sorted(set(counts))]
            return self._edit_in_groups(
                prompts, groups, options, n, generator, output_type, progress, batch_size, callback, edit, condition
            )
        return self._generate(
            self._as_prompt(prompt, prompts), options, n, generator, output_type, progress, batch_size, callback, edit,
            condition=condition,
        )  # fmt: skip

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
        offset = check_offset(offset)
        width, height = self.image_size
        parts = image if isinstance(image, list | tuple) else [image]
        canvases, masks = [], []
        for part in parts:
            pixels = image_batch(part, None, "image")
            for one in pixels:
                canvas, uncovered = place_on_canvas(one, (height, width), offset)
                if not bool(uncovered.any()):
                    raise ValueError(
                        f"the image covers the whole {width}x{height} canvas at offset {offset}: nothing to "
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
        images = image_batch(image, self.image_size)
        prompts = self._edit_prompts(prompt, (("image", len(images)),))
        n = num_images_per_prompt
        check_images_per_prompt(n)
        check_generators(generator, len(prompts) * n)
        x0 = _per_prompt(self.encode_images(images).flatten(1), len(prompts))

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

        sampling = dict(sampling)
        condition = self._split_condition(sampling)
        options = self.call_options(**_sampling_given(sampling))
        return self._generate(
            self._as_prompt(prompt, prompts), options, n, generator, output_type, progress, batch_size, callback, edit,
            condition=condition,
        )  # fmt: skip

    def _edit_prompts(self, prompt: Any, inputs: tuple[tuple[str, int], ...]) -> list[Any]:
        """The prompt as a list (``[None]`` for an unconditional model), with each input's count checked: one,
        or one per prompt."""
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        check_prompt_text(prompts)
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
        options: SamplingOptions,
        n: int,
        generator: Generator,
        output_type: OutputType,
        progress: bool,
        batch_size: int | None,
        callback: Callable[[int, int], None] | None,
        edit: EditRows,
        condition: dict[str, Any] | None = None,
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
                    options,
                    n,
                    [generator[r] for r in rows] if per_image else generator,
                    output_type,
                    progress,
                    batch_size,
                    batch_callback(callback, g, len(groups)),
                    group_edit,
                    condition=condition,
                )
            )
            order.extend(rows)
        back = torch.argsort(torch.tensor(order))
        tokens = torch.cat([o.tokens for o in outputs])[back]
        if output_type == "tokens":
            return PipelineOutput(images=None, tokens=tokens)
        images = join_outputs([o.images for o in outputs], output_type)
        if output_type == "pil":
            return PipelineOutput(images=[images[i] for i in back.tolist()], tokens=tokens)
        return PipelineOutput(images=images[back.numpy() if output_type == "np" else back], tokens=tokens)


def _sampling_given(sampling: dict[str, Any], condition: Collection[str] = ()) -> dict[str, Any]:
    """The sampling keywords of an editing call, checked against :class:`SamplingOptions`' fields, the
    strategies' settings and the model's own ``condition`` keywords (aMUSEd's micro-conditions)."""
    fields = [f.name for f in dataclasses.fields(SamplingOptions)] + list(sampler_settings()) + list(condition)
    unknown = sorted(set(sampling) - set(fields))
    if unknown:
        raise ValueError(f"unknown sampling keyword(s) {unknown}; the sampling keywords are {fields}")
    return dict(sampling)


def _per_prompt(x: torch.Tensor, prompts: int) -> torch.Tensor:
    """Rows of ``x`` [1 or P, ...] for each of ``prompts`` prompts."""
    return x.expand(prompts, *x.shape[1:]) if len(x) == 1 else x
