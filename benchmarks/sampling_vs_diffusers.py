"""Sampling speed: vqdiffusion vs diffusers' VQDiffusionPipeline, identical random weights, one process.

Builds diffusers components with random weights, saves them in the diffusers layout, loads that directory
with ``vqdiffusion.VQDiffusionPipeline.from_pretrained`` (with diffusers' text padding, so both pipelines
sample the same per-step distributions), runs both for the same number of steps, batch and guidance, and
prints seconds per image per step.  The VQ-VAE is kept small in every config: it is the same code path
for both and is not what this compares.

    python benchmarks/sampling_vs_diffusers.py                 # all configs
    python benchmarks/sampling_vs_diffusers.py --configs small --batches 1
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time

import torch

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.text_vocab import build_char_clip_tokenizer


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
}

PROMPTS = ["a red circle", "a blue square at the top", "two yellow triangles", "a green field under sky"]


def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def build_diffusers_pipeline(cfg: BenchConfig):
    from diffusers import (
        Transformer2DModel,
        VQDiffusionScheduler,
        VQModel,
    )
    from diffusers import (
        VQDiffusionPipeline as DiffusersPipeline,
    )
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = {8: 3, 16: 3, 32: 4}[cfg.side]  # image side 8 * side or so; keep the decoder cheap
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        latent_channels=32,
        num_vq_embeddings=cfg.num_classes,
        vq_embed_dim=32,
        norm_num_groups=8,
        sample_size=cfg.side * 2 ** (levels - 1),
    )
    transformer = Transformer2DModel(
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.width // cfg.heads,
        num_layers=cfg.layers,
        num_vector_embeds=cfg.num_classes + 1,
        sample_size=cfg.side,
        cross_attention_dim=cfg.text_width,
        activation_fn="geglu-approximate",
        attention_bias=True,
        norm_type="ada_norm",
        num_embeds_ada_norm=100,
    )
    tokenizer = build_char_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=8 if cfg.text_width >= 256 else 2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    null = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=cfg.text_width, length=77)
    for i, module in enumerate((vqvae, transformer, text_encoder, null)):
        randomize(module, i)
    scheduler = VQDiffusionScheduler(num_vec_classes=cfg.num_classes + 1, num_train_timesteps=100)
    pipe = DiffusersPipeline(
        vqvae=vqvae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        scheduler=scheduler,
        learned_classifier_free_sampling_embeddings=null,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, prompts: list[str], kwargs: dict) -> None:
    pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs)


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, guidance {args.guidance}")
    header = "| config | batch | steps | diffusers fp32 s/img/step | ours fp32 | speed-up | ours bf16 | speed-up |"
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for name in args.configs:
        cfg = CONFIGS[name]
        ref = build_diffusers_pipeline(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_pretrained(tmp)
            ours = VQDiffusionPipeline.from_pretrained(tmp, text_pad_token_id=None)
            ours_bf16 = (
                None
                if args.no_bf16
                else VQDiffusionPipeline.from_pretrained(tmp, text_pad_token_id=None, dtype=torch.bfloat16)
            )
        for batch in args.batches:
            prompts = (PROMPTS * batch)[:batch]
            call = {
                "num_inference_steps": cfg.steps,
                "guidance_scale": args.guidance,
            }
            run_ref = functools.partial(run_pipeline, ref, prompts, call)
            run_ours = functools.partial(run_pipeline, ours, prompts, {**call, "progress": False})
            run_ref(), run_ours()  # warm-up
            per = batch * cfg.steps
            t_ref = timed(run_ref) / per
            t_ours = timed(run_ours) / per
            cells = [name, str(batch), str(cfg.steps), f"{t_ref:.4f}", f"{t_ours:.4f}", f"{t_ref / t_ours:.2f}x"]
            if ours_bf16 is not None:
                run_bf16 = functools.partial(run_pipeline, ours_bf16, prompts, {**call, "progress": False})
                run_bf16()
                t_bf16 = timed(run_bf16) / per
                cells += [f"{t_bf16:.4f}", f"{t_ref / t_bf16:.2f}x"]
            else:
                cells += ["-", "-"]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
