"""``vqdiffusion eval`` (the suites: ``shapes`` and ``inpaint`` score a model; ``fid`` and ``clipscore`` score a folder
of samples)
and ``vqdiffusion make-shapes`` (the synthetic shapes data set)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .arg_types import seed
from .errors import CLIError
from .generate import DEFAULT_MODEL
from .sampling_flags import add_sampling_arguments, sampling_arguments

SUITES = ["shapes", "inpaint", "fid", "clipscore"]
BATCH_SIZES = {"shapes": 16, "inpaint": 16, "fid": 50, "clipscore": 32}
# --n of the model suites: images per prompt set (shapes), scenes (inpaint).
DEFAULT_N = {"shapes": 256, "inpaint": 64}
# The most --n of the model suites: every image is generated, so more cannot finish in any reasonable time.
MAX_EVAL_N = 100_000
N_UNITS = {"shapes": "images per prompt set", "inpaint": "scenes"}
# The most KID subsets (clean-fid and torch-fidelity use 100; each one is a kernel over --kid-subset-size images).
MAX_KID_SUBSETS = 10_000
# The flags each suite requires.
REQUIRED = {"fid": ("samples", "reference", "inception_weights"), "clipscore": ("samples", "clip")}


def add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="score a model or a folder of samples (suites: shapes, inpaint, fid, clipscore)",
        description="shapes: generate with --model and score text faithfulness on the synthetic shapes prompts. "
        "inpaint: with --model, regenerate one object of two-object shapes scenes (replaced by another, or "
        "restored) and score the edit and what it should keep. "
        "fid: FID (and KID, IS) of --samples against --reference with a local --inception-weights file. "
        "clipscore: CLIP score of the captioned images in --samples with a local --clip model folder.",
    )
    ev.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"shapes, inpaint: model directory or built-in model (default {DEFAULT_MODEL})",
    )
    ev.add_argument("--suite", default="shapes", choices=SUITES, help="evaluation suite (default shapes)")
    ev.add_argument(
        "--n", type=int, default=None, help="shapes: images per prompt set (default 256); inpaint: scenes (default 64)"
    )
    ev.add_argument(
        "--known-tokens",
        default="renoise,clean",
        help="inpaint: comma-separated known-token modes, renoise and/or clean (default renoise,clean)",
    )
    ev.add_argument(
        "--tokenizer-ceiling",
        action="store_true",
        help="shapes: also score the tokenizer's reconstructions of the same scenes (the most a generator can reach)",
    )
    add_sampling_arguments(ev)
    ev.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default: shapes 16, fid 50, clipscore 32)"
    )
    ev.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="random seed (shapes and inpaint scenes and sampling; KID subsets, IS splits)",
    )
    ev.add_argument("--out", default=None, help="folder for report.json (default eval_SUITE)")
    ev.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    images = ev.add_argument_group("fid and clipscore")
    images.add_argument("--samples", metavar="DIR", help="folder of generated images (e.g. from sample-set)")
    images.add_argument("--reference", metavar="DIR_OR_NPZ", help="fid: folder of real images or saved statistics")
    images.add_argument(
        "--inception-weights",
        metavar="FILE",
        help="fid: local Inception file: inception-2015-12-05.pt (TorchScript) or pt_inception-2015-12-05-*.pth "
        "(pytorch-fid's state dict, run by our FID Inception-v3 with pytorch-fid's resizing)",
    )
    images.add_argument("--save-reference-stats", metavar="FILE.npz", help="fid: save the reference statistics")
    images.add_argument("--kid", action="store_true", help="fid: also KID (saved statistics then hold the features)")
    images.add_argument("--isc", action="store_true", help="fid: also the Inception Score of the samples")
    images.add_argument("--kid-subsets", type=int, default=100, help="fid: KID subsets (default 100)")
    images.add_argument("--kid-subset-size", type=int, default=1000, help="fid: images per KID subset (default 1000)")
    images.add_argument("--isc-splits", type=int, default=10, help="fid: Inception Score splits (default 10)")
    images.add_argument("--clip", metavar="DIR", help="clipscore: local CLIP model folder (transformers layout)")
    images.add_argument(
        "--clip-prefix", default="", help='clipscore: text put before each caption (Hessel et al.: "A photo depicts ")'
    )
    ev.set_defaults(run=cmd_eval)


def add_make_shapes_parser(sub: Any) -> None:
    shapes = sub.add_parser("make-shapes", help="write the synthetic shapes data set (image + caption folder)")
    shapes.add_argument("out_dir", help="output folder")
    shapes.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    shapes.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    shapes.add_argument(
        "--split",
        default="train",
        choices=["train", "heldout", "all"],
        help="train: held-out colour-shape pairs excluded; heldout: only those pairs",
    )
    shapes.add_argument("--two-object-fraction", type=float, default=0.3, help="fraction of two-object scenes")
    shapes.add_argument("--overwrite", action="store_true", help="replace the data set in an OUT_DIR that is not empty")
    shapes.set_defaults(run=cmd_make_shapes)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.batch_size is None:
        args.batch_size = BATCH_SIZES[args.suite]
    if args.out is None:
        args.out = f"eval_{args.suite}"
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.tokenizer_ceiling and args.suite != "shapes":
        raise CLIError(f"--tokenizer-ceiling applies to --suite shapes, not {args.suite}; leave it out")
    for dest in REQUIRED.get(args.suite, ()):
        if getattr(args, dest) is None:
            raise CLIError(f"--suite {args.suite} needs --{dest.replace('_', '-')}")
    from ..devices import resolve_device
    from ..io import check_output_path

    resolve_device(args.device)  # every suite: before anything is loaded or computed
    check_output_path(args.out, folder=True, what="--out")
    if args.suite == "fid":
        return _eval_fid(args)
    if args.suite == "clipscore":
        return _eval_clipscore(args)
    if args.n is None:
        args.n = DEFAULT_N[args.suite]
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if args.n > MAX_EVAL_N:
        raise CLIError(
            f"--n must be at most {MAX_EVAL_N}, got {args.n} ({N_UNITS[args.suite]}, each one generated: more could "
            "not finish in reasonable time); ask for fewer"
        )
    if args.suite == "inpaint":
        return _eval_inpaint(args)
    sampling = sampling_arguments(args)
    from ..eval.suite import evaluate_shapes, format_table, write_report
    from ..eval.tokenizer import format_shape_ceiling, format_tokenizer_diagnostics, format_x0_entropy
    from ..pipeline import VQDiffusionPipeline

    pipe = VQDiffusionPipeline.from_pretrained(args.model, device=args.device)
    report = evaluate_shapes(
        pipe,
        num_per_set=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
        tokenizer_ceiling=args.tokenizer_ceiling,
        **sampling,
    )
    json_path, grid_path = write_report(report, args.out)
    print(format_table(report))
    print(f"seconds per image: {report['seconds_per_image']:.3f}")
    psnr = report["tokenizer_psnr"]
    print("tokenizer PSNR on fresh renders: " + ", ".join(f"{k} {v:.2f} dB" for k, v in psnr.items()))
    print(format_tokenizer_diagnostics(report["tokenizer"]))
    print(format_x0_entropy(report["denoiser_x0_entropy"]))
    if "tokenizer_ceiling" in report:
        print(format_shape_ceiling(report["tokenizer_ceiling"]))
    print(json_path)
    print(grid_path)
    return 0


def known_token_modes(text: str) -> tuple[str, ...]:
    """``--known-tokens`` (comma-separated modes) as a tuple, checked."""
    from ..editing import KNOWN_TOKEN_MODES

    modes = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [m for m in modes if m not in KNOWN_TOKEN_MODES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise CLIError(
            f"--known-tokens must be distinct modes of {', '.join(KNOWN_TOKEN_MODES)}, comma-separated; got {text!r}"
        )
    return modes


def _eval_inpaint(args: argparse.Namespace) -> int:
    modes = known_token_modes(args.known_tokens)
    sampling = sampling_arguments(args)
    import time

    from ..eval.inpaint import evaluate_inpainting, format_inpaint_table, write_inpaint_report
    from ..pipeline import VQDiffusionPipeline

    start = time.perf_counter()
    pipe = VQDiffusionPipeline.from_pretrained(args.model, device=args.device)
    report = evaluate_inpainting(
        pipe, args.n, args.seed, modes, batch_size=args.batch_size, progress=not args.quiet, **sampling
    )
    report["settings"]["model"] = args.model
    report["wall_seconds"] = time.perf_counter() - start
    json_path, figure_path = write_inpaint_report(report, args.out)
    print(format_inpaint_table(report))
    print(
        f"seconds per image: {report['seconds_per_image']:.3f}; wall time {report['wall_seconds']:.1f} s; "
        f"kept object touching the token mask: {report['kept_touches_token_mask']:.1%} of scenes"
    )
    print(json_path)
    print(figure_path)
    return 0


def _write_json(report: dict[str, Any], out: str) -> Path:
    from ..io import atomic_write_text

    return atomic_write_text(Path(out) / "report.json", json.dumps(report, indent=2) + "\n")


def _eval_fid(args: argparse.Namespace) -> int:
    for flag, value in (
        ("--kid-subsets", args.kid_subsets),
        ("--kid-subset-size", args.kid_subset_size),
        ("--isc-splits", args.isc_splits),
    ):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.kid_subsets > MAX_KID_SUBSETS:
        raise CLIError(
            f"--kid-subsets must be at most {MAX_KID_SUBSETS}, got {args.kid_subsets}; KID is stable with 100 "
            "(the default of clean-fid and torch-fidelity)"
        )
    from ..eval.fid import evaluate_fid

    report = evaluate_fid(
        args.samples,
        args.reference,
        args.inception_weights,
        kid=args.kid,
        isc=args.isc,
        batch_size=args.batch_size,
        device=args.device,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        isc_splits=args.isc_splits,
        seed=args.seed,
        save_reference=args.save_reference_stats,
        progress=not args.quiet,
    )
    report["settings"]["manifest"] = _manifest_settings(args.samples)
    metrics = report["metrics"]
    line = f"FID {metrics['fid']:.4f}"
    if "kid_mean" in metrics:
        line += f"  KID {metrics['kid_mean']:.6f} +- {metrics['kid_std']:.6f}"
    if "isc_mean" in metrics:
        line += f"  IS {metrics['isc_mean']:.4f} +- {metrics['isc_std']:.4f}"
    reference = report["reference"]
    print(f"{line}  ({report['samples']['num_images']} samples, reference {reference['num_images']} images)")
    if "saved_to" in reference:
        print(f"reference statistics: {reference['saved_to']}")
    print(_write_json(report, args.out))
    return 0


def _eval_clipscore(args: argparse.Namespace) -> int:
    from ..eval.clipscore import clip_score

    report = clip_score(
        args.samples,
        args.clip,
        batch_size=args.batch_size,
        device=args.device,
        prefix=args.clip_prefix,
        progress=not args.quiet,
    )
    report["settings"]["manifest"] = _manifest_settings(args.samples)
    metrics = report["metrics"]
    print(
        f"CLIP score {metrics['clip_score']:.4f} (w = 2.5; 100 * cos scale: {metrics['clip_score_100']:.2f})  "
        f"({report['samples']['num_images']} images)"
    )
    print(_write_json(report, args.out))
    return 0


def _manifest_settings(folder: str) -> dict[str, Any] | None:
    """The sample-set settings (model, sampling options, seeds) of the folder, for the report."""
    from ..eval.folder import read_manifest

    manifest = read_manifest(folder)
    return None if manifest is None else manifest.get("settings")


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from ..data.shapes import make_dataset

    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if not 0.0 <= args.two_object_fraction <= 1.0:
        raise CLIError(f"--two-object-fraction must be in [0, 1], got {args.two_object_fraction}")
    out = make_dataset(
        args.out_dir,
        args.n,
        args.seed,
        split=args.split,
        two_object_fraction=args.two_object_fraction,
        overwrite=args.overwrite,
    )
    print(out)
    return 0
