"""``vqdiffusion export``: write a model folder from a denoiser training checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..sampling import DEFAULT_GUIDANCE_SCALE
from ..training.export import export_pipeline
from .sampling_flags import add_sampling_arguments, sampling_arguments


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "export",
        help="export a denoiser training checkpoint as a model folder for `generate`",
        description="Write a pipeline folder (our layout) from a denoiser checkpoint or training folder.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="step_*.safetensors, or a training --out folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="model folder to write")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    parser.add_argument("--vqvae", default=None, help="VQ-VAE folder (default: the token folder's)")
    parser.add_argument("--half", action="store_true", help="store the VQ-VAE and denoiser weights as float16")
    parser.add_argument("--overwrite", action="store_true", help="write into an OUT_DIR that is not empty")
    add_sampling_arguments(
        parser, default_text=f"T steps, guidance {DEFAULT_GUIDANCE_SCALE:g} (1 without a null condition), the rest off"
    )
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run ``export``; prints the model folder."""
    defaults = sampling_arguments(args)
    out = export_pipeline(
        args.checkpoint,
        args.out_dir,
        ema=not args.raw,
        vqvae_dir=args.vqvae,
        defaults=defaults,
        weights_dtype=torch.float16 if args.half else None,
        overwrite=args.overwrite,
    )
    print(out)
    return 0
