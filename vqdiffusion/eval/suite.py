"""Evaluation suites: generate images for prompt sets with a pipeline and score them.

The ``shapes`` suite prompts a model with the canonical captions of the three prompt sets of
:mod:`vqdiffusion.data.shapes` (single objects of seen colour-shape pairs, two objects, held-out pairs),
detects what was drawn with :func:`vqdiffusion.eval.shapes.detect`, and reports the fraction of images with
every stated attribute right (with its 95% Wilson interval) plus per-attribute accuracies, all under the strict
shape rule (a square with rounded-off corners or a blob is no square), and the fully-correct rate under the
lenient rule of earlier reports (``lenient_fully_correct``) for comparison.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..data.shapes import PROMPT_SETS, canonical_caption, prompt_set
from ..io import atomic_write_text, atomic_write_with, check_output_path
from .shapes import evaluate
from .stats import format_rate
from .tokenizer import denoiser_x0_entropy, tokenizer_diagnostics, tokenizer_psnr, tokenizer_shape_ceiling


def evaluate_shapes(
    pipe: Any,
    *,
    num_per_set: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    sets: tuple[str, ...] = PROMPT_SETS,
    progress: bool = True,
    diagnostics: bool = True,
    tokenizer_ceiling: bool = False,
    **sampling: Any,
) -> dict[str, Any]:
    """Run the shapes suite with ``pipe`` (a :class:`~vqdiffusion.VQDiffusionPipeline`).

    ``sampling`` is passed to the pipeline call (``num_inference_steps``, ``guidance_scale``, ...).
    Returns ``{"sets": {name: summary}, "seconds_per_image": float, "samples": {name: [PIL images]},
    "tokenizer_psnr": {...}}`` (see :func:`~vqdiffusion.eval.tokenizer.tokenizer_psnr`); the samples are the
    first 16 images of each set (for a grid).  With ``diagnostics`` also ``"tokenizer"``
    (:func:`~vqdiffusion.eval.tokenizer.tokenizer_diagnostics`, whose PSNR is ``"tokenizer_psnr"``) and
    ``"denoiser_x0_entropy"`` (:func:`~vqdiffusion.eval.tokenizer.denoiser_x0_entropy`).  With
    ``tokenizer_ceiling`` also ``"tokenizer_ceiling"``, the suite's score of the tokenizer's reconstructions of
    the same scenes (:func:`~vqdiffusion.eval.tokenizer.tokenizer_shape_ceiling`).
    """
    if num_per_set < 1 or batch_size < 1:
        raise ValueError(f"num_per_set and batch_size must be >= 1, got {num_per_set}, {batch_size}")
    report: dict[str, Any] = {"sets": {}, "samples": {}, "settings": dict(sampling)}
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    total_images, start = 0, time.perf_counter()
    for name in sets:
        scenes = prompt_set(name, num_per_set, seed)
        images = []
        for i in range(0, len(scenes), batch_size):
            prompts = [canonical_caption(scene) for scene in scenes[i : i + batch_size]]
            images += pipe(prompts, generator=generator, output_type="pil", progress=progress, **sampling).images
        report["sets"][name] = evaluate(images, scenes)
        report["samples"][name] = images[:16]
        total_images += len(images)
    report["seconds_per_image"] = (time.perf_counter() - start) / total_images
    if diagnostics:
        report["tokenizer"] = tokenizer_diagnostics(pipe.vqvae, psnr_images=num_per_set, seed=seed)
        report["tokenizer_psnr"] = report["tokenizer"]["psnr"]
        report["denoiser_x0_entropy"] = denoiser_x0_entropy(pipe, seed=seed)
    else:
        report["tokenizer_psnr"] = tokenizer_psnr(pipe.vqvae, num_images=num_per_set, seed=seed)
    if tokenizer_ceiling:
        report["tokenizer_ceiling"] = tokenizer_shape_ceiling(
            pipe.vqvae, num_images_per_set=num_per_set, seed=seed, sets=sets
        )
    return report


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` (without images) and ``samples.png`` (one row of 8 per set) to ``out_dir``."""
    from ..pipeline import make_grid

    out = Path(out_dir)
    check_output_path(out, folder=True)
    json_path = out / "report.json"
    data = {k: v for k, v in report.items() if k != "samples"}
    atomic_write_text(json_path, json.dumps(data, indent=2) + "\n")
    rows = [images[:8] for images in report["samples"].values()]
    tiles = [image for row in rows for image in row + [row[-1].copy()] * (8 - len(row))]
    grid_path = out / "samples.png"
    atomic_write_with(grid_path, make_grid(tiles, columns=8).save)
    return json_path, grid_path


def format_table(report: dict[str, Any]) -> str:
    """A markdown table: one row per prompt set; fully correct with its 95% Wilson interval, under the strict
    shape rule and (where the report has it) the lenient one of earlier reports."""
    lines = [
        "| prompt set | n | fully correct | shape | color | size | position | count | fully correct, lenient rule |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["sets"].items():
        n = int(s["n"])
        lenient = format_rate(round(s["lenient_fully_correct"] * n), n) if "lenient_fully_correct" in s else "-"
        lines.append(
            f"| {name} | {n} | {format_rate(round(s['fully_correct'] * n), n)} | {s['shape']:.1%} | "
            f"{s['color']:.1%} | {s['size']:.1%} | {s['position']:.1%} | {s['count']:.1%} | {lenient} |"
        )
    return "\n".join(lines)
