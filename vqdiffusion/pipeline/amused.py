"""aMUSEd checkpoints in the pipeline (docs/design.md §12): :class:`AmusedPipeline`, the
:class:`~vqdiffusion.pipeline.core.VQDiffusionPipeline` of a time-agnostic masked model.

It shares the sampling loop, batching, editing and output handling of the VQ-Diffusion pipeline and replaces
what differs: the network (:class:`~vqdiffusion.models.uvit.UVit`, no step input), its condition (CLIP's
penultimate hidden states, the pooled projection and the micro-conditions, the empty prompt as the null of
guidance), the schedule the samplers read (:class:`~vqdiffusion.diffusion.MaskingSchedule`: mask-only, its
masked fraction aMUSEd's cosine or linear masking schedule), the decoder range ([0, 1]) and the defaults
(12 steps, guidance 10, the confidence sampler with aMUSEd's own step rule).
``VQDiffusionPipeline.from_pretrained`` returns it for a folder whose ``model_index.json`` names an
``AmusedPipeline``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import ConfigError
from ..diffusion import MaskingSchedule, guided_log_probs, guided_logits
from ..formats import amused as amused_format
from ..formats.amused import AmusedComponents
from ..image_outputs import OutputType
from ..models.conditions import ConditionKind
from ..models.memory import sampling_memory_per_image
from ..models.pooled_text import CLIPPooledTextCondition
from ..models.uvit import AmusedCondition, MicroConditions, UVit
from ..models.vqvae import VQVAE
from ..samplers import Confidence, check_model_kind
from ..sampling import SamplingOptions
from .core import VQDiffusionPipeline

__all__ = ["AMUSED_NUM_TIMESTEPS", "AmusedPipeline", "amused_defaults"]

# T of the mask-only schedule the samplers read: divisible by the default 12 steps and by 8, 10, 16, 20, 24,
# so that a budget sampler's uniformly spaced run of that many steps leaves exactly N gamma((i + 1) / S) masked.
AMUSED_NUM_TIMESTEPS = 1200


def amused_defaults(masking_schedule: str = "cosine") -> SamplingOptions:
    """aMUSEd's own sampling settings: 12 steps, guidance 10 (the empty prompt as null), the confidence
    sampler with aMUSEd's step rule, Gumbel scale linspace(2, 0, S) and the checkpoint's masking schedule."""
    start, _ = amused_format.DEFAULT_TEMPERATURE
    return SamplingOptions(
        num_inference_steps=amused_format.DEFAULT_STEPS,
        guidance_scale=amused_format.DEFAULT_GUIDANCE_SCALE,
        sampler=Confidence(masking_schedule=masking_schedule, choice_temperature=start, step_rule="amused"),
    )


class AmusedPipeline(VQDiffusionPipeline):
    """aMUSEd (Patil et al. 2024) text-to-image sampling: the pipeline of a time-agnostic masked model.

    Components: ``denoiser`` (the :class:`UVit`, (x_t, condition) -> log p(x0 | x_t), no t), ``vqvae``
    (decodes to [0, 1]), ``text_encoder`` (:class:`CLIPPooledTextCondition`) and ``schedule``, a mask-only
    :class:`MaskingSchedule` of ``AMUSED_NUM_TIMESTEPS`` steps following the checkpoint's masking schedule
    (what the budget, ReMDM and first-hitting samplers read; the model never sees t).  Samplers that need a
    trained timestep chain (``ancestral``) are refused with a ValueError naming the ones that apply.

    Calls take aMUSEd's micro-conditions as keywords (:class:`MicroConditions`): ``aesthetic_score`` (default 6),
    ``crop_coords`` ((top, left), default (0, 0)) and ``orig_size`` ((width, height), default the generated
    image's size).
    """

    index_class_name: ClassVar[str] = amused_format.AMUSED_PIPELINE
    condition_keywords: ClassVar[tuple[str, ...]] = tuple(f.name for f in dataclasses.fields(MicroConditions))
    # the model never saw noised context: kept tokens are shown as they are (aMUSEd's own inpainting)
    default_known_tokens: ClassVar[str] = "clean"

    def __init__(
        self,
        *,
        vqvae: VQVAE,
        denoiser: UVit,
        text_encoder: CLIPPooledTextCondition,
        masking_schedule: str = "cosine",
        force_upcast: bool = False,
        defaults: SamplingOptions | None = None,
        num_timesteps: int = AMUSED_NUM_TIMESTEPS,
    ) -> None:
        cfg = denoiser.config
        if vqvae.config.num_embeddings != cfg.codebook_size:
            raise ConfigError(
                f"VQ-VAE codebook has {vqvae.config.num_embeddings} entries but the transformer predicts "
                f"{cfg.codebook_size} codes"
            )
        if text_encoder.hidden_size != cfg.encoder_hidden_size or text_encoder.projection_dim != cfg.cond_embed_dim:
            raise ConfigError(
                f"the text encoder gives widths ({text_encoder.hidden_size}, {text_encoder.projection_dim}) but the "
                f"transformer reads ({cfg.encoder_hidden_size}, {cfg.cond_embed_dim})"
            )
        self.vqvae = vqvae.eval()
        self.denoiser = denoiser.eval()
        self.text_encoder = text_encoder.eval()
        self.null_condition = None
        self.null_class_label = None
        self.force_upcast = force_upcast
        self.schedule = MaskingSchedule(
            num_classes=cfg.codebook_size, num_timesteps=num_timesteps, masking_schedule=masking_schedule
        )
        self.defaults = defaults or amused_defaults(masking_schedule)
        try:
            self.defaults.validate(self.schedule.num_timesteps)
            check_model_kind(self.defaults.sampler, True)
        except ValueError as err:
            raise ConfigError(f"the default sampling settings do not fit the model: {err}") from None

    @property
    def masking_schedule(self) -> str:
        return self.schedule.masking_schedule

    # -- conditions -------------------------------------------------------------------------------------
    @property
    def condition_kind(self) -> ConditionKind:
        return ConditionKind.TEXT

    @property
    def num_class_labels(self) -> None:
        return None

    def micro_conditions(self, batch_size: int, **given: Any) -> torch.Tensor:
        """[B, 5] micro-conditions of :class:`MicroConditions` (``aesthetic_score``, ``crop_coords``,
        ``orig_size``; checked there), the original size defaulting to the generated image's."""
        width, height = self.image_size
        values = MicroConditions(**given).values(width, height)
        return torch.tensor(values, dtype=torch.float32, device=self.device).expand(batch_size, -1)

    def condition_settings(self, **given: Any) -> dict[str, Any]:
        """The call's micro-conditions with aMUSEd's defaults filled in, as JSON values (sample-set manifests)."""
        width, height = self.image_size
        return MicroConditions(**given).to_dict(width, height)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], **micro: Any) -> AmusedCondition:  # type: ignore[override]
        """Prompts -> :class:`AmusedCondition` (penultimate hidden states, pooled, micro-conditions)."""
        hidden, pooled = self.text_encoder.encode(prompts)
        return AmusedCondition(hidden, pooled, self.micro_conditions(len(prompts), **micro))

    @torch.no_grad()
    def null_embeddings(self, batch_size: int, **micro: Any) -> AmusedCondition:  # type: ignore[override]
        """The null condition of guidance: the empty prompt (with the same micro-conditions)."""
        hidden, pooled = self.text_encoder.encode_unconditional(batch_size)
        return AmusedCondition(hidden, pooled, self.micro_conditions(batch_size, **micro))

    def _condition_rows(self, encoded: AmusedCondition, rows: torch.Tensor) -> AmusedCondition:
        index = rows.to(encoded.hidden_states.device)
        return AmusedCondition(
            encoded.hidden_states[index], encoded.pooled[index.to(encoded.pooled.device)],
            encoded.micro_conds[index.to(encoded.micro_conds.device)],
        )  # fmt: skip

    def _predictor(
        self, cond: AmusedCondition, null_cond: AmusedCondition | None, guidance_scale: float, normalize: bool = True
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """x_t, t -> log p(x0 | x_t) (t is ignored); with guidance log_softmax(l_u + s (l_c - l_u)) on the
        logits of one 2B-row pass ([null; text]; the token embedding runs once for the B grids).
        ``normalize=False`` (aMUSEd's own step, which reads only the softmax): the logits l_u + s (l_c - l_u)
        as they are, the very tensor diffusers' pipeline hands its scheduler."""
        model = self.denoiser
        combine = guided_log_probs if normalize else guided_logits
        if guidance_scale == 1.0:
            cache = model.precompute_condition(cond)

            def predict(x_t: torch.Tensor, t: int) -> torch.Tensor:
                return model(x_t, cond_cache=cache, validate=False, return_logits=not normalize)

            return predict
        both = model.precompute_condition(AmusedCondition.cat([null_cond, cond]))
        scale = float(guidance_scale)

        def predict_guided(x_t: torch.Tensor, t: int) -> torch.Tensor:
            logits_u, logits_c = model(x_t, cond_cache=both, validate=False, return_logits=True).chunk(2)
            return combine(logits_u, logits_c, scale)

        return predict_guided

    # -- images ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, h, w] tokens -> [B, 3, H, W] float32 images in [0, 1] (aMUSEd's VQ decodes to [0, 1])."""
        return self.vqvae.decode_tokens(tokens, clamp=False).float().clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images in [0, 1] -> [B, h, w] tokens (aMUSEd's VQ reads [0, 1] as is)."""
        vq_dtype = next(self.vqvae.parameters()).dtype
        return self.vqvae.encode(images.to(self.device, vq_dtype))

    def memory_per_image(self, output_type: OutputType = "pil", guidance: bool = True) -> tuple[int, int]:
        context = self.text_encoder.max_length
        return sampling_memory_per_image(self.denoiser.config, self.vqvae.config, context, output_type, guidance)

    # -- components and persistence -------------------------------------------------------------------
    @property
    def components(self) -> AmusedComponents:  # type: ignore[override]
        return AmusedComponents(
            transformer=self.denoiser,
            vqvae=self.vqvae,
            text_encoder=self.text_encoder,
            mask_token_id=self.denoiser.config.mask_embedding_id,
            masking_schedule=self.masking_schedule,
            force_upcast=self.force_upcast,
        )

    @classmethod
    def from_components(cls, components: AmusedComponents) -> AmusedPipeline:  # type: ignore[override]
        return cls(
            vqvae=components.vqvae,
            denoiser=components.transformer,
            text_encoder=components.text_encoder,
            masking_schedule=components.masking_schedule,
            force_upcast=components.force_upcast,
        )

    def save_pretrained(self, path: str | os.PathLike, *, weights_dtype: torch.dtype | None = None) -> None:
        """Write diffusers' aMUSEd layout (:func:`vqdiffusion.formats.amused.save_amused`), which diffusers'
        ``AmusedPipeline.from_pretrained`` reads too."""
        if weights_dtype is not None:
            raise ValueError("weights_dtype applies to our layout only; an aMUSEd folder is written as it is")
        amused_format.save_amused(self.components, path)

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
    ) -> AmusedPipeline:
        """Load a diffusers-layout aMUSEd folder (:func:`vqdiffusion.formats.amused.load_amused`)."""
        pipe = cls.from_components(amused_format.load_amused(Path(root), dtype=dtype, variant=variant))
        if device is not None:
            pipe.to(device)
        return pipe
