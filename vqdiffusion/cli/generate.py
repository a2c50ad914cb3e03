"""``vqdiffusion generate`` (images from a prompt) and ``vqdiffusion info`` (a model's configuration)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

from .arg_types import seed
from .errors import CLIError
from .sampling_flags import add_sampling_arguments, check_condition_flags, sampling_arguments

DEFAULT_MODEL = "builtin:shapes"  # vqdiffusion.pipeline.DEFAULT_MODEL (kept here so --help imports no torch)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def add_generate_parser(sub: Any) -> None:
    gen = sub.add_parser("generate", help="generate images from a text prompt")
    add_condition_arguments(gen)
    add_model_arguments(gen)
    add_sampling_arguments(gen, conditions=True)
    add_run_arguments(gen, default_output="vqdiffusion.png")

    gen.set_defaults(run=cmd_generate)


def add_condition_arguments(parser: argparse.ArgumentParser) -> None:
    """The positional prompt (optional: none for class-conditional or unconditional models) and ``--class-label``."""
    parser.add_argument(
        "prompt", nargs="?", default=None, help="the text prompt (none for class-conditional or unconditional models)"
    )
    parser.add_argument(
        "--class-label",
        type=int,
        default=None,
        help="class-conditional models (e.g. ImageNet): the class label to generate, instead of a prompt",
    )


def add_run_arguments(parser: argparse.ArgumentParser, default_output: str) -> None:
    """``--seed``, ``--num-images``, ``--batch-size``, ``--output``, ``--device``, ``--bf16`` and ``--quiet``."""
    parser.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    parser.add_argument("--num-images", type=int, default=1, help="number of images (default 1)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per sampling run (default: all at once, or as many as fit in free memory)",
    )
    parser.add_argument(
        "--output",
        default=default_output,
        help=f"an image file (several images make one grid) or a directory (numbered files); default {default_output}",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--bf16", action="store_true", help="run the denoiser in bfloat16")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_info_parser(sub: Any) -> None:
    info = sub.add_parser("info", help="print a model's configuration and parameter counts")
    info.add_argument("model", help="model directory, built-in model or Hugging Face Hub id (org/name)")
    add_hub_arguments(info)

    info.set_defaults(run=cmd_info)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (a folder, a built-in model or a Hub id) and the Hub flags."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=(
            "model directory (vqdiffusion or diffusers layout), a built-in model or a Hugging Face Hub id such as "
            f"microsoft/vq-diffusion-ithq (default {DEFAULT_MODEL})"
        ),
    )
    add_hub_arguments(parser)


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of Hugging Face Hub ids (``VQDiffusionPipeline.from_pretrained``'s keywords)."""
    parser.add_argument("--revision", default=None, help="Hub ids: branch, tag or commit (default main; fp16: half)")
    parser.add_argument("--cache-dir", default=None, help="Hub ids: the Hugging Face cache (default the user's)")
    parser.add_argument(
        "--local-files-only",
        action="store_true",
        help="Hub ids: use the cache only, never download (also: HF_HUB_OFFLINE=1)",
    )
    parser.add_argument(
        "--variant", default=None, help="aMUSEd models: the weights variant, e.g. fp16 (<stem>.fp16.safetensors)"
    )


def hub_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Hub flags as ``from_pretrained`` keywords."""
    options = {"revision": args.revision, "cache_dir": args.cache_dir, "local_files_only": args.local_files_only}
    if getattr(args, "variant", None) is not None:
        options["variant"] = args.variant
    return options


def _output_kind(args: argparse.Namespace) -> str:
    """How ``--output`` is written, checked before anything is computed: ``"file"`` (one image or a grid),
    ``"device"`` (an existing device or pipe such as /dev/stdout: one PNG written to it directly) or
    ``"folder"`` (numbered files)."""
    from ..io import check_output_path, is_stream

    if not args.output.strip():
        raise CLIError("--output is empty; give a file name ending in .png (one image or a grid) or a folder")
    out = Path(args.output)
    if is_stream(out):
        return "device"
    if out.suffix:
        if out.suffix.lower() not in IMAGE_SUFFIXES:
            raise CLIError(f"--output {out}: unsupported image type {out.suffix!r} (use .png or a directory)")
        check_output_path(out, what="--output")
        return "file"
    if out.is_file():
        raise CLIError(
            f"--output {out} is an existing file without an image suffix; give a name ending in .png (one image or "
            "a grid) or a folder (numbered files)"
        )
    check_output_path(out, folder=True, what="--output")
    return "folder"


def check_generate_args(args: argparse.Namespace) -> str:
    if args.prompt is not None and not args.prompt.strip():
        command = getattr(args, "command", None) or "generate"
        raise CLIError(f'the prompt is empty; give a text prompt, e.g. vqdiffusion {command} "a red circle" ...')
    if args.prompt is not None and args.class_label is not None:
        raise CLIError("give a prompt (text models) or --class-label (class-conditional models), not both")
    from ..models.conditions import check_prompt_text  # bytes that are not UTF-8, before the model is read

    check_prompt_text(args.prompt)
    if args.num_images < 1:
        raise CLIError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    return _output_kind(args)


def cmd_generate(args: argparse.Namespace) -> int:
    kind = check_generate_args(args)
    sampling = sampling_arguments(args)
    pipe, condition, generator = load_for_sampling(args, kind)
    result = pipe(
        condition,
        num_images_per_prompt=args.num_images,
        generator=generator,
        progress=not args.quiet,
        batch_size=args.batch_size,
        **sampling,
    )
    write_images(result.images, kind, args.output)
    return 0


def load_for_sampling(args: argparse.Namespace, kind: str) -> tuple[Any, str | list[int] | None, Any]:
    """The model of ``--model`` on ``--device`` (``--bf16``), the pipeline's condition for the prompt /
    ``--class-label`` flags and a generator seeded with ``--seed``; the micro-condition flags (the model must
    have micro-conditions), ``--steps`` and, for a grid file
    (``kind``, see :func:`_output_kind`), the grid's size are checked against the model before sampling."""
    import torch

    from ..devices import resolve_device
    from ..pipeline import VQDiffusionPipeline, check_grid_size

    device = resolve_device(args.device)
    pipe = VQDiffusionPipeline.from_pretrained(args.model, **hub_options(args))
    pipe.to(device, torch.bfloat16 if args.bf16 else None)
    check_condition_flags(pipe, args)
    condition = _condition(pipe, args)
    steps = args.num_inference_steps
    if steps is not None and steps > pipe.schedule.num_timesteps:
        raise CLIError(f"--steps must be in [1, {pipe.schedule.num_timesteps}] for this model, got {steps}")
    if kind == "file" and args.num_images > 1:  # before sampling: the grid must be an image one can write
        cfg, factor = pipe.denoiser.config, pipe.vqvae.config.downsample_factor
        check_grid_size(args.num_images, cfg.width * factor, cfg.height * factor)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return pipe, condition, generator


def write_images(images: list[Any], kind: str, output: str) -> list[Path]:
    """Write PIL ``images`` to ``--output`` as :func:`_output_kind` decided (each file atomically) and print
    the paths written."""
    from ..io import atomic_write_with, write_stream_bytes
    from ..pipeline import make_grid

    out = Path(output)
    if kind == "folder":
        written = []
        for i, image in enumerate(images):
            written.append(atomic_write_with(out / f"{i:04d}.png", image.save))
    else:
        image = images[0] if len(images) == 1 else make_grid(images)
        if kind == "device":  # a pipe cannot seek: the PNG is encoded in memory, then written in one go
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return [write_stream_bytes(out, buffer.getvalue())]  # no path printed: it may be the image's stream
        written = [atomic_write_with(out, image.save)]
    for path in written:
        print(path)
    return written


def _condition(pipe: Any, args: argparse.Namespace) -> str | list[int] | None:
    """The pipeline's first argument for the model's condition kind: the prompt (text), ``[--class-label]``
    (class-conditional) or None (unconditional); CLIError when the flags do not fit the model."""
    kind = pipe.condition_kind
    if kind == "text":
        if args.prompt is None:
            hint = " (--class-label is for class-conditional models)" if args.class_label is not None else ""
            raise CLIError(f'this model is text-conditional: give a prompt, e.g. "a red circle"{hint}')
        return args.prompt
    if kind == "class":
        n = pipe.num_class_labels
        if args.prompt is not None or args.class_label is None:
            raise CLIError(f"this model is class-conditional: give --class-label N, N in [0, {n}), not a prompt")
        if not 0 <= args.class_label < n:
            raise CLIError(f"--class-label must be in [0, {n}) for this model, got {args.class_label}")
        return [args.class_label]
    if args.prompt is not None or args.class_label is not None:
        raise CLIError("this model is unconditional: it takes no prompt and no --class-label (use --num-images)")
    return None


def cmd_info(args: argparse.Namespace) -> int:
    from ..formats.ours import read_history
    from ..models.conditions import ConditionKind
    from ..pipeline import VQDiffusionPipeline, resolve_model_path

    pipe = VQDiffusionPipeline.from_pretrained(args.model, **hub_options(args))
    history = read_history(resolve_model_path(args.model, **hub_options(args)))
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
            "pad_token_id": getattr(pipe.text_encoder, "pad_token_id", pipe.text_encoder.tokenizer.pad_token_id),
        },
        "null_condition": (
            ("learned" if pipe.null_condition is not None else "empty prompt")
            if pipe.condition_kind == ConditionKind.TEXT
            else pipe.null_class_label
        ),
        "defaults": pipe.defaults.to_dict(),
        "parameters": {**counts, "total": sum(counts.values())},
        "training_history": history,  # one entry per training stage (history.json), oldest first
    }
    print(json.dumps(report, indent=2))
    return 0
