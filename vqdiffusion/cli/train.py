"""``vqdiffusion train``: train the denoiser on a token folder (DDP under ``torchrun``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..data.tokens import TokenDataset
from ..models.denoiser import DENOISER_PRESETS
from ..text_vocab import caption_words
from ..training.checkpoint import DENOISER_CHECKPOINT
from ..training.denoiser import train_denoiser
from ..training.denoiser_config import DenoiserTrainConfig
from .arg_types import seed
from .flag_tables import FlagTable, add_flag_table, checkpoint_to_continue, given_fields


def _pair(text: str) -> tuple[float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    return values


_FLAGS: FlagTable = {
    "--preset": ("preset", str, f"denoiser preset: {', '.join(sorted(DENOISER_PRESETS))} (default tiny)"),
    "--layers": ("num_layers", int, "transformer blocks (default: the preset's)"),
    "--dim": ("dim", int, "transformer width"),
    "--heads": ("num_heads", int, "attention heads"),
    "--cond-dim": ("cond_dim", int, "condition width of a trained text model or class embedding"),
    "--mlp-ratio": ("mlp_ratio", float, "MLP hidden width / dim"),
    "--activation": ("activation", str, "gelu2 or gelu"),
    "--noise-schedule": ("noise_schedule", str, "reference (default, mask only) or mask_and_replace (paper)"),
    "--timesteps": ("num_timesteps", int, "diffusion steps T (default 100)"),
    "--alpha-cum-start": ("alpha_cum_start", float, "cumulative keep probability at the first step"),
    "--alpha-cum-end": ("alpha_cum_end", float, "cumulative keep probability at the last step"),
    "--gamma-cum-start": ("gamma_cum_start", float, "cumulative mask probability at the first step"),
    "--gamma-cum-end": ("gamma_cum_end", float, "cumulative mask probability at the last step"),
    "--objective": ("objective", str, "vlb (default: VQ-Diffusion's bound + aux loss), masked_ce (MaskGIT/MUSE) or "
                    "elbo (MD4/MDLM, mask-only schedules)"),
    "--init-from": ("init_from", str, "start from this model's weights (folder, builtin:NAME or Hub id) with a "
                    "fresh optimizer and warm-up"),
    "--aux-weight": ("aux_weight", float, "weight of the auxiliary x0 loss (default 5e-4)"),
    "--mask-weight": ("mask_weight", _pair, "loss weights of [MASK] and other positions, e.g. 1,1"),
    "--text-encoder": ("text_encoder_dir", str, "local CLIP text model folder (frozen)"),
    "--tokenizer": ("tokenizer_dir", str, "local CLIP tokenizer folder"),
    "--text-pad-token-id": ("text_pad_token_id", int, "pad id after end-of-text (default: the tokenizer's)"),
    "--text-layers": ("text_layers", int, "layers of a trained text model (default 2)"),
    "--text-heads": ("text_heads", int, "heads of a trained text model (default 4)"),
    "--text-max-length": ("text_max_length", int, "positions of a trained text model (default 77)"),
    "--cond-drop-prob": ("cond_drop_prob", float, "fraction of null conditions (default 0.1; 0 = no guidance)"),
    "--batch-size": ("batch_size", int, "global batch per optimizer step (default 32)"),
    "--grad-accum": ("grad_accum", int, "micro-steps per optimizer step (default 1)"),
    "--lr": ("lr", float, "AdamW learning rate (default 3e-4)"),
    "--lr-warmup": ("lr_warmup", int, "linear warm-up steps (default 500)"),
    "--lr-schedule": ("lr_schedule", str, "constant (default) or cosine"),
    "--lr-decay-steps": ("lr_decay_steps", int, "end of the cosine decay (default: --steps)"),
    "--min-lr": ("min_lr", float, "final learning rate of the cosine schedule (default 0)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (default 0.045)"),
    "--grad-clip": ("grad_clip", float, "maximum gradient norm (default 1; 0 = no clipping)"),
    "--ema-decay": ("ema_decay", float, "EMA decay of the exported weights (default 0.999)"),
    "--mixed-precision": ("mixed_precision", str, "no (default), bf16 or fp16 (CUDA)"),
    "--steps": ("steps", int, "optimizer steps (default 10000)"),
    "--log-every": ("log_every", int, "metrics interval in steps (default 50)"),
    "--save-every": ("save_every", int, "checkpoint interval in steps (default 1000)"),
    "--sample-every": ("sample_every", int, "sample grid interval in steps (default 1000)"),
    "--sample-steps": ("sample_steps", int, "sampling steps of the grids (default 25)"),
    "--num-samples": ("num_samples", int, "images per grid (default 8)"),
    "--keep-checkpoints": ("keep_checkpoints", int, "checkpoints kept (default 2)"),
    "--seed": ("seed", seed, "random seed (default 0)"),
    "--device": ("device", str, "auto (default), cpu, cuda, cuda:N"),
    "--num-workers": ("num_workers", int, "data loader processes (default 0)"),
    "--time-limit": ("time_limit", float, "stop after this many seconds of training, with a checkpoint and the "
                     "export (a cluster job's wall limit; --resume continues)"),
}


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "train",
        help="train a VQ-Diffusion denoiser on a token folder",
        description="Train the denoiser on the output of `vqdiffusion tokenize`; writes checkpoints, "
        "metrics, sample grids and the exported pipeline OUT/model. Under torchrun, trains with DDP.",
    )
    parser.add_argument("token_dir", metavar="TOKEN_DIR", help="token folder from `vqdiffusion tokenize`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument(
        "--train-text-model",
        dest="text_model",
        action="store_const",
        const="train",
        default=None,
        help="train a small CLIP-architecture text model (character tokenizer) jointly",
    )
    parser.add_argument(
        "--text-vocab",
        choices=["chars", "words"],
        default=None,
        help="tokenizer of a trained text model: chars (default) or words (the training captions' words are "
        "single tokens, other words are spelled out)",
    )
    parser.add_argument(
        "--no-adaptive-aux",
        dest="adaptive_aux",
        action="store_const",
        const=False,
        default=None,
        help="constant auxiliary loss weight (default: scaled by (1 - t/T) + 1)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_flag_table(parser, _FLAGS)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Run ``train``; prints the exported model folder.  Bad settings raise ValueError/ConfigError/
    FileNotFoundError for the CLI."""
    fields = [field for field, _, _ in _FLAGS.values()] + ["text_model", "adaptive_aux"]
    overrides = given_fields(args, fields)
    if overrides.get("grad_clip") == 0:
        overrides["grad_clip"] = None
    overrides["progress"] = not args.quiet
    overrides["token_dir"], overrides["output_dir"] = str(args.token_dir), str(args.out)
    resume_path = None
    if args.resume:
        resume_path, meta = checkpoint_to_continue(args.out, DENOISER_CHECKPOINT)
        saved_vocab = "words" if meta["config"].get("text_words") else "chars"
        if args.text_vocab is not None and args.text_vocab != saved_vocab:
            raise ValueError(
                f"--text-vocab {args.text_vocab}: the checkpoint was trained with --text-vocab {saved_vocab}; "
                "the tokenizer cannot change on --resume"
            )
        config = DenoiserTrainConfig.from_dict({**meta["config"], **overrides})
    else:
        if args.text_vocab == "words":
            captions = TokenDataset(args.token_dir).captions
            if captions is None:
                raise ValueError(f"--text-vocab words needs a caption token folder; {args.token_dir} has none")
            overrides["text_words"] = caption_words(captions)
        config = DenoiserTrainConfig(**overrides)
    exported = train_denoiser(config, resume=resume_path or False)
    if int(os.environ.get("RANK", "0")) == 0:
        print(exported)
    return 0
