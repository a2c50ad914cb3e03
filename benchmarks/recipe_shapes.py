"""Controlled denoiser runs on the shapes data (not a test): which recipe trains the built-in model best.

Every variant trains with ``vqdiffusion train`` for the same budget (``--steps`` optimizer steps of
``--batch-size``, i.e. the same number of training samples) from the base recipe below with one group of
flags changed, checkpoints at ``--points`` evenly spaced steps, and each checkpoint is scored with the
shapes suite (``--n`` prompts per set, fixed sampling settings, seed 0).  The script is resumable: a run
continues from its checkpoints, and a checkpoint already scored is not scored again.  It prints a table
(fully-correct rate with its 95% Wilson interval per prompt set) and can write it as markdown and JSON,
and plot fully-correct rate against training samples seen.

    python benchmarks/recipe_shapes.py --tokens runs/v2/tokens --out runs/recipe --steps 600
    python benchmarks/recipe_shapes.py --tokens runs/v2/tokens --out runs/recipe --only base \\
        --markdown docs/recipe_shapes.md --json docs/recipe_shapes.json --plot docs/recipe_curve.png

``--variant NAME=FLAGS`` adds a variant (flags as one string, e.g. ``--variant "lr2e-3=--lr 2e-3"``);
``TOKENS=DIR`` inside a variant's flags switches its token folder (a tokenizer variant); ``RUN=DIR`` scores
the checkpoints of a run trained elsewhere (e.g. ``scripts/train_default.sh``'s denoiser) without training.
A variant that sets ``--batch-size`` trains for ``--steps * --batch-size / its batch`` steps, so every run
sees as many samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vqdiffusion.data.shapes import PROMPT_SETS
from vqdiffusion.eval.stats import format_rate, wilson_interval
from vqdiffusion.eval.suite import evaluate_shapes
from vqdiffusion.training.checkpoint import read_checkpoint_meta
from vqdiffusion.training.export import pipeline_from_checkpoint

# The base recipe (see scripts/train_default.sh); each variant replaces some of these flags.
BASE = (
    "--preset small --layers 6 --dim 192 --heads 4 --cond-dim 192 --train-text-model --text-vocab words "
    "--text-layers 2 --text-heads 4 --text-max-length 32 --lr 8e-4 --lr-warmup 200 --lr-schedule cosine "
    "--min-lr 1e-5 --aux-weight 0.05 --ema-decay 0.998 --mixed-precision bf16 --cond-drop-prob 0.1 --seed 0"
)
VARIANTS: dict[str, str] = {
    "base": "",
    "aux0.5": "--aux-weight 0.5",
    "aux0.005": "--aux-weight 0.005",
    "lr2e-3": "--lr 2e-3",
    "lr3e-4": "--lr 3e-4",
    "deep10x160": "--layers 10 --dim 160 --heads 4 --cond-dim 160",
    "wide4x256": "--layers 4 --dim 256 --heads 4 --cond-dim 256",
    "text4": "--text-layers 4",
    "drop0.2": "--cond-drop-prob 0.2",
    "bs128": "--batch-size 128",
    "text_wide256": "--cond-dim 256",
}
# per-set attribute rates kept beside the fully-correct count: they separate runs that are all near 0 correct
ATTRIBUTES = ("shape", "color", "size", "position", "count")
SAMPLING = {"num_inference_steps": 50, "guidance_scale": 3.0, "truncation_rate": 1.0, "sampler": "ancestral"}


def parse_flags(text: str) -> tuple[dict[str, str], list[str]]:
    """A variant's flag string -> (overrides of the base flags by flag name, extra settings like TOKENS=)."""
    words, flags, extras, i = shlex.split(text), {}, [], 0
    while i < len(words):
        word = words[i]
        if "=" in word and not word.startswith("--"):
            extras.append(word)
        elif i + 1 < len(words) and not words[i + 1].startswith("--"):
            flags[word] = words[i + 1]
            i += 1
        else:
            flags[word] = ""
        i += 1
    return flags, extras


def train_command(tokens: str, out: Path, variant: str, steps: int, batch: int, points: int) -> list[str]:
    flags, _ = parse_flags(BASE)
    own = parse_flags(variant)[0]
    flags.update(own)
    if "--batch-size" in own:  # the same budget in samples: fewer steps of a larger batch
        steps = max(1, steps * batch // int(own["--batch-size"]))
        batch = int(own["--batch-size"])
    every = max(1, steps // points)
    flags.update({"--steps": str(steps), "--batch-size": str(batch), "--save-every": str(every)})
    flags.update({"--keep-checkpoints": str(points + 1), "--sample-every": str(every), "--log-every": "50"})
    argv = [sys.executable, "-m", "vqdiffusion.cli", "train", tokens, "--out", str(out), "--quiet"]
    if list((out / "checkpoints").glob("step_*.safetensors")):
        argv.append("--resume")
    for flag, value in flags.items():
        argv += [flag] + ([value] if value else [])
    return argv


def score_checkpoint(path: Path, n: int, batch: int) -> dict[str, Any]:
    pipe = pipeline_from_checkpoint(path)
    report = evaluate_shapes(pipe, num_per_set=n, seed=0, batch_size=batch, progress=False, **SAMPLING)
    meta = read_checkpoint_meta(path)
    sets = {
        name: {
            "correct": round(s["fully_correct"] * s["n"]),
            "n": int(s["n"]),
            **{key: float(s[key]) for key in ATTRIBUTES if key in s},
        }
        for name, s in report["sets"].items()
    }
    return {
        "step": int(meta["step"]),
        "samples_seen": int(meta["step"]) * int(meta["config"]["batch_size"]),
        "sets": sets,
        "seconds_per_image": report["seconds_per_image"],
        "tokenizer_psnr": report["tokenizer_psnr"],
    }


def run_variant(name: str, flags: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    extras = dict(e.split("=", 1) for e in parse_flags(flags)[1])
    out = Path(extras["RUN"]) if "RUN" in extras else Path(args.out) / name
    tokens = extras.get("TOKENS", args.tokens)
    log = out / "train_wall.json"
    if "RUN" not in extras and not (out / "model" / "vqdiffusion.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        argv = train_command(tokens, out, flags, args.steps, args.batch_size, args.points)
        print(f"[{name}] {shlex.join(argv[2:])}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(argv, check=True, env=env)
        previous = json.loads(log.read_text())["seconds"] if log.is_file() else 0.0
        log.write_text(json.dumps({"seconds": previous + time.perf_counter() - start}))
    rows = []
    for path in sorted((out / "checkpoints").glob("step_*.safetensors")):
        cache = out / f"score_{path.stem}_n{args.n}.json"
        if not cache.is_file() or "shape" not in next(iter(json.loads(cache.read_text())["sets"].values())):
            print(f"[{name}] scoring {path.name}", flush=True)
            cache.write_text(json.dumps(score_checkpoint(path, args.n, args.eval_batch)))
        rows.append({"variant": name, "flags": flags, **json.loads(cache.read_text())})
    wall = json.loads(log.read_text())["seconds"] if log.is_file() else None
    for row in rows:
        row["train_minutes"] = None if wall is None else wall / 60
    return rows


def attribute_summary(sets: dict[str, Any]) -> str:
    """Shape / colour / position rates over every expected object of every set (weighted by prompts)."""
    parts = []
    for key, label in (("shape", "shape"), ("color", "colour"), ("position", "pos")):
        rated = [(s[key], s["n"]) for s in sets.values() if key in s]
        if rated:
            parts.append(f"{label} {100 * sum(r * n for r, n in rated) / sum(n for _, n in rated):.0f}%")
    return ", ".join(parts)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| variant | flags | samples seen | " + " | ".join(PROMPT_SETS) + " | attributes | train min |"
    lines = [head, "|" + "---|" * (5 + len(PROMPT_SETS))]
    for row in rows:
        cells = [format_rate(row["sets"][s]["correct"], row["sets"][s]["n"]) for s in PROMPT_SETS]
        cells.append(attribute_summary(row["sets"]))
        minutes = "" if row["train_minutes"] is None else f"{row['train_minutes']:.0f}"
        flags = row["flags"] or "(base)"
        start = f"| {row['variant']} | `{flags}` | {row['samples_seen']} | "
        lines.append(start + " | ".join(cells) + f" | {minutes} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for s in PROMPT_SETS:
            points = [r for r in rows if r["variant"] == variant]
            x = [r["samples_seen"] for r in points]
            rates = [r["sets"][s]["correct"] / r["sets"][s]["n"] for r in points]
            bounds = [wilson_interval(r["sets"][s]["correct"], r["sets"][s]["n"]) for r in points]
            line = ax.plot(x, rates, marker="o", label=f"{variant}: {s}")[0]
            ax.fill_between(x, [b[0] for b in bounds], [b[1] for b in bounds], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("fully correct (95% Wilson band)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", required=True, help="token folder of the base tokenizer")
    parser.add_argument("--out", required=True, help="folder for the runs")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per variant (default 600)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (default 64)")
    parser.add_argument("--points", type=int, default=3, help="scored checkpoints per run (default 3)")
    parser.add_argument("--n", type=int, default=128, help="prompts per set when scoring (default 128)")
    parser.add_argument("--eval-batch", type=int, default=64, help="images per pipeline call (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--variant", action="append", default=[], help="NAME=FLAGS: an extra variant")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--json", help="write every scored checkpoint here")
    parser.add_argument("--plot", help="learning curves (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = dict(VARIANTS)
    for item in args.variant:
        name, _, flags = item.partition("=")
        variants[name] = flags
    names = args.only or list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {sorted(variants)}")
    rows = [row for name in names for row in run_variant(name, variants[name], args)]
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
