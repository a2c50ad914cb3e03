"""Random-weight reference models for tests and benchmarks (needs the optional ``diffusers`` extra).

``random_diffusers_pipeline`` builds diffusers' ``VQDiffusionPipeline`` from components with every weight
random (diffusers zero-initialises some), a character-level CLIP tokenizer and a small VQ decoder, so
that ours can be checked against it (``save_pretrained`` gives a diffusers-layout directory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from .text_vocab import build_char_clip_tokenizer


@dataclasses.dataclass(frozen=True)
class RandomPipelineSpec:
    """Shapes of a random diffusers VQ-Diffusion pipeline."""

    num_classes: int = 16  # K
    side: int = 4  # token grid side (h = w)
    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    vq_levels: int = 2  # the image side is side * 2 ** (vq_levels - 1)
    vq_channels: int = 16
    learnable_null: bool = True
    transformer_std: float = 0.3
    other_std: float = 0.1
    seed: int = 0


def randomize_(
    module: torch.nn.Module,
    seed: int | torch.Generator,
    std: float = 0.2,
    *,
    gain_std: float | None = None,
    std_by_name: Mapping[str, float] | None = None,
) -> torch.nn.Module:
    """Overwrite every parameter, in ``named_parameters`` order, with noise z ~ N(0, 1) drawn from ``seed``
    (an int, or a ``torch.Generator`` that is advanced in place), and return ``module``.

    A parameter becomes ``std * z``, except: with ``gain_std``, normalisation gains (1-D parameters whose
    name contains "norm" and ends in "weight") become ``1 + gain_std * z``, which keeps activations spread
    where an implementation zero-initialises them; ``std_by_name`` maps a name substring to another std
    (the first match wins; gains take precedence).
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if gain_std is not None and p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + noise * gain_std)
                continue
            scale = next((v for k, v in (std_by_name or {}).items() if k in name), std)
            p.copy_(noise * scale)
    return module


def random_diffusers_pipeline(spec: RandomPipelineSpec | None = None):
    """A diffusers ``VQDiffusionPipeline`` with random weights (progress bar off)."""
    spec = spec or RandomPipelineSpec()
    from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel
    from diffusers import VQDiffusionPipeline as DiffusersPipeline
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = spec.vq_levels
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(spec.vq_channels,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=spec.num_classes,
        vq_embed_dim=8,
        norm_num_groups=4,
        sample_size=spec.side * 2 ** (levels - 1),
    )
    transformer = Transformer2DModel(
        num_attention_heads=spec.heads,
        attention_head_dim=spec.head_dim,
        num_layers=spec.layers,
        num_vector_embeds=spec.num_classes + 1,
        sample_size=spec.side,
        cross_attention_dim=spec.text_width,
        activation_fn="geglu-approximate",
        attention_bias=True,
        norm_type="ada_norm",
        num_embeds_ada_norm=100,
    )
    tokenizer = build_char_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_width,
            intermediate_size=4 * spec.text_width,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    null = LearnedClassifierFreeSamplingEmbeddings(
        learnable=spec.learnable_null,
        hidden_size=spec.text_width if spec.learnable_null else None,
        length=77 if spec.learnable_null else None,
    )
    modules = (vqvae, transformer, text_encoder) + ((null,) if spec.learnable_null else ())
    for i, module in enumerate(modules):
        std = spec.transformer_std if module is transformer else spec.other_std
        randomize_(module, spec.seed * 10 + i, std)
    scheduler = VQDiffusionScheduler(num_vec_classes=spec.num_classes + 1, num_train_timesteps=100)
    pipe = DiffusersPipeline(
        vqvae=vqvae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        scheduler=scheduler,
        learned_classifier_free_sampling_embeddings=null,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
