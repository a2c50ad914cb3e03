"""Random weights and random models for tests.

``randomize_``, ``RandomPipelineSpec`` and ``random_diffusers_pipeline`` live in :mod:`vqdiffusion.testing`
(the benchmarks use them too) and are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vqdiffusion.diffusion import MaskReplaceSchedule
from vqdiffusion.formats.components import PipelineComponents
from vqdiffusion.models.conditions import CLIPTextCondition, LearnedNullCondition
from vqdiffusion.models.denoiser import Denoiser, DenoiserConfig
from vqdiffusion.models.vqvae import VQVAE, VQVAEConfig, save_vqvae
from vqdiffusion.sampling import SamplingOptions
from vqdiffusion.testing import RandomPipelineSpec, random_diffusers_pipeline, randomize_

__all__ = [
    "RandomPipelineSpec",
    "TinySpec",
    "make_vqvae_dir",
    "random_diffusers_pipeline",
    "randomize_",
    "save_diffusers_pipeline",
    "tiny_label_components",
    "tiny_text_components",
]

TinySpec = RandomPipelineSpec


def save_diffusers_pipeline(path: Path, spec: RandomPipelineSpec | None = None):
    """Build a random diffusers pipeline, save it to ``path`` (diffusers layout) and return it."""
    pipe = random_diffusers_pipeline(spec or RandomPipelineSpec())
    pipe.save_pretrained(str(path))
    return pipe


def make_vqvae_dir(root: Path, seed: int = 0) -> Path:
    """A tiny random VQ-VAE (K = 16, f = 2) exported to ``root``; its codes are encoder outputs of random
    images, so that random images use many codes."""
    torch.manual_seed(seed)
    model = VQVAE(VQVAEConfig.preset("tiny"))
    with torch.no_grad():
        z = model.encode_latents(torch.rand(4, 3, 8, 8) * 2 - 1)  # [4, D, 4, 4]
        z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        model.codebook.weight.copy_(z[torch.randperm(z.shape[0])[:16]])
    return save_vqvae(model, root)


# A VQ-VAE small enough for any test: two levels of 8 channels, 16 codes, 8x8 images -> 4x4 tokens.
TINY_VQ_CONFIG = VQVAEConfig(
    block_out_channels=(8, 8),
    latent_channels=4,
    embed_dim=4,
    num_embeddings=16,
    encoder_attention=(False, False),
    decoder_attention=(False, False),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=8,
)


def tiny_text_components(tiny_clip_dirs: tuple[Path, Path]) -> PipelineComponents:
    """A tiny random text pipeline (seed 0): ``TINY_VQ_CONFIG``, the tiny denoiser, the paper's
    mask-and-replace schedule with K = 16, the tiny local CLIP (``tiny_clip_dirs`` = model, tokenizer folders)
    and a learned null condition; 3 steps, guidance 2 by default."""
    torch.manual_seed(0)
    text = CLIPTextCondition.from_pretrained(*tiny_clip_dirs, pad_token_id=0)
    return PipelineComponents(
        vqvae=VQVAE(TINY_VQ_CONFIG),
        denoiser=Denoiser(DenoiserConfig.preset("tiny", cond_dim=text.hidden_size)),
        schedule=MaskReplaceSchedule.paper_mask_and_replace(16, 100),
        text_encoder=text,
        null_condition=LearnedNullCondition(0.1 * torch.randn(text.max_length, text.hidden_size)),
        defaults=SamplingOptions(num_inference_steps=3, guidance_scale=2.0),
    )


def tiny_label_components(kind: str) -> PipelineComponents:
    """A tiny random class-conditional (``kind="class"``: 4 labels and the null label 4, guidance 2) or
    unconditional (``"none"``) pipeline (seed 0), with the paper's mask-and-replace schedule, K = 16, and
    3 steps by default."""
    torch.manual_seed(0)
    labels = {"class": {"num_class_labels": 5}, "none": {}}[kind]
    return PipelineComponents(
        vqvae=VQVAE(TINY_VQ_CONFIG),
        denoiser=Denoiser(DenoiserConfig.preset("tiny", cond_dim=None, **labels)),
        schedule=MaskReplaceSchedule.paper_mask_and_replace(16, 100),
        null_class_label=4 if kind == "class" else None,
        defaults=SamplingOptions(num_inference_steps=3, guidance_scale=2.0 if kind == "class" else 1.0),
    )
