"""``vqdiffusion eval`` (score a model on an evaluation suite) and ``vqdiffusion make-shapes`` (the synthetic
shapes data set)."""

from __future__ import annotations

import argparse
from typing import Any

from .errors import CLIError
from .generate import DEFAULT_MODEL
from .sampling_flags import add_sampling_arguments, sampling_arguments


def add_eval_parser(sub: Any) -> None:
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
    ev.set_defaults(run=cmd_eval)


def add_make_shapes_parser(sub: Any) -> None:
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
    shapes.set_defaults(run=cmd_make_shapes)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.n < 1 or args.batch_size < 1:
        raise CLIError(f"--n and --batch-size must be >= 1, got {args.n}, {args.batch_size}")
    sampling = sampling_arguments(args)
    from ..eval.suite import evaluate_shapes, format_table, write_report
    from ..pipeline import VQDiffusionPipeline

    pipe = VQDiffusionPipeline.from_pretrained(args.model, device=args.device)
    report = evaluate_shapes(
        pipe,
        num_per_set=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
        **sampling,
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
    from ..data.shapes import make_dataset

    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if not 0.0 <= args.two_object_fraction <= 1.0:
        raise CLIError(f"--two-object-fraction must be in [0, 1], got {args.two_object_fraction}")
    print(make_dataset(args.out_dir, args.n, args.seed, split=args.split, two_object_fraction=args.two_object_fraction))
    return 0
