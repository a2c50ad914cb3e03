"""Command line: ``vqdiffusion generate`` and ``vqdiffusion info``.

Bad input ends with a one-line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError

USAGE_ERROR = 2
DEFAULT_MODEL = "builtin:shapes"  # vqdiffusion.pipeline.DEFAULT_MODEL (kept here so --help imports no torch)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class CLIError(Exception):
    """A user error reported as one line with exit code 2."""


# flag -> (pipeline keyword, type, help); every knob of vqdiffusion.sampling.SamplingOptions
SAMPLING_FLAGS: dict[str, tuple[str, type, str]] = {
    "--steps": ("num_inference_steps", int, "sampling steps, 1..T"),
    "--guidance": ("guidance_scale", float, "classifier-free guidance scale (1 = off, one pass per step)"),
    "--truncation": ("truncation_rate", float, "truncation rate in (0, 1] (1 = off)"),
    "--sampler": ("sampler", str, "ancestral, uniform or purity (high-quality inference, Improved VQ-Diffusion)"),
    "--prior-weight": ("prior_weight", float, "r of the purity sampler, >= 0"),
    "--spacing": ("spacing", str, "step indices: uniform or quadratic"),
    "--temperature": ("temperature", float, "temperature of p(x0 | x_t), > 0"),
    "--tokens-per-call": ("tokens_per_call", int, "budget samplers: positions filled per model call"),
}


def add_sampling_arguments(parser: argparse.ArgumentParser, default_text: str = "the model's") -> None:
    """Add the sampling flags (all default to None: ``default_text``)."""
    choices = {"--sampler": ["ancestral", "uniform", "purity"], "--spacing": ["uniform", "quadratic"]}
    for flag, (dest, kind, text) in SAMPLING_FLAGS.items():
        text = f"{text} (default: {default_text})"
        parser.add_argument(flag, dest=dest, type=kind, default=None, choices=choices.get(flag), help=text)


def sampling_arguments(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags that were given, as pipeline keywords."""
    return {dest: getattr(args, dest) for dest, _, _ in SAMPLING_FLAGS.values() if getattr(args, dest) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqdiffusion", description="VQ-Diffusion text-to-image synthesis")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images from a text prompt")
    gen.add_argument("prompt", help="the text prompt")
    gen.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model directory (vqdiffusion or diffusers layout) or a built-in model (default {DEFAULT_MODEL})",
    )
    add_sampling_arguments(gen)
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--num-images", type=int, default=1, help="number of images (default 1)")
    gen.add_argument(
        "--output",
        default="vqdiffusion.png",
        help="an image file (several images become one grid) or a directory (numbered files)",
    )
    gen.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    gen.add_argument("--bf16", action="store_true", help="run the denoiser in bfloat16")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    info = sub.add_parser("info", help="print a model's configuration and parameter counts")
    info.add_argument("model", help="model directory")

    shapes = sub.add_parser("make-shapes", help="write the synthetic shapes data set (image + caption folder)")
    shapes.add_argument("out_dir", help="output folder")
    shapes.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    shapes.add_argument(
        "--split",
        default="train",
        choices=["train", "heldout", "all"],
        help="train: held-out colour-shape pairs excluded; heldout: only those pairs",
    )
    shapes.add_argument("--two-object-fraction", type=float, default=0.3, help="fraction of two-object scenes")

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

    ev = sub.add_parser("eval", help="score a model on an evaluation suite (shapes)")
    ev.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model directory or built-in model (default {DEFAULT_MODEL})"
    )
    ev.add_argument("--suite", default="shapes", choices=["shapes"], help="evaluation suite (default shapes)")
    ev.add_argument("--n", type=int, default=256, help="images per prompt set (default 256)")
    add_sampling_arguments(ev)
    ev.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    ev.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ev.add_argument("--out", default="eval_shapes", help="folder for report.json and samples.png")
    ev.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    from .training.denoiser import add_train_parser
    from .training.export import add_export_parser
    from .training.tokenize import add_tokenize_parser
    from .training.vqvae import add_train_vqvae_parser

    add_train_vqvae_parser(sub)
    add_tokenize_parser(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    return parser


def _check_generate_args(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise CLIError('the prompt is empty; give a text prompt, e.g. vqdiffusion generate "a red circle"')
    if args.num_images < 1:
        raise CLIError(f"--num-images must be >= 1, got {args.num_images}")
    _check_sampling_args(args)
    out = Path(args.output)
    if out.suffix and out.suffix.lower() not in IMAGE_SUFFIXES:
        raise CLIError(f"--output {out}: unsupported image type {out.suffix!r} (use .png or a directory)")


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Range checks that need no model (the pipeline checks the rest, e.g. --steps against T)."""
    if args.truncation_rate is not None and not 0.0 < args.truncation_rate <= 1.0:
        raise CLIError(f"--truncation must be in (0, 1], got {args.truncation_rate}")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        raise CLIError(f"--guidance must be >= 0, got {args.guidance_scale}")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.num_inference_steps}")
    if args.prior_weight is not None and not args.prior_weight >= 0:
        raise CLIError(f"--prior-weight must be >= 0, got {args.prior_weight}")
    if args.temperature is not None and not args.temperature > 0:
        raise CLIError(f"--temperature must be > 0, got {args.temperature}")
    if args.tokens_per_call is not None and args.tokens_per_call < 1:
        raise CLIError(f"--tokens-per-call must be >= 1, got {args.tokens_per_call}")


def cmd_generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)
    import torch

    from .pipeline import VQDiffusionPipeline, make_grid

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but CUDA is not available")
    pipe = VQDiffusionPipeline.from_pretrained(args.model)
    pipe.to(args.device, torch.bfloat16 if args.bf16 else None)
    steps = args.num_inference_steps
    if steps is not None and steps > pipe.schedule.num_timesteps:
        raise CLIError(f"--steps must be in [1, {pipe.schedule.num_timesteps}] for this model, got {steps}")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    result = pipe(
        args.prompt,
        num_images_per_prompt=args.num_images,
        generator=generator,
        progress=not args.quiet,
        **sampling_arguments(args),
    )
    out = Path(args.output)
    if out.suffix:
        out.parent.mkdir(parents=True, exist_ok=True)
        image = result.images[0] if len(result.images) == 1 else make_grid(result.images)
        image.save(out)
        written = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, image in enumerate(result.images):
            path = out / f"{i:04d}.png"
            image.save(path)
            written.append(path)
    for path in written:
        print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .pipeline import VQDiffusionPipeline

    pipe = VQDiffusionPipeline.from_pretrained(args.model)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.modules().items()}
    report = {
        "model": str(args.model),
        "schedule": pipe.schedule.to_dict(),
        "denoiser": pipe.denoiser.config.to_dict(),
        "vqvae": pipe.vqvae.config.to_dict(),
        "condition": pipe.condition_kind,
        "text_encoder": None
        if pipe.text_encoder is None
        else {
            "hidden_size": pipe.text_encoder.hidden_size,
            "max_length": pipe.text_encoder.max_length,
            "pad_token_id": pipe.text_encoder.pad_token_id,
        },
        "null_condition": (
            ("learned" if pipe.null_condition is not None else "empty prompt")
            if pipe.condition_kind == "text"
            else pipe.null_class_label
        ),
        "defaults": pipe.defaults.to_dict(),
        "parameters": {**counts, "total": sum(counts.values())},
    }
    print(json.dumps(report, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .pipeline import VQDiffusionPipeline

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"{out} exists and is not empty; choose a new output directory")
    src = Path(args.src)
    authors_flags = [
        f"--{n.replace('_', '-')}" for n in ("config", "vqvae", "codes_map", "tokenizer") if getattr(args, n)
    ]
    if src.is_file():
        if not args.config:
            raise CLIError(f"{src} is a checkpoint file: give --config, the authors' YAML it was trained with")
        from .convert.authors import convert_authors_checkpoint, write_authors_conversion

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
        from .convert.diffusers_pipeline import save_diffusers_layout

        save_diffusers_layout(pipe, out)
    else:
        pipe.save_pretrained(out)
    print(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.n < 1 or args.batch_size < 1:
        raise CLIError(f"--n and --batch-size must be >= 1, got {args.n}, {args.batch_size}")
    _check_sampling_args(args)
    from .eval.suite import evaluate_shapes, format_table, write_report
    from .pipeline import VQDiffusionPipeline

    pipe = VQDiffusionPipeline.from_pretrained(args.model, device=args.device)
    report = evaluate_shapes(
        pipe,
        num_per_set=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
        **sampling_arguments(args),
    )
    json_path, grid_path = write_report(report, args.out)
    print(format_table(report))
    print(f"seconds per image: {report['seconds_per_image']:.3f}")
    psnr = report["tokenizer_psnr"]
    print("tokenizer PSNR on fresh renders: " + ", ".join(f"{k} {v:.2f} dB" for k, v in psnr.items()))
    print(json_path)
    print(grid_path)
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from .data.shapes import make_dataset

    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if not 0.0 <= args.two_object_fraction <= 1.0:
        raise CLIError(f"--two-object-fraction must be in [0, 1], got {args.two_object_fraction}")
    print(make_dataset(args.out_dir, args.n, args.seed, split=args.split, two_object_fraction=args.two_object_fraction))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .training.denoiser import run_train
    from .training.export import run_export
    from .training.tokenize import run_tokenize
    from .training.vqvae import run_train_vqvae

    commands = {
        "generate": cmd_generate,
        "info": cmd_info,
        "eval": cmd_eval,
        "convert": cmd_convert,
        "make-shapes": cmd_make_shapes,
        "train-vqvae": run_train_vqvae,
        "tokenize": run_tokenize,
        "train": run_train,
        "export": run_export,
    }
    try:
        return commands[args.command](args)
    except (
        CLIError,
        ConfigError,
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        FloatingPointError,
    ) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
