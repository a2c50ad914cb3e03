"""Where a sampling step's time goes: vqdiffusion vs diffusers' VQDiffusionPipeline, same random weights.

Builds both pipelines at the ITHQ shape (K = 4096, 32 x 32 tokens, width 1408, 16 heads, CLIP text width 512)
with ``--layers`` transformer layers (``sampling_vs_diffusers.py`` builds the same), runs each for
``--steps`` steps with guidance, and times the parts of the call by wrapping them:

* ours: the denoiser (``network``: transformer, the guidance combination, which it runs before its affine
  head, the head and the log-softmax), truncation (``sampling.truncate_log_probs``), the numerical guard
  (``FiniteWatch.add``), the posterior (``posterior_log_probs``) and the draw (``sample_categorical``);
* diffusers: the transformer (``network``: it includes its float64 log-softmax), ``truncate``,
  ``scheduler.step`` (posterior and Gumbel draw), and the rest of the loop (guidance and clamps);

plus, for both, the text encoder and the VQ decoder (once per call).  Each part is reported in seconds per
image-step (its total over the call divided by batch x steps; text and decoder per image), the best of
``--repeats`` calls.  ``--clock thread`` measures the main thread's CPU time (robust on a shared machine, one
thread only); ``wall`` is ``time.perf_counter`` (for a quiet machine, any thread count).

    python benchmarks/step_profile.py --layers 2 --batch 1 --truncation 1
    python benchmarks/step_profile.py --layers 3 --batch 4 --truncation 0.86 --threads 2 --clock wall
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from sampling_vs_diffusers import CONFIGS, PROMPTS, BenchConfig, build_diffusers_pipeline  # noqa: E402

import vqdiffusion.samplers.ancestral as ancestral_module
import vqdiffusion.sampling as sampling_module
from vqdiffusion import VQDiffusionPipeline


class PartTimer:
    """Accumulates seconds per named part; nested parts are subtracted from their parent."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.totals: collections.Counter[str] = collections.Counter()
        self._stack: list[list[float]] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = self.clock()
            self._stack.append([0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                inner = self._stack.pop()[0]
                spent = self.clock() - start
                self.totals[name] += spent - inner
                if self._stack:
                    self._stack[-1][0] += spent

        return timed


@contextlib.contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def profile_ours(pipe: VQDiffusionPipeline, prompts: list[str], call: dict, clock) -> collections.Counter:
    timer = PartTimer(clock)
    with contextlib.ExitStack() as stack:
        for module, name, part in (
            (sampling_module, "truncate_log_probs", "truncation"),
            (ancestral_module, "posterior_log_probs", "posterior"),
            (ancestral_module, "sample_categorical", "draw"),
        ):
            stack.enter_context(patched(module, name, timer.wrap(part, getattr(module, name))))
        for obj, name, part in (
            (sampling_module.FiniteWatch, "add", "guard"),
            (pipe.denoiser, "forward", "network"),
            (pipe.text_encoder, "encode", "text encoder"),
            (pipe.vqvae, "forward", "VQ decoder"),
            (pipe.vqvae, "decode_tokens", "VQ decoder"),
        ):
            stack.enter_context(patched(obj, name, timer.wrap(part, getattr(obj, name))))
        start = clock()
        pipe(prompts, generator=torch.Generator().manual_seed(0), progress=False, **call)
        timer.totals["whole call"] = clock() - start
    return timer.totals


def profile_diffusers(pipe, prompts: list[str], call: dict, clock) -> collections.Counter:
    timer = PartTimer(clock)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(pipe, "truncate", timer.wrap("truncation", pipe.truncate)))
        stack.enter_context(patched(pipe.scheduler, "step", timer.wrap("posterior + draw", pipe.scheduler.step)))
        stack.enter_context(patched(pipe.transformer, "forward", timer.wrap("network", pipe.transformer.forward)))
        text = pipe.text_encoder
        stack.enter_context(patched(text, "forward", timer.wrap("text encoder", text.forward)))
        stack.enter_context(patched(pipe.vqvae, "decode", timer.wrap("VQ decoder", pipe.vqvae.decode)))
        start = clock()
        pipe(prompts, generator=torch.Generator().manual_seed(0), **call)
        timer.totals["whole call"] = clock() - start
    return timer.totals


ROWS = (
    "network",
    "truncation",
    "guard",
    "posterior",
    "draw",
    "posterior + draw",
    "text encoder",
    "VQ decoder",
    "rest of the loop",
    "whole call",
)


def table(cfg: BenchConfig, batch: int, ours: collections.Counter, ref: collections.Counter) -> list[str]:
    per_step = batch * cfg.steps
    lines = [
        "| part (s per image-step; text, decoder: per image) | diffusers | ours | diffusers / ours |",
        "|---|---|---|---|",
    ]
    for totals in (ours, ref):
        named = sum(v for k, v in totals.items() if k != "whole call")
        totals["rest of the loop"] = max(0.0, totals["whole call"] - named)
    for row in ROWS:
        if row not in ours and row not in ref:
            continue
        div = batch if row in ("text encoder", "VQ decoder") else per_step
        a, b = ref.get(row), ours.get(row)
        cells = ["-" if v is None else f"{v / div:.4f}" for v in (a, b)]
        ratio = f"{a / b:.2f}x" if a and b else "-"
        lines.append(f"| {row} | {cells[0]} | {cells[1]} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer layers at the ITHQ shape (default 2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--truncation", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="profiled calls each (the best is kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread")
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use --threads 1, or --clock wall on a quiet machine")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    base = CONFIGS["ithq2"]
    cfg = BenchConfig(
        f"ithq{args.layers}",
        base.num_classes,
        base.side,
        args.layers,
        base.width,
        base.heads,
        base.text_width,
        base.text_layers,
        args.steps,
    )
    ref = build_diffusers_pipeline(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = VQDiffusionPipeline.from_pretrained(tmp, text_pad_token_id=None)
    prompts = (PROMPTS * args.batch)[: args.batch]
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "truncation_rate": args.truncation}
    results = {}
    for name, run, pipe in (("ours", profile_ours, ours), ("diffusers", profile_diffusers, ref)):
        run(pipe, prompts, call, clock)  # warm-up
        results[name] = min(
            (run(pipe, prompts, call, clock) for _ in range(args.repeats)), key=lambda totals: totals["whole call"]
        )
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), clock {args.clock}; ITHQ shape, {args.layers} "
        f"layers, batch {args.batch}, {args.steps} steps, guidance {args.guidance}, truncation {args.truncation}"
    )
    print("\n".join(table(cfg, args.batch, results["ours"], results["diffusers"])))


if __name__ == "__main__":
    main()
