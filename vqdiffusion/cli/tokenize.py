"""``vqdiffusion tokenize``: encode an image folder with a VQ-VAE into a token folder."""

from __future__ import annotations

import argparse
from typing import Any

from ..data.folders import RESIZE_MODES
from ..data.tokens import TOKEN_KINDS
from ..training.tokenize import tokenize_dataset


def add_tokenize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``tokenize`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "tokenize",
        help="encode an image folder into VQ token files for diffusion training",
        description="Encode every image of DATA_DIR with a VQ-VAE once; writes tokens.safetensors, "
        "captions.jsonl and meta.json to --out.",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="image folder (captions, class folders or plain images)")
    parser.add_argument("--vqvae", required=True, help="exported VQ-VAE folder (e.g. runs/vq/vqvae)")
    parser.add_argument("--out", required=True, help="output folder for the token files")
    parser.add_argument("--kind", default="captions", choices=TOKEN_KINDS, help="data set kind (default captions)")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default: the VQ-VAE's)")
    parser.add_argument("--resize", default="center_crop", choices=RESIZE_MODES, help="default center_crop")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call (default 32)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--num-workers", type=int, default=0, help="image decoding processes (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing token folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_tokenize(args: argparse.Namespace) -> int:
    """Run ``tokenize``; prints the output folder.  Bad input raises ValueError/FileNotFoundError."""
    out = tokenize_dataset(
        args.data_dir,
        args.vqvae,
        args.out,
        kind=args.kind,
        image_size=args.image_size,
        resize=args.resize,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(out)
    return 0
