"""A tiny random aMUSEd in diffusers' classes (``UVit2DModel`` + ``VQModel`` + transformers'
``CLIPTextModelWithProjection``), the reference of the conformance tests; needs diffusers (test-only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .tokenizers import BOS, EOS, tiny_clip_vocab, write_tiny_tokenizer

CODEBOOK, VOCAB, MASK = 30, 40, 39
SIDE = 4  # token grid side; the VQ has f = 2, so images are 8 x 8


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norm scales, GRN gammas and zero-initialised layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))


def uvit_args(**overrides) -> dict:
    args = dict(
        hidden_size=32,
        use_bias=False,
        cond_embed_dim=12,
        micro_cond_encode_dim=4,
        micro_cond_embed_dim=20,
        encoder_hidden_size=24,
        vocab_size=VOCAB,
        codebook_size=CODEBOOK,
        in_channels=16,
        block_out_channels=32,
        num_res_blocks=1,
        downsample=True,
        upsample=True,
        block_num_heads=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        layer_norm_eps=1e-6,
        ln_elementwise_affine=True,
        sample_size=SIDE,
    )
    return {**args, **overrides}


def reference_pipeline(tokenizer_dir: Path, seed: int = 0, **uvit_overrides) -> Any:
    """diffusers' ``AmusedPipeline`` of tiny random parts (K = CODEBOOK codes, a SIDE x SIDE token grid, f = 2)."""
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from diffusers.pipelines.deprecated.amused.pipeline_amused import AmusedPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    transformer = UVit2DModel(**uvit_args(**uvit_overrides)).eval()
    perturb(transformer, seed)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=CODEBOOK,
        norm_num_groups=4,
        sample_size=8,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=True,
    ).eval()
    perturb(vqvae, seed + 1)
    vocab, _ = tiny_clip_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=12,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    text_encoder = CLIPTextModelWithProjection(text_config).eval()
    perturb(text_encoder, seed + 2)
    return AmusedPipeline(
        vqvae=vqvae,
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True),
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=MASK, masking_schedule="cosine"),
    )




def reference_folder(root: Path, seed: int = 0) -> tuple[Any, Path]:
    """A tiny reference pipeline and its ``save_pretrained`` folder ``root / "amused-tiny"``."""
    reference = reference_pipeline(write_tiny_tokenizer(root / "tokenizer_src", model_max_length=16), seed)
    folder = root / "amused-tiny"
    reference.save_pretrained(str(folder))
    return reference, folder
