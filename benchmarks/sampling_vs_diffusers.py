"""Sampling speed: vqdiffusion vs diffusers' VQDiffusionPipeline, identical random weights, one process.

Builds diffusers components with random weights, saves them in the diffusers layout, loads that directory
with ``vqdiffusion.VQDiffusionPipeline.from_pretrained`` (with diffusers' text padding, so both pipelines
sample the same per-step distributions), runs both for the same number of steps, batch and guidance, and
prints seconds per image per step, at truncation rate 1 and 0.86 (the authors' recommendation for ITHQ).
The VQ-VAE is kept small in every config: it is the same code path for both and is not what this compares.
A second table times truncation alone at the ITHQ shape (log p [1, 4096, 1024]) on a flat distribution
(random-weights-like: thousands of classes kept) and a peaked one (tens kept).  The machine may be shared:
every time is the best (and the median) of ``--repeats`` runs after a warm-up.

    python benchmarks/sampling_vs_diffusers.py                 # all configs
    python benchmarks/sampling_vs_diffusers.py --configs small --batches 1 --truncations 1
    python benchmarks/sampling_vs_diffusers.py --configs ithq2 ithq3 --no-bf16   # issue 27's cells
    python benchmarks/sampling_vs_diffusers.py --truncation-only
    python benchmarks/sampling_vs_diffusers.py --device cuda      # a GPU (benchmarks/gpu.sh runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import statistics
import tempfile
import time

import torch

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.diffusion import truncate_log_probs
from vqdiffusion.testing import RandomPipelineSpec, random_diffusers_pipeline


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    num_classes: int  # K
    side: int  # token grid side
    layers: int
    width: int
    heads: int
    text_width: int
    text_layers: int
    steps: int


CONFIGS = {
    "tiny": BenchConfig("tiny", 64, 8, 2, 64, 2, 32, 2, 20),
    "small": BenchConfig("small", 1024, 16, 8, 512, 8, 512, 12, 10),
    "ithq2": BenchConfig("ithq2", 4096, 32, 2, 1408, 16, 512, 12, 4),
    "ithq3": BenchConfig("ithq3", 4096, 32, 3, 1408, 16, 512, 12, 4),
}

PROMPTS = ["a red circle", "a blue square at the top", "two yellow triangles", "a green field under sky"]


def build_diffusers_pipeline(cfg: BenchConfig):
    """diffusers' pipeline with random weights at ``cfg``; the VQ decoder stays small (32 channels)."""
    return random_diffusers_pipeline(
        RandomPipelineSpec(
            num_classes=cfg.num_classes,
            side=cfg.side,
            layers=cfg.layers,
            heads=cfg.heads,
            head_dim=cfg.width // cfg.heads,
            text_width=cfg.text_width,
            text_layers=cfg.text_layers,
            text_heads=8 if cfg.text_width >= 256 else 2,
            vq_levels={8: 3, 16: 3, 32: 4}[cfg.side],
            vq_channels=32,
            transformer_std=0.05,
            other_std=0.05,
        )
    )


def run_pipeline(pipe, prompts: list[str], kwargs: dict) -> None:
    pipe(prompts, generator=torch.Generator(device=pipe.device).manual_seed(0), **kwargs)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls (CUDA work finished inside each)."""
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def truncation_table(rate: float, repeats: int, device: str = "cpu") -> list[str]:
    """ours vs diffusers' ``truncate`` at the ITHQ shape on a flat and a peaked distribution."""
    from diffusers import VQDiffusionPipeline as DiffusersPipeline

    gen = torch.Generator().manual_seed(0)
    rows = [
        f"| distribution (r = {rate}) | classes kept (mean) | diffusers best / median s | ours best / median s "
        "| speed-up (best) |",
        "|---|---|---|---|---|",
    ]
    for name, scale in (("flat", 0.3), ("peaked", 4.0)):
        log_p = torch.log_softmax(torch.randn(1, 4096, 1024, generator=gen) * scale, dim=1).to(device)
        ours = functools.partial(truncate_log_probs, log_p, rate)
        theirs = functools.partial(DiffusersPipeline.truncate, None, log_p, rate)  # does not use self
        kept = float(torch.isfinite(ours()).sum(1).float().mean())
        theirs()
        times_ref, times_ours = [], []
        for _ in range(repeats):  # interleaved, so that a change in the machine's load hits both
            times_ref.append(timed(theirs)[0])
            times_ours.append(timed(ours)[0])
        t_ref = min(times_ref), statistics.median(times_ref)
        t_ours = min(times_ours), statistics.median(times_ours)
        rows.append(
            f"| {name} | {kept:.0f} | {t_ref[0]:.3f} / {t_ref[1]:.3f} | {t_ours[0]:.3f} / {t_ours[1]:.3f} "
            f"| {t_ref[0] / t_ours[0]:.1f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--truncations", nargs="+", type=float, default=[1.0, 0.86])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (best and median)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    parser.add_argument("--truncation-only", action="store_true", help="only the truncation table")
    parser.add_argument("--device", default="cpu", help="torch device for both pipelines (default cpu)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}), guidance {args.guidance}")
    trunc_rows = truncation_table(0.86, max(args.repeats, 5), args.device)
    if args.truncation_only:
        print("\n".join(trunc_rows))
        return
    header = (
        "| config | batch | steps | truncation | diffusers fp32 s/img/step | ours fp32 | speed-up | ours bf16 "
        "| speed-up |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name in args.configs:
        cfg = CONFIGS[name]
        ref = build_diffusers_pipeline(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_pretrained(tmp)
            ours = VQDiffusionPipeline.from_pretrained(tmp, text_pad_token_id=None).to(args.device)
            ours_bf16 = (
                None
                if args.no_bf16
                else VQDiffusionPipeline.from_pretrained(tmp, text_pad_token_id=None, dtype=torch.bfloat16).to(
                    args.device
                )
            )
        ref.to(args.device)
        for batch, rate in itertools.product(args.batches, args.truncations):
            prompts = (PROMPTS * batch)[:batch]
            call = {
                "num_inference_steps": cfg.steps,
                "guidance_scale": args.guidance,
                "truncation_rate": rate,
            }
            run_ref = functools.partial(run_pipeline, ref, prompts, call)
            run_ours = functools.partial(run_pipeline, ours, prompts, {**call, "progress": False})
            run_ref(), run_ours()  # warm-up
            per = batch * cfg.steps
            t_ref = timed(run_ref, args.repeats)[0] / per
            t_ours = timed(run_ours, args.repeats)[0] / per
            cells = [name, str(batch), str(cfg.steps), f"{rate:g}", f"{t_ref:.4f}", f"{t_ours:.4f}"]
            cells.append(f"{t_ref / t_ours:.2f}x")
            if ours_bf16 is not None:
                run_bf16 = functools.partial(run_pipeline, ours_bf16, prompts, {**call, "progress": False})
                run_bf16()
                t_bf16 = timed(run_bf16, args.repeats)[0] / per
                cells += [f"{t_bf16:.4f}", f"{t_ref / t_bf16:.2f}x"]
            else:
                cells += ["-", "-"]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    print()
    print("\n".join(trunc_rows))
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
