"""The sampling options and batch planning of the pipeline: a call's settings resolved against the model's
defaults (:meth:`~OptionsMixin.sampling_options`, :meth:`~OptionsMixin.call_options`) and the image ranges that
fit in memory (:meth:`~OptionsMixin.plan_batches`).  :class:`OptionsMixin` reads of the pipeline only its
components (``vqvae``, ``denoiser``, ``schedule``, ``text_encoder``), ``defaults``, ``device``,
``condition_kind`` and ``time_agnostic``."""

from __future__ import annotations

import logging
from typing import Any

from ..devices import available_memory, format_bytes
from ..image_outputs import OutputType
from ..models.conditions import ConditionKind
from ..models.memory import sampling_memory_per_image
from ..samplers import check_model_kind
from ..sampling import SamplingOptions

logger = logging.getLogger(__name__)


class OptionsMixin:
    """``sampling_options``, ``call_options``, ``memory_per_image`` and ``plan_batches`` of
    :class:`~vqdiffusion.pipeline.VQDiffusionPipeline`."""

    def call_options(self, **given: Any) -> SamplingOptions:
        """The options of one call: :meth:`sampling_options` of the non-None ``given`` settings, and for an
        unconditional model guidance 1 (it has no condition to guide by; another value is an error)."""
        if self.condition_kind == ConditionKind.NONE:
            scale = given.get("guidance_scale")
            if scale not in (None, 1.0):
                raise ValueError(f"an unconditional model has no guidance; got guidance_scale={scale}")
            given = {**given, "guidance_scale": 1.0}
        return self.sampling_options(**given)

    def memory_per_image(self, output_type: OutputType = "pil", guidance: bool = True) -> tuple[int, int]:
        """Rough upper estimates, in bytes per image: (working memory of one reverse-chain run and its decoding,
        the results kept until the call returns); see :func:`vqdiffusion.models.memory.sampling_memory_per_image`.
        """
        context = self.text_encoder.max_length if self.text_encoder is not None else 1
        return sampling_memory_per_image(self.denoiser.config, self.vqvae.config, context, output_type, guidance)

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
        check_model_kind(options.sampler, self.time_agnostic)
        return options
