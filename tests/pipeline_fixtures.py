"""Tiny random-weight diffusers VQ-Diffusion pipelines, saved in the diffusers layout, for tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vqdiffusion.text_vocab import build_char_clip_tokenizer


@dataclasses.dataclass(frozen=True)
class TinySpec:
    num_classes: int = 16  # K
    side: int = 4  # token grid side
    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    text_width: int = 32
    learnable_null: bool = True
    seed: int = 0


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_diffusers_pipeline(spec: TinySpec = TinySpec()):
    """A diffusers ``VQDiffusionPipeline`` with every weight random (diffusers zero-initialises some)."""
    from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=spec.num_classes,
        vq_embed_dim=8,
        norm_num_groups=4,
        sample_size=spec.side * 2,
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
            intermediate_size=2 * spec.text_width,
            num_hidden_layers=2,
            num_attention_heads=2,
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
        randomize(module, spec.seed * 10 + i, std=0.3 if module is transformer else 0.1)
    scheduler = VQDiffusionScheduler(num_vec_classes=spec.num_classes + 1, num_train_timesteps=100)
    pipe = VQDiffusionPipeline(
        vqvae=vqvae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        scheduler=scheduler,
        learned_classifier_free_sampling_embeddings=null,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers_pipeline(path: Path, spec: TinySpec = TinySpec()):
    pipe = build_diffusers_pipeline(spec)
    pipe.save_pretrained(str(path))
    return pipe
