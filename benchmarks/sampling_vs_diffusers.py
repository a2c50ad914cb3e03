"""Sampling speed: vqdiffusion vs diffusers' VQDiffusionPipeline, identical random weights, one process.

Builds diffusers components with random weights, saves them in the diffusers layout, loads that directory
with ``vqdiffusion.VQDiffusionPipeline.from_pretrained`` (with diffusers' text padding, so both pipelines
sample the same per-step distributions), runs both for the same number of steps, batch and guidance, and
prints seconds per image per step, at truncation rate 1 and 0.86 (the authors' recommendation for ITHQ).
The VQ-VAE is kept small in every config: it is the same code path for both and is not what this compares.
A second table times truncation alone at the ITHQ shape (log p [1, 4096, 1024]) on a flat distribution
(random-weights-like: thousands of classes kept) and a peaked one (tens kept).  The machine may be shared:
every time is the best (and the median) of ``--repeats`` runs after a warm-up.

The random weights are built and saved once per config and reused for every batch, truncation and dtype.

Without ``--dtypes`` diffusers runs in float32 and ours in float32 and (unless ``--no-bf16``) bfloat16.
``--dtypes`` instead runs both pipelines in each named dtype on the same weights (diffusers' pipeline is
copied and converted with ``.to(device, dtype)``, ours loaded with ``from_pretrained(..., dtype=dtype)``);
for a half dtype both VQ decoders run in float32 (ours upcasts for float16 itself; diffusers cannot turn a
bfloat16 image into numpy), and the text encoders run in the dtype (ours keeps float32 on CPU).  float16
is refused on CPU.  On CUDA every row also gives each pipeline's peak GPU memory in GiB: its weights plus
the most allocated above what was allocated before its timed calls (the other pipeline's weights excluded).
``ithq`` (the ITHQ shape at its full 36 layers) runs only when named.

    python benchmarks/sampling_vs_diffusers.py                 # all configs but ithq
    python benchmarks/sampling_vs_diffusers.py --configs small --batches 1 --truncations 1
    python benchmarks/sampling_vs_diffusers.py --configs ithq2 ithq3 --no-bf16   # issue 27's cells
    python benchmarks/sampling_vs_diffusers.py --truncation-only
    python benchmarks/sampling_vs_diffusers.py --device cuda      # a GPU (benchmarks/gpu.sh runs this)
    python benchmarks/sampling_vs_diffusers.py --device cuda --configs ithq --dtypes float32,float16 \
        --batches 1 4 --truncations 1 0.86 --repeats 3            # issue 27's table: 36 layers, peak memory
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import itertools
import statistics
import sys
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
    # the ITHQ shape at its full depth (issue 27); slow on a CPU, so only run when named
    "ithq": BenchConfig("ithq", 4096, 32, 36, 1408, 16, 512, 12, 4),
}
DEFAULT_CONFIGS = [name for name in CONFIGS if name != "ithq"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

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


def parse_dtypes(text: str) -> list[torch.dtype]:
    """``"float32,float16"`` -> [torch.float32, torch.float16] (names or fp32/fp16/bf16; no repeats)."""
    out = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name not in DTYPES:
            raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
        if DTYPES[name] not in out:
            out.append(DTYPES[name])
    if not out:
        raise argparse.ArgumentTypeError("no dtype given")
    return out


def resident_bytes(modules, device: torch.device) -> int:
    """Bytes of the parameters and buffers of ``modules`` that lie on ``device`` (shared tensors once)."""
    seen, total = set(), 0
    for module in modules:
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.device == device and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def diffusers_modules(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def measure(fn, repeats: int, device: torch.device, weights: int) -> tuple[float, float | None]:
    """Best seconds of ``repeats`` calls and, on CUDA, the peak GiB: ``weights`` (bytes) plus the most
    allocated during the calls above what was allocated before them (None off CUDA)."""
    if device.type != "cuda":
        return timed(fn, repeats)[0], None
    _sync()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    best = timed(fn, repeats)[0]
    return best, (weights + torch.cuda.max_memory_allocated(device) - before) / 2**30


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    parser.add_argument(
        "--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS), help="default: all but ithq"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--truncations", nargs="+", type=float, default=[1.0, 0.86])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (best and median)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows (the table without --dtypes)")
    parser.add_argument(
        "--dtypes",
        type=parse_dtypes,
        default=None,
        help="comma-separated dtypes (float32,float16,bfloat16) to run both pipelines in, one row each; "
        "default: diffusers fp32 against ours fp32 and bf16",
    )
    parser.add_argument("--truncation-only", action="store_true", help="only the truncation table")
    parser.add_argument("--device", default="cpu", help="torch device for both pipelines (default cpu)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # tensors report their index: compare like with like
        device = torch.device("cuda", torch.cuda.current_device())
    if args.dtypes is not None and args.no_bf16:
        parser.error("--no-bf16 is for the table without --dtypes; leave bfloat16 out of --dtypes instead")
    if args.dtypes is not None and torch.float16 in args.dtypes and device.type == "cpu":
        print("error: float16 is not benchmarked on CPU (slow or unsupported there); use bfloat16", file=sys.stderr)
        raise SystemExit(2)
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}), guidance {args.guidance}")
    trunc_rows = truncation_table(0.86, max(args.repeats, 5), args.device)
    if args.truncation_only:
        print("\n".join(trunc_rows))
        return
    if args.dtypes is None:
        header = (
            "| config | batch | steps | truncation | diffusers fp32 s/img/step | ours fp32 | speed-up | ours bf16 "
            "| speed-up |"
        )
        if cuda:
            header += " diffusers fp32 peak GiB | ours fp32 peak GiB | ours bf16 peak GiB |"
    else:
        header = "| config | batch | steps | truncation | dtype | diffusers s/img/step | ours s/img/step | speed-up |"
        if cuda:
            header += " diffusers peak GiB | ours peak GiB |"
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for name in args.configs:
        cfg = CONFIGS[name]
        ref = build_diffusers_pipeline(cfg)  # once per config: every cell below uses these weights
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_pretrained(tmp)
            if args.dtypes is None:
                rows += default_rows(cfg, ref, tmp, args, device)
            else:
                for dtype in args.dtypes:
                    rows += dtype_rows(cfg, ref, tmp, dtype, args, device)
                    free_device_memory()  # this dtype's pair is unreferenced now
        del ref
        free_device_memory()
    print()
    print("\n".join(trunc_rows))
    print()
    print("\n".join(rows))


def cell_calls(cfg: BenchConfig, batch: int, rate: float, guidance: float) -> tuple[list[str], dict]:
    prompts = (PROMPTS * batch)[:batch]
    return prompts, {"num_inference_steps": cfg.steps, "guidance_scale": guidance, "truncation_rate": rate}


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def time_cell(cfg: BenchConfig, ref, ours, batch: int, rate: float, args, device: torch.device, weights: tuple):
    """One cell: both pipelines warmed up, then timed (``measure``); returns (the call's prompts and keywords,
    seconds per image-step and peak memory of diffusers, the same for ours).  ``weights``: their resident bytes."""
    prompts, call = cell_calls(cfg, batch, rate, args.guidance)
    run_ref = functools.partial(run_pipeline, ref, prompts, call)
    run_ours = functools.partial(run_pipeline, ours, prompts, {**call, "progress": False})
    run_ref(), run_ours()  # warm-up
    per = batch * cfg.steps
    t_ref, m_ref = measure(run_ref, args.repeats, device, weights[0])
    t_ours, m_ours = measure(run_ours, args.repeats, device, weights[1])
    return (prompts, call), (t_ref / per, m_ref), (t_ours / per, m_ours)


def default_rows(cfg: BenchConfig, ref, tmp: str, args, device: torch.device) -> list[str]:
    """Diffusers fp32 against ours fp32 and (unless ``--no-bf16``) ours bf16, per batch and truncation."""
    ours = VQDiffusionPipeline.from_pretrained(tmp, text_pad_token_id=None).to(args.device)
    ours_bf16 = (
        None
        if args.no_bf16
        else VQDiffusionPipeline.from_pretrained(tmp, text_pad_token_id=None, dtype=torch.bfloat16).to(args.device)
    )
    ref.to(args.device)
    w_ref = resident_bytes(diffusers_modules(ref), device)
    w_ours = resident_bytes(ours.modules().values(), device)
    w_bf16 = 0 if ours_bf16 is None else resident_bytes(ours_bf16.modules().values(), device)
    rows = []
    for batch, rate in itertools.product(args.batches, args.truncations):
        (prompts, call), (t_ref, m_ref), (t_ours, m_ours) = time_cell(
            cfg, ref, ours, batch, rate, args, device, (w_ref, w_ours)
        )
        per = batch * cfg.steps
        cells = [cfg.name, str(batch), str(cfg.steps), f"{rate:g}", f"{t_ref:.4f}", f"{t_ours:.4f}"]
        cells.append(f"{t_ref / t_ours:.2f}x")
        m_bf16 = None
        if ours_bf16 is not None:
            run_bf16 = functools.partial(run_pipeline, ours_bf16, prompts, {**call, "progress": False})
            run_bf16()
            t_bf16, m_bf16 = measure(run_bf16, args.repeats, device, w_bf16)
            t_bf16 /= per
            cells += [f"{t_bf16:.4f}", f"{t_ref / t_bf16:.2f}x"]
        else:
            cells += ["-", "-"]
        if device.type == "cuda":
            cells += [gib(m_ref), gib(m_ours), gib(m_bf16)]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def dtype_rows(cfg: BenchConfig, ref, tmp: str, dtype: torch.dtype, args, device: torch.device) -> list[str]:
    """Both pipelines in ``dtype`` on the weights in ``ref`` (float32, on the CPU; left as it is) and ``tmp``
    (the same, saved), per batch and truncation; the caller frees the pair before the next dtype."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns about an empty list of float32 modules
    try:
        ref_d = copy.deepcopy(ref).to(device, dtype)
        if dtype != torch.float32:
            # diffusers turns the decoded image into numpy (no bfloat16), so its VQ decoder stays in float32,
            # and so does ours below (which upcasts for float16 by itself): the same small decoder for both
            ref_d.vqvae.to(torch.float32)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    ours = VQDiffusionPipeline.from_pretrained(tmp, text_pad_token_id=None, device=device, dtype=dtype)
    if dtype != torch.float32:
        ours.vqvae.to(torch.float32)
    w_ref = resident_bytes(diffusers_modules(ref_d), device)
    w_ours = resident_bytes(ours.modules().values(), device)
    rows = []
    for batch, rate in itertools.product(args.batches, args.truncations):
        _, (t_ref, m_ref), (t_ours, m_ours) = time_cell(cfg, ref_d, ours, batch, rate, args, device, (w_ref, w_ours))
        cells = [cfg.name, str(batch), str(cfg.steps), f"{rate:g}", SHORT[dtype], f"{t_ref:.4f}", f"{t_ours:.4f}"]
        cells.append(f"{t_ref / t_ours:.2f}x")
        if device.type == "cuda":
            cells += [gib(m_ref), gib(m_ours)]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
