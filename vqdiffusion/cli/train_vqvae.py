"""``vqdiffusion train-vqvae``: train a VQ-VAE image tokenizer on a folder of images."""

from __future__ import annotations

import argparse
from typing import Any

from ..models.vqvae_config import _PRESETS
from ..training.checkpoint import VQVAE_CHECKPOINT
from ..training.vqvae import train_vqvae
from ..training.vqvae_config import VQVAETrainConfig
from .arg_types import seed
from .flag_tables import FlagTable, add_flag_table, checkpoint_to_continue, given_fields


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


_FLAGS: FlagTable = {
    "--image-size": ("image_size", int, "training image side in pixels (default 64)"),
    "--resize": ("resize", str, "center_crop (default) or resize"),
    "--preset": ("model_preset", str, f"model preset: {', '.join(sorted(_PRESETS))} (default tiny)"),
    "--channels": ("block_out_channels", _ints, "channels per level, e.g. 64,128,256 (levels = count)"),
    "--latent-channels": ("latent_channels", int, "encoder output channels"),
    "--embed-dim": ("embed_dim", int, "codebook vector width D"),
    "--codebook-size": ("num_embeddings", int, "codebook size K"),
    "--quantizer": ("quantizer", str, "vq (default: learned codebook) or fsq (finite scalar quantization)"),
    "--fsq-levels": ("fsq_levels", _ints, "levels per latent dim for --quantizer fsq, e.g. 8,5,5,5 (K = product)"),
    "--layers-per-block": ("layers_per_block", int, "residual blocks per encoder level"),
    "--norm-groups": ("norm_num_groups", int, "GroupNorm groups"),
    "--encoder-padding": ("encoder_padding", str, "zeros (default) or replicate: a flat background, one code"),
    "--batch-size": ("batch_size", int, "images per step (default 16)"),
    "--steps": ("steps", int, "optimizer steps (default 10000)"),
    "--mixed-precision": ("mixed_precision", str, "no (default) or bf16 autocast"),
    "--lr": ("lr", float, "Adam learning rate (default 2e-4)"),
    "--lr-warmup": ("lr_warmup", int, "linear warm-up steps (default 0)"),
    "--lr-schedule": ("lr_schedule", str, "constant (default) or cosine"),
    "--grad-clip": ("grad_clip", float, "clip the gradient norm to this value"),
    "--recon-loss": ("recon_loss", str, "l1 (default) or mse"),
    "--beta": ("commitment_beta", float, "commitment weight (default 0.25)"),
    "--codebook-decay": ("codebook_decay", float, "EMA decay of the codebook (default 0.99)"),
    "--dead-code-threshold": ("dead_code_threshold", int, "restart codes unused for N steps (0 = off)"),
    "--codebook-init": ("codebook_init", str, "data (default: first batch's encoder outputs), kmeans or random"),
    "--kmeans-images": ("kmeans_images", int, "images encoded for --codebook-init kmeans (default 256)"),
    "--kmeans-iters": ("kmeans_iters", int, "Lloyd iterations of --codebook-init kmeans (default 10)"),
    "--pad-consistency": ("pad_consistency", float, "weight of the padding-consistency term (default 0 = off)"),
    "--pad-consistency-images": ("pad_consistency_images", int, "images per batch for it (default 4)"),
    "--code-restart": ("code_restart", str, "dead-code restart: uniform (default) or distance (k-means++ style)"),
    "--perceptual-weights": ("perceptual_weights", str, "local torchvision VGG16 weights (perceptual loss)"),
    "--perceptual-weight": ("perceptual_weight", float, "weight of the perceptual loss (default 1)"),
    "--gan-weight": ("gan_weight", float, "weight of the patch-GAN loss (default 0 = off)"),
    "--gan-start-step": ("gan_start_step", int, "first step of the GAN loss (default 0)"),
    "--save-every": ("save_every", int, "checkpoint + export interval in steps (default 1000)"),
    "--sample-every": ("sample_every", int, "sample grid interval in steps (default 1000)"),
    "--log-every": ("log_every", int, "metrics interval in steps (default 50)"),
    "--keep-checkpoints": ("keep_checkpoints", int, "checkpoints kept (default 2)"),
    "--seed": ("seed", seed, "random seed (default 0)"),
    "--device": ("device", str, "auto (default), cpu, cuda, cuda:N"),
    "--num-workers": ("num_workers", int, "data loader processes (default 0)"),
}


def add_train_vqvae_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train-vqvae`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "train-vqvae",
        help="train a VQ-VAE image tokenizer on a folder of images",
        description="Train a VQ-VAE tokenizer; writes checkpoints, metrics and the exported OUT/vqvae.",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--no-flip", action="store_true", default=None, help="no random horizontal flips")
    parser.add_argument(
        "--codebook-l2", action="store_true", default=None, help="cosine lookup: l2-normalised latent and codes"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_flag_table(parser, _FLAGS)
    return parser


def run_train_vqvae(args: argparse.Namespace) -> int:
    """Run ``train-vqvae``.  Bad settings raise ValueError/ConfigError/FileNotFoundError for the CLI."""
    overrides = given_fields(args, [field for field, _, _ in _FLAGS.values()])
    if args.no_flip:
        overrides["random_flip"] = False
    if args.codebook_l2:
        overrides["codebook_l2"] = True
    overrides["progress"] = not args.quiet
    overrides["data_dir"], overrides["output_dir"] = str(args.data_dir), str(args.out)
    resume_path = None
    if args.resume:
        resume_path, meta = checkpoint_to_continue(args.out, VQVAE_CHECKPOINT)
        config = VQVAETrainConfig.from_dict({**meta["config"], **overrides})
    else:
        config = VQVAETrainConfig(**overrides)
    exported = train_vqvae(config, resume=resume_path or False)
    print(exported)
    return 0
