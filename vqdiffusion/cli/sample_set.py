"""``vqdiffusion sample-set``: numbered samples and a manifest for evaluation (resumable; under ``torchrun`` the
images are split over the processes)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .arg_types import seed
from .errors import CLIError
from .generate import DEFAULT_MODEL, add_hub_arguments, hub_options
from .sampling_flags import add_sampling_arguments, check_condition_flags, sampling_arguments

if TYPE_CHECKING:
    import torch

    from ..training.distributed import DistributedContext


def add_sample_set_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sample-set",
        help="sample numbered PNGs and a manifest for FID / CLIP score (resumable)",
        description="Image i uses the seed --seed + i and the condition (i // --images-per-prompt) modulo the list, "
        "so a stopped run resumes where it stopped and gives the images of an uninterrupted one. Under "
        "torchrun (python -m torch.distributed.run ... -m vqdiffusion.cli sample-set ...) the missing images are "
        "split over the processes, which give the same files as one process; a rerun may use any number.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model directory, built-in model or Hugging Face Hub id (default {DEFAULT_MODEL})",
    )
    add_hub_arguments(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--prompts", metavar="FILE", help="text models: one caption per line, or COCO-style captions JSON"
    )
    what.add_argument("--class-labels", metavar="LABELS", help="class models: labels, e.g. 0-999 or 1,5,7")
    p.add_argument(
        "--num-images",
        dest="num",
        type=int,
        default=None,
        help="number of images (default: every condition once per --images-per-prompt; "
        "required for unconditional models; larger values cycle through the conditions again). "
        "Was --num, which still works without torchrun (torchrun reads it as its own --numa-binding)",
    )
    p.add_argument("--images-per-prompt", type=int, default=1, help="consecutive images per condition (default 1)")
    p.add_argument(
        "--first-caption-per-image", action="store_true", help="COCO JSON: keep only the first caption of each image"
    )
    p.add_argument("--out", required=True, help="output folder (an existing one is resumed)")
    add_sampling_arguments(p, conditions=True)
    p.add_argument("--seed", type=seed, default=0, help="seed of image 0; image i uses seed + i (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--bf16", action="store_true", help="run the denoiser in bfloat16")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_sample_set)
    return p


def run_sample_set(args: argparse.Namespace) -> int:
    for flag, value in (("--num-images", args.num), ("--images-per-prompt", args.images_per_prompt)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = sampling_arguments(args)
    from ..training.distributed import setup_distributed

    world, device = setup_distributed(args.device)  # under torchrun: this rank's device; before any file is read
    try:
        return _sample(args, sampling, world, device)
    finally:
        world.close()


def _sample(args: argparse.Namespace, sampling: dict[str, Any], world: DistributedContext, device: torch.device) -> int:
    """Read the conditions, load the model on ``device`` and write this rank's part of the set."""
    import torch

    from ..eval.sample_set import parse_labels, read_prompts, write_sample_set
    from ..io import check_output_path
    from ..pipeline import VQDiffusionPipeline

    check_output_path(args.out, folder=True, what="--out")

    conditions: list[str] | list[int] | None = None
    source = None
    if args.prompts is not None:
        conditions = read_prompts(args.prompts, first_caption_per_image=args.first_caption_per_image)
        source = str(args.prompts)
    elif args.class_labels is not None:
        conditions = parse_labels(args.class_labels)
        source = args.class_labels
    pipe = VQDiffusionPipeline.from_pretrained(args.model, **hub_options(args))
    check_condition_flags(pipe, args)
    pipe.to(device, torch.bfloat16 if args.bf16 else None)
    summary = write_sample_set(
        pipe,
        args.out,
        conditions=conditions,
        num=args.num,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        sampling=sampling,
        model=str(args.model),
        conditions_source=source,
        progress=not args.quiet,
        world=world,
    )
    if world.main:
        print(
            f"{summary['out_dir']}: {summary['num']} images ({summary['written']} written, "
            f"{summary['skipped']} already there, {world.world_size} process{'es' if world.world_size > 1 else ''})"
        )
    return 0
