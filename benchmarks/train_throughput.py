"""Denoiser training throughput (samples/s) in fp32 and bf16 autocast, and its fraction of the matmul peak.

Runs :meth:`DenoiserTrainer.train_step` (forward, loss, backward, clipping, AdamW, EMA, importance-sampler
update) on a synthetic token folder of random tokens and captions, with a small jointly trained text model
(``--text-layers``, width = the condition width, 77 positions) so cross-attention reads a 77 x D
condition as in ITHQ.  The peak is measured in the same run with large square matmuls of each dtype.

Model FLOPs per sample = 3 x forward FLOPs (backward ~ 2 x forward):

    forward = 2 * N * P_tok + 2 * L * P_kv + 4 * layers * D * (N^2 + N * L) + 2 * L * P_text

with N image tokens, L condition positions, P_tok the denoiser parameters applied at every image token
(everything but embeddings, AdaLN step modulations and the cross-attention K/V projections), P_kv the
cross-attention K/V projections (applied to the L condition positions), the attention score and mixing
matmuls, and P_text the text model's per-position parameters.

    python benchmarks/train_throughput.py                      # reduced config for a small CPU
    python benchmarks/train_throughput.py --side 8 --codebook 256 --batch-size 64 --threads 1,2   # built-in model
    python benchmarks/train_throughput.py --preset small --layers 8 --dim 512 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vqdiffusion.data.tokens import TokenDataset
from vqdiffusion.training.batching import StepBatchSampler
from vqdiffusion.training.denoiser_config import DenoiserTrainConfig
from vqdiffusion.training.denoiser_trainer import DenoiserTrainer, StepBatches


def write_random_tokens(folder: Path, count: int, k: int, side: int) -> Path:
    """A token folder of ``count`` random ``side`` x ``side`` grids with short captions."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, k, (count, side, side), generator=generator, dtype=torch.int16 if k < 32767 else torch.int32
    )
    save_file({"tokens": tokens}, str(folder / "tokens.safetensors"))
    words = ["red", "blue", "green", "circle", "square", "small", "large", "left", "right", "top"]
    lines = [
        json.dumps({"file": f"{i}.png", "caption": " ".join(words[(i + j) % 10] for j in range(4))})
        for i in range(count)
    ]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    meta = {
        "format": "vqdiffusion.tokens",
        "format_version": 1,
        "kind": "captions",
        "count": count,
        "num_classes": k,
        "token_shape": [side, side],
        "dtype": str(tokens.dtype).removeprefix("torch."),
        "image_size": side * 8,
        "resize": "center_crop",
        "data_dir": None,
        "vqvae_dir": None,
        "vqvae_config": None,
        "class_names": None,
        "skipped": [],
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def model_flops_per_sample(trainer: DenoiserTrainer) -> float:
    """Training FLOPs per sample (see the module docstring)."""
    cfg = trainer.denoiser.config
    n, layers, d = cfg.num_tokens, cfg.num_layers, cfg.dim
    p_tok = p_kv = 0
    for name, param in trainer.denoiser.named_parameters():
        if "embedding" in name or ".modulation." in name:
            continue
        if "cross_attn.to_k" in name or "cross_attn.to_v" in name:
            p_kv += param.numel()
        else:
            p_tok += param.numel()
    text = trainer.module.text
    seq = text.max_length if text is not None else 0
    p_text = sum(p.numel() for name, p in text.named_parameters() if "embedding" not in name) if text else 0
    forward = 2 * n * p_tok + 2 * seq * p_kv + 4 * layers * d * (n * n + n * seq) + 2 * seq * p_text
    return 3.0 * forward


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, seconds: float) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls in ``dtype`` over about ``seconds``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, token_dir: Path, precision: str) -> tuple[float, DenoiserTrainer]:
    config = DenoiserTrainConfig(
        token_dir=str(token_dir),
        output_dir=str(token_dir.parent / "unused"),
        preset=args.preset,
        num_layers=args.layers,
        dim=args.dim,
        num_heads=args.heads,
        cond_dim=args.dim,
        text_model="train",
        text_layers=args.text_layers,
        text_heads=args.heads,
        batch_size=args.batch_size,
        lr_warmup=0,
        mixed_precision=precision,
        device=args.device,
        progress=False,
    )
    data = TokenDataset(token_dir)
    trainer = DenoiserTrainer(config, data, args.device)
    order = StepBatchSampler(len(data), args.batch_size, 0, 0, args.warmup + args.steps)
    batches = StepBatches(data, order, trainer.rank_rows(), trainer.caption_ids)
    for step in range(args.warmup):
        trainer.train_step(batches[step])
    _sync(trainer.device)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        result = trainer.train_step(batches[step])
    float(result["loss"])  # waits for the device
    return args.steps * args.batch_size / (time.perf_counter() - start), trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", help="denoiser preset the next flags override")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--dim", type=int, default=256, help="width, also the condition width (default 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--side", type=int, default=16, help="token grid side (default 16: N = 256)")
    parser.add_argument("--codebook", type=int, default=1024, help="K (default 1024)")
    parser.add_argument("--text-layers", type=int, default=1, help="layers of the trained text model (default 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--precisions", default="no,bf16", help="comma-separated: no, bf16, fp16 (CUDA)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the peak-measuring matmuls")
    parser.add_argument("--threads", default=None, help="comma-separated CPU thread counts to compare, e.g. 1,2 "
                        "(default: torch's current setting)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    threads = [int(n) for n in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        token_dir = write_random_tokens(Path(tmp) / "tokens", 256, args.codebook, args.side)
        for count in threads:
            torch.set_num_threads(count)
            for precision in args.precisions.split(","):
                samples_per_s, trainer = measure(args, token_dir, precision)
                flops = model_flops_per_sample(trainer)
                peak = matmul_peak(dtypes[precision], device, args.matmul_size, seconds=2.0)
                achieved = samples_per_s * flops
                rows.append((count, precision, samples_per_s, flops, achieved, peak))
    cfg = trainer.denoiser.config
    params = trainer.denoiser.num_parameters()
    print(
        f"denoiser: {cfg.num_layers} layers, dim {cfg.dim}, {cfg.num_heads} heads, K={cfg.num_classes}, "
        f"N={cfg.num_tokens}, {params / 1e6:.1f}M params; text model {args.text_layers} layer(s), 77 x {cfg.dim}; "
        f"batch {args.batch_size}; device {device}; torch {torch.__version__}"
    )
    print()
    print("| threads | precision | samples/s | model GFLOP/sample | achieved GFLOP/s | matmul peak GFLOP/s | % peak |")
    print("|---|---|---|---|---|---|---|")
    for count, precision, sps, flops, achieved, peak in rows:
        name = "fp32" if precision == "no" else f"{precision} autocast"
        cells = [str(count), name, f"{sps:.1f}", f"{flops / 1e9:.2f}", f"{achieved / 1e9:.1f}", f"{peak / 1e9:.1f}"]
        print("| " + " | ".join([*cells, f"{100 * achieved / peak:.1f}"]) + " |")


if __name__ == "__main__":
    main()
