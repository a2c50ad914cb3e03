"""``vqdiffusion eval-tokenizer``: the shapes suite's score of a tokenizer's own reconstructions (the most a
generator drawing through it can reach) and its PSNR, for a bare VQ-VAE folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .arg_types import seed
from .errors import CLIError
from .evaluate import MAX_EVAL_N


def add_eval_tokenizer_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval-tokenizer`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "eval-tokenizer",
        help="score a tokenizer's reconstructions of the shapes prompts (the generator's ceiling) and its PSNR",
        description="Render the shapes suite's scenes afresh, encode and decode them with VQVAE_DIR and score the "
        "reconstructions as `vqdiffusion eval` scores generated images (strict and lenient shape rule, 95%% "
        "Wilson intervals); also the reconstruction PSNR.",
    )
    parser.add_argument(
        "vqvae", metavar="VQVAE_DIR", help="VQ-VAE folder, or a folder with a vqvae/ subfolder (a model, a run)"
    )
    parser.add_argument("--n", type=int, default=256, help="images per prompt set (default 256)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed of the scenes (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per tokenizer call (default 64)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", default=None, help="folder for report.json (default: print only)")
    return parser


def run_eval_tokenizer(args: argparse.Namespace) -> int:
    """Run ``eval-tokenizer``: prints the ceiling table and the PSNR line (and the report's path with --out)."""
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.n > MAX_EVAL_N:
        raise CLIError(f"--n must be at most {MAX_EVAL_N}, got {args.n}; ask for fewer images per prompt set")
    from ..devices import resolve_device
    from ..eval.tokenizer import format_shape_ceiling, tokenizer_psnr, tokenizer_shape_ceiling
    from ..io import atomic_write_text, check_output_path
    from ..models.vqvae import load_vqvae

    device = resolve_device(args.device)
    if args.out is not None:
        check_output_path(args.out, folder=True, what="--out")
    vqvae = load_vqvae(args.vqvae).to(device).eval()
    ceiling = tokenizer_shape_ceiling(vqvae, num_images_per_set=args.n, seed=args.seed, batch_size=args.batch_size)
    psnr = tokenizer_psnr(vqvae, num_images=args.n, seed=args.seed, batch_size=args.batch_size)
    print(format_shape_ceiling(ceiling))
    print("tokenizer PSNR on fresh renders: " + ", ".join(f"{k} {v:.2f} dB" for k, v in psnr.items()))
    if args.out is not None:
        report = {"vqvae": str(args.vqvae), "quantizer": vqvae.config.quantizer, "ceiling": ceiling, "psnr": psnr}
        print(atomic_write_text(Path(args.out) / "report.json", json.dumps(report, indent=2) + "\n"))
    return 0
