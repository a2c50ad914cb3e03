"""Evaluation suites: generate images for prompt sets with a pipeline and score them.

The ``shapes`` suite prompts a model with the canonical captions of the three prompt sets of
:mod:`vqdiffusion.data.shapes` (single objects of seen colour-shape pairs, two objects, held-out pairs),
detects what was drawn with :func:`vqdiffusion.eval.shapes.detect`, and reports the fraction of images with
every stated attribute right plus per-attribute accuracies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.shapes import PROMPT_SETS, canonical_caption, prompt_set, render
from ..io import atomic_write_text, atomic_write_with, check_output_path
from .shapes import evaluate

# Renders for the tokenizer check use a seed offset, so they are not the training images of a data set
# made with the same seed.
_RENDER_SEED_OFFSET = 1_000_003


@torch.no_grad()
def tokenizer_psnr(vqvae: Any, *, num_images: int = 256, seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Mean per-image PSNR (dB, peak 1 on [0, 1]) of the VQ tokenizer's reconstructions of fresh renders.

    Two sets of ``num_images`` renders: ``"seen_pairs"`` (one or two objects of training colour-shape pairs,
    as the ``single_seen``/``two_objects`` prompt sets) and ``"heldout_pairs"`` (held-out pairs).  The
    reconstruction is quantised to 8 bits, as a saved image is.
    """
    device = next(vqvae.parameters()).device
    rng = np.random.default_rng(seed + _RENDER_SEED_OFFSET)
    half = num_images // 2
    sets = {
        "seen_pairs": prompt_set("single_seen", num_images - half, seed) + prompt_set("two_objects", half, seed),
        "heldout_pairs": prompt_set("heldout", num_images, seed),
    }
    out: dict[str, float] = {}
    for name, scenes in sets.items():
        values = []
        for i in range(0, len(scenes), batch_size):
            pixels = np.stack(
                [np.asarray(render(scene, rng), dtype=np.float32) / 255.0 for scene in scenes[i : i + batch_size]]
            )
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)
            recon = (vqvae.decode_tokens(vqvae.encode(images * 2 - 1).to(device)).float() + 1) / 2
            recon = (recon.clamp(0, 1) * 255).round() / 255
            mse = (recon - images).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
            values.append(-10.0 * torch.log10(mse))
        out[name] = float(torch.cat(values).mean())
    return out


def evaluate_shapes(
    pipe: Any,
    *,
    num_per_set: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    sets: tuple[str, ...] = PROMPT_SETS,
    progress: bool = True,
    **sampling: Any,
) -> dict[str, Any]:
    """Run the shapes suite with ``pipe`` (a :class:`~vqdiffusion.VQDiffusionPipeline`).

    ``sampling`` is passed to the pipeline call (``num_inference_steps``, ``guidance_scale``, ...).
    Returns ``{"sets": {name: summary}, "seconds_per_image": float, "samples": {name: [PIL images]},
    "tokenizer_psnr": {...}}`` (see :func:`tokenizer_psnr`); the samples are the first 16 images of each set
    (for a grid).
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
    report["tokenizer_psnr"] = tokenizer_psnr(pipe.vqvae, num_images=num_per_set, seed=seed)
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
    """A markdown table: one row per prompt set."""
    lines = [
        "| prompt set | n | fully correct | shape | color | size | position | count |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["sets"].items():
        lines.append(
            f"| {name} | {int(s['n'])} | {s['fully_correct']:.1%} | {s['shape']:.1%} | {s['color']:.1%} | "
            f"{s['size']:.1%} | {s['position']:.1%} | {s['count']:.1%} |"
        )
    return "\n".join(lines)
