"""``vqdiffusion convert``: the authors' checkpoints, or a model folder between our layout and diffusers'."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import CLIError


def add_convert_parser(sub: Any) -> None:
    conv = sub.add_parser(
        "convert",
        help="convert a model: the authors' .pth checkpoints, or a directory between our layout and diffusers'",
    )
    conv.add_argument("src", help="model directory (ours or diffusers layout) or an authors' checkpoint (.pth)")
    conv.add_argument("out_dir", help="output directory")
    conv.add_argument("--to", default="ours", choices=["ours", "diffusers"], help="output layout (default ours)")
    conv.add_argument("--config", help="authors' checkpoint: the YAML it was trained with (e.g. configs/ithq.yaml)")
    conv.add_argument(
        "--vqvae", help="authors' checkpoint: the tokenizer checkpoint (default: the copy inside the checkpoint)"
    )
    conv.add_argument(
        "--codes-map",
        help="authors' checkpoint: the used-codes statistics file (help_folder/statistics/taming_vqvae_*.pt)",
    )
    conv.add_argument(
        "--tokenizer",
        help="authors' text model: a CLIPTokenizer folder or OpenAI's bpe_simple_vocab_16e6.txt.gz",
    )
    conv.add_argument("--no-ema", action="store_true", help="authors' checkpoint: use the raw weights, not the EMA")

    conv.set_defaults(run=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..io import check_output_path
    from ..pipeline import VQDiffusionPipeline

    out = check_output_path(args.out_dir, folder=True, what="output directory")
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"{out} exists and is not empty; choose a new output directory")
    src = Path(args.src)
    authors_flags = [
        f"--{n.replace('_', '-')}" for n in ("config", "vqvae", "codes_map", "tokenizer") if getattr(args, n)
    ]
    if src.is_file():
        if not args.config:
            raise CLIError(f"{src} is a checkpoint file: give --config, the authors' YAML it was trained with")
        from ..convert.authors import convert_authors_checkpoint, write_authors_conversion

        conversion = convert_authors_checkpoint(
            src,
            args.config,
            vqvae=args.vqvae,
            codes_map=args.codes_map,
            tokenizer=args.tokenizer,
            use_ema=not args.no_ema,
        )
        print(write_authors_conversion(conversion, out, to=args.to))
        return 0
    if authors_flags or args.no_ema:
        raise CLIError(f"{' '.join(authors_flags) or '--no-ema'} only apply to an authors' checkpoint file, not {src}")
    pipe = VQDiffusionPipeline.from_pretrained(args.src)
    if args.to == "diffusers":
        from ..formats.diffusers import save_diffusers

        save_diffusers(pipe.components, out)
    else:
        pipe.save_pretrained(out)
    print(out)
    return 0
