"""Samplers ranked by quality per model call on a model, scored by the shapes evaluator (not a test).

For every sampler at several budgets the script generates the shapes suite's three prompt sets (same seed)
and prints one row: denoiser calls per chain (counted by a forward hook; with guidance the conditional and
null inputs are one call), fully-correct rate per set with its 95% Wilson interval, the mean, and seconds
per image (whole pipeline call, this machine).  The reference row is diffusers' default, 100 steps of its
chain (steps 99..0 from all-[MASK], one-step posteriors), run with our own loop through explicit step
indices; for a model of T = 100 steps that is the full trained chain, the same as ancestral at 100 steps.

    python benchmarks/sampler_ranking.py --n 128 --json docs/sampler_ranking.json --plot docs/sampler_ranking.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from ablation_shapes import generate

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.data.shapes import PROMPT_SETS, canonical_caption, prompt_set
from vqdiffusion.eval.shapes import evaluate
from vqdiffusion.eval.stats import wilson_interval
from vqdiffusion.unmasking import MASK_ONLY_TOLERANCE, replace_mass

MASK_ONLY_SAMPLERS = ("remdm", "first_hitting")


def budgets(num_timesteps: int, guidance: float, truncation: float, prior_weight: float) -> list[dict[str, Any]]:
    """The rows: each sampler at a few step counts, and diffusers' default as the reference."""
    base = {"guidance_scale": guidance, "truncation_rate": truncation}
    rows: list[dict[str, Any]] = [
        {**base, "sampler": "ancestral", "num_inference_steps": num_timesteps, "diffusers_steps": num_timesteps,
         "label": "diffusers default"},
    ]  # fmt: skip
    for steps in (50, 25, 10, 5):
        rows.append({**base, "sampler": "ancestral", "num_inference_steps": steps})
    for steps in (25, 10, 5):
        rows.append({**base, "sampler": "purity", "prior_weight": prior_weight, "num_inference_steps": steps})
    rows.append({**base, "sampler": "uniform", "order": "halton", "num_inference_steps": 10})
    for steps in (16, 8, 4):
        rows.append({**base, "sampler": "confidence", "num_inference_steps": steps})
    rows.append({**base, "sampler": "remdm", "num_inference_steps": 25})
    rows.append({**base, "sampler": "first_hitting", "num_inference_steps": num_timesteps})
    return rows


def run_row(pipe: VQDiffusionPipeline, row: dict[str, Any], n: int, batch_size: int, seed: int) -> dict[str, Any]:
    calls = [0]
    hook = pipe.denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    generator = torch.Generator().manual_seed(seed)
    runs, start, out = 0, time.perf_counter(), dict(row)
    try:
        for name in PROMPT_SETS:
            scenes = prompt_set(name, n, seed)
            images = []
            for i in range(0, n, batch_size):
                prompts = [canonical_caption(scene) for scene in scenes[i : i + batch_size]]
                images += generate(pipe, prompts, row, generator)
                runs += 1
            correct = round(evaluate(images, scenes)["fully_correct"] * n)
            out[name] = {"correct": correct, "n": n, "rate": correct / n, "ci95": wilson_interval(correct, n)}
    finally:
        hook.remove()
    out["mean"] = sum(out[name]["rate"] for name in PROMPT_SETS) / len(PROMPT_SETS)
    out["calls_per_chain"] = calls[0] / runs
    out["seconds_per_image"] = (time.perf_counter() - start) / (n * len(PROMPT_SETS))
    return out


def describe(r: dict[str, Any]) -> str:
    if "diffusers_steps" in r:
        return f"diffusers {r['diffusers_steps']} steps ({r['diffusers_steps'] - 1}..0)"
    extras = {"purity": f" r={r.get('prior_weight', 0):g}", "uniform": f" {r.get('order', 'random')}"}
    extra = extras.get(r["sampler"], "")
    return f"{r['sampler']}{extra}, {r['num_inference_steps']} steps"


def format_row(r: dict[str, Any]) -> str:
    cells = [describe(r), f"{r['calls_per_chain']:.1f}"]
    for name in PROMPT_SETS:
        low, high = r[name]["ci95"]
        cells.append(f"{r[name]['rate']:.1%} [{low:.0%}, {high:.0%}]")
    cells += [f"{r['mean']:.1%}", f"{r['seconds_per_image']:.3f}"]
    return "| " + " | ".join(cells) + " |"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for sampler in sorted({r["sampler"] for r in rows if "diffusers_steps" not in r}):
        points = sorted((r["calls_per_chain"], 100 * r["mean"]) for r in rows
                        if r["sampler"] == sampler and "diffusers_steps" not in r)  # fmt: skip
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sampler)
    for r in rows:
        if "diffusers_steps" in r:
            ax.axhline(100 * r["mean"], color="gray", linestyle="--", label="diffusers' default (100 steps)")
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set_xlabel("denoiser calls per chain")
    ax.set_ylabel("fully correct, mean of 3 prompt sets (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:shapes")
    parser.add_argument("--n", type=int, default=128, help="prompts per set (default 128)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--truncation", type=float, default=None, help="truncation rate (default: the model's)")
    parser.add_argument("--prior-weight", type=float, default=1.0, help="purity sampler r (default 1)")
    parser.add_argument("--only", nargs="*", default=None, help="samplers to run (default all)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()

    pipe = VQDiffusionPipeline.from_pretrained(args.model)
    guidance = pipe.defaults.guidance_scale if args.guidance is None else args.guidance
    truncation = pipe.defaults.truncation_rate if args.truncation is None else args.truncation
    rows = budgets(pipe.schedule.num_timesteps, guidance, truncation, args.prior_weight)
    if replace_mass(pipe.schedule) > MASK_ONLY_TOLERANCE:
        rows = [r for r in rows if r["sampler"] not in MASK_ONLY_SAMPLERS]
    if args.only:
        rows = [r for r in rows if r["sampler"] in args.only]
    print(f"{args.model}: n = {args.n} per set, seed {args.seed}, guidance {guidance:g}, truncation {truncation:g}")
    print("| sampler | calls | " + " | ".join(PROMPT_SETS) + " | mean | s/img |")
    print("|---" * (len(PROMPT_SETS) + 4) + "|")
    results = []
    for row in rows:
        results.append(run_row(pipe, row, args.n, args.batch_size, args.seed))
        print(format_row(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
