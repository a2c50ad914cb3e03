"""Ablation of the sampling options on a model, scored by the shapes evaluator (not a test).

For each setting the script generates the shapes suite's prompt sets with the same seed and prints one
table row: fully-correct rate per prompt set, their mean, and seconds per image (whole pipeline call on
this machine).  The rows are one-factor sweeps around a base setting (steps x sampler, guidance,
truncation, spacing) plus diffusers' behaviour for fewer steps (steps n-1..0 from all-[MASK], one-step
posteriors; not the trained chain), run with our own loop through explicit step indices.

    python benchmarks/ablation_shapes.py                       # the built-in model, 256 images per set
    python benchmarks/ablation_shapes.py --model DIR --n 64 --json ablation.json --plot ablation.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.data.shapes import PROMPT_SETS, canonical_caption, prompt_set
from vqdiffusion.eval.shapes import evaluate
from vqdiffusion.eval.stats import wilson_interval
from vqdiffusion.sampling import guided_predictor, sample_tokens


def run_setting(pipe: VQDiffusionPipeline, setting: dict[str, Any], n: int, batch_size: int, seed: int) -> dict:
    """Generate and score every prompt set for one setting; ``setting["diffusers_steps"]`` runs the
    diffusers-style chain (steps n-1..0) instead of the pipeline's."""
    generator = torch.Generator().manual_seed(seed)
    scores, images_done, start = {}, 0, time.perf_counter()
    for name in PROMPT_SETS:
        scenes = prompt_set(name, n, seed)
        images = []
        for i in range(0, n, batch_size):
            prompts = [canonical_caption(scene) for scene in scenes[i : i + batch_size]]
            images += generate(pipe, prompts, setting, generator)
        scores[name] = evaluate(images, scenes)["fully_correct"]
        images_done += len(images)
    seconds = (time.perf_counter() - start) / images_done
    return {
        **setting,
        **scores,
        "n": n,
        "mean": sum(scores.values()) / len(scores),
        "seconds_per_image": seconds,
    }


def generate(pipe: VQDiffusionPipeline, prompts: list[str], setting: dict[str, Any], generator) -> list:
    knobs = {k: v for k, v in setting.items() if k not in ("label", "diffusers_steps")}
    if "diffusers_steps" not in setting:
        return pipe(prompts, generator=generator, progress=False, **knobs).images
    options = pipe.sampling_options(**knobs)
    cond = pipe.encode_prompt(prompts)
    null = pipe.null_embeddings(len(prompts)) if options.uses_guidance else None
    cfg = pipe.denoiser.config
    with torch.inference_mode():
        predict = guided_predictor(pipe.denoiser, cond, null, options.guidance_scale)
        steps = list(range(setting["diffusers_steps"] - 1, -1, -1))
        tokens = sample_tokens(
            predict, pipe.schedule, len(prompts), cfg.height * cfg.width, options,
            generator=generator, progress=False, timesteps=steps,
        )  # fmt: skip
        pixels = pipe.decode(tokens.view(len(prompts), cfg.height, cfg.width))
    from vqdiffusion.pipeline import to_output_type

    return to_output_type(pixels, "pil")


def settings(base: dict[str, Any], purity_weight: float) -> list[dict[str, Any]]:
    """The rows: steps x sampler, then guidance, truncation and spacing sweeps, then diffusers' baseline."""
    purity = {"sampler": "purity", "prior_weight": purity_weight}
    ancestral = {"sampler": "ancestral"}
    rows: list[dict[str, Any]] = []
    for steps in (100, 50, 25, 10, 5):
        rows.append({**base, **ancestral, "num_inference_steps": steps, "label": "steps x sampler"})
        rows.append({**base, **purity, "num_inference_steps": steps, "label": "steps x sampler"})
    for guidance in (1.0, 3.0, 5.0):
        for sampler in (ancestral, purity):
            rows.append({**base, **sampler, "num_inference_steps": 25, "guidance_scale": guidance, "label": "guidance"})
    for truncation in (1.0, 0.86):
        for sampler in (ancestral, purity):
            row = {**base, **sampler, "num_inference_steps": 25, "truncation_rate": truncation, "label": "truncation"}
            rows.append(row)
    for steps in (25, 10, 5):
        rows.append({**base, **ancestral, "num_inference_steps": steps, "spacing": "quadratic", "label": "spacing"})
    for steps in (25, 10, 5):
        rows.append({**base, **ancestral, "num_inference_steps": steps, "diffusers_steps": steps, "label": "diffusers"})
    unique, seen = [], set()
    for row in rows:  # a sweep's base point repeats another row: run it once
        key = json.dumps({k: v for k, v in row.items() if k != "label"}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def format_row(r: dict[str, Any]) -> str:
    sampler = r["sampler"] + (f" r={r['prior_weight']:g}" if r["sampler"] == "purity" else "")
    chain = f"diffusers {r['diffusers_steps'] - 1}..0" if "diffusers_steps" in r else r.get("spacing", "uniform")
    cells = [r["label"], str(r["num_inference_steps"]), chain, sampler, f"{r['guidance_scale']:g}"]
    cells.append(f"{r['truncation_rate']:g}")
    for name in PROMPT_SETS:  # with its 95% Wilson interval when the row knows its n (rows of older runs do not)
        rate, n = r[name], r.get("n")
        if n:
            low, high = wilson_interval(round(rate * n), n)
            cells.append(f"{rate:.1%} [{low:.0%}, {high:.0%}]")
        else:
            cells.append(f"{rate:.1%}")
    cells.append(f"{r['mean']:.1%}")
    return "| " + " | ".join(cells + [f"{r['seconds_per_image']:.3f}"]) + " |"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = "steps x sampler"
    series = {
        "ancestral (exact skip-step posterior)": lambda r: r["sampler"] == "ancestral" and r["label"] == sweep,
        "purity prior": lambda r: r["sampler"] == "purity" and r["label"] == sweep,
        "ancestral, quadratic spacing": lambda r: r["label"] == "spacing",
        "diffusers-style steps n-1..0": lambda r: r["label"] == "diffusers",
    }
    for name, keep in series.items():
        points = sorted((r["num_inference_steps"], r["mean"]) for r in rows if keep(r))
        if points:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks([5, 10, 25, 50, 100], labels=["5", "10", "25", "50", "100"])
    ax.set_ylim(0, 100)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("fully correct, mean of 3 prompt sets (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--n", type=int, default=256, help="images per prompt set (default 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=3.0, help="base guidance scale (default 3)")
    parser.add_argument("--truncation", type=float, default=1.0, help="base truncation rate (default 1)")
    parser.add_argument("--prior-weight", type=float, default=1.0, help="purity sampler r (default 1)")
    parser.add_argument("--only", default=None, help="comma-separated row labels to run (default all)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write a PNG plot of fully-correct rate vs steps")
    parser.add_argument("--from-json", default=None, help="print and plot the rows of an earlier --json run")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        for result in results:
            print(format_row(result))
        if args.plot:
            plot(results, Path(args.plot))
        return

    torch.manual_seed(0)
    pipe = VQDiffusionPipeline.from_pretrained(args.model)
    base = {"guidance_scale": args.guidance, "truncation_rate": args.truncation, "spacing": "uniform"}
    rows = settings(base, args.prior_weight)
    if args.only:
        wanted = set(args.only.split(","))
        rows = [r for r in rows if r["label"] in wanted]
    print(f"model {args.model}; {args.n} images per prompt set, seed {args.seed}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print()
    header = ["sweep", "steps", "chain", "sampler", "guidance", "truncation", *PROMPT_SETS, "mean", "s/img"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    results = []
    for setting in rows:
        result = run_setting(pipe, setting, args.n, args.batch_size, args.seed)
        results.append(result)
        print(format_row(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
