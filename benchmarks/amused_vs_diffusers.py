"""Sampling speed: vqdiffusion's AmusedPipeline vs diffusers' AmusedPipeline, identical random weights.

Builds diffusers' aMUSEd components with random weights at the amused-256 shape (``UVit2DModel``: hidden
1024, 22 layers, 16 heads, GEGLU 2816, 768 conv channels with 3 ConvNeXt blocks per stage, a 16 x 16 token
grid of 8192 codes; CLIP ViT-L/14's text model with projection, 12 layers of 768), saves them with
``save_pretrained``, loads that folder with ``vqdiffusion.VQDiffusionPipeline.from_pretrained`` and runs both
with aMUSEd's defaults (12 steps, guidance 10, the empty prompt as null, temperature (2, 0), cosine masking;
ours: ``sampler="confidence"``, whose defaults for this model are aMUSEd's step rule) from the same seed.
Prints seconds per call and the ratio diffusers / ours, and whether the two gave the same tokens.

The VQ decoder is kept small (f = 16, 32 channels) and is not timed unless ``--decode``: it is the same
convolution stack in both.  ``--layers`` reduces the transformer's depth for a slow CPU.  The machine may
be shared: each time is the best (and the median) of ``--repeats`` runs after a short warm-up.

    python benchmarks/amused_vs_diffusers.py                         # amused-256 shape, batch 1 and 8
    python benchmarks/amused_vs_diffusers.py --layers 2 --repeats 1  # a loaded CPU
    python benchmarks/amused_vs_diffusers.py --device cuda --dtype float16
    python benchmarks/amused_vs_diffusers.py --layers 1 --res-blocks 0 --text-layers 1 --profile  # where time goes

``--profile`` runs one call of each under ``torch.profiler`` (CPU time) instead of the timing table and prints
the seconds per call in four parts: the network (the transformer without its head, per step), the head (the
final projection to the 8192 codes), softmax + draw (softmax / log_softmax, multinomial, the Gumbel noise and
the sort outside the network) and the rest (text encoder, Python, small tensor ops).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.testing import randomize_
from vqdiffusion.text_vocab import build_char_clip_tokenizer

PROMPTS = ["a photo of a cat", "a red bird on a branch", "a city at night", "a bowl of fruit"]


def amused_256_transformer(layers: int, res_blocks: int = 3) -> dict:
    """diffusers' UVit2DModel config of amused-256 (``num_hidden_layers`` = ``layers``, ``num_res_blocks`` =
    ``res_blocks``)."""
    return dict(
        hidden_size=1024, use_bias=False, cond_embed_dim=768, micro_cond_encode_dim=256, micro_cond_embed_dim=1280,
        encoder_hidden_size=768, vocab_size=8256, codebook_size=8192, in_channels=768, block_out_channels=768,
        num_res_blocks=res_blocks, downsample=False, upsample=False, block_num_heads=12, num_hidden_layers=layers,
        num_attention_heads=16, intermediate_size=2816, layer_norm_eps=1e-6, ln_elementwise_affine=True,
        sample_size=16,
    )  # fmt: skip


def build_reference(layers: int, text_layers: int, res_blocks: int = 3, seed: int = 0):
    """diffusers' AmusedPipeline with random weights at the amused-256 shape (small VQ decoder)."""
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from diffusers.pipelines.deprecated.amused.pipeline_amused import AmusedPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    transformer = UVit2DModel(**amused_256_transformer(layers, res_blocks))
    vqvae = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5, block_out_channels=(32,) * 5, layers_per_block=1,
        latent_channels=64, num_vq_embeddings=8192, norm_num_groups=8, sample_size=256,
        mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True,
    )  # fmt: skip
    tokenizer = build_char_clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=text_layers,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    for i, module in enumerate((transformer, vqvae, text_encoder)):
        randomize_(module, seed * 10 + i, 0.02, gain_std=0.1)
    pipe = AmusedPipeline(
        vqvae=vqvae.eval(),
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        transformer=transformer.eval(),
        scheduler=AmusedScheduler(mask_token_id=8255, masking_schedule="cosine"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn, repeats: int, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, object]:
    """(best, median) seconds of ``repeats`` calls of ``fn`` by ``clock`` and its last result."""
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = clock()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(clock() - start)
    return min(times), statistics.median(times), out


# Top-level operators outside the network that belong to "softmax + draw".
DRAW_OPS = ("softmax", "multinomial", "uniform_", "sort", "exponential_")


def _ranges(modules: dict[str, torch.nn.Module]) -> list:
    """Forward hooks that open a ``torch.profiler.record_function(name)`` range around each module's call."""
    handles = []
    for name, module in modules.items():
        open_ranges: list = []

        def enter(_module, _inputs, name=name, open_ranges=open_ranges):
            open_ranges.append(torch.profiler.record_function(name))
            open_ranges[-1].__enter__()

        def leave(_module, _inputs, _output, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def profile_parts(run: Callable[[], object], modules: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Seconds of one call of ``run`` by part (CPU time): ``network`` (the range of ``modules["network"]``
    without ``head``), ``head``, ``softmax + draw`` (top-level :data:`DRAW_OPS` outside the ranges), ``other``
    (the wall time left: text encoder, Python, small ops)."""
    from torch.profiler import ProfilerActivity, profile

    handles = _ranges(modules)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            run()
            wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    seconds = {name: 0.0 for name in modules}
    draw = 0.0
    for event in prof.events():
        if event.name in seconds:
            seconds[event.name] += event.cpu_time_total / 1e6
        elif event.cpu_parent is None and any(op in event.name for op in DRAW_OPS):
            draw += event.cpu_time_total / 1e6
    network, head = seconds["network"] - seconds["head"], seconds["head"]
    return {"network": network, "head": head, "softmax + draw": draw, "other": wall - network - head - draw}


def print_profile(reference, ours, run_theirs, run_ours, prompts: list[str], steps: int) -> None:
    """The table of :func:`profile_parts` for both pipelines (seconds per call, and the share of the call)."""
    theirs = profile_parts(
        lambda: run_theirs(prompts, steps),
        {"network": reference.transformer, "head": reference.transformer.mlm_layer.conv2},
    )
    mine = profile_parts(lambda: run_ours(prompts, steps), {"network": ours.denoiser, "head": ours.denoiser.head})
    total_t, total_o = sum(theirs.values()), sum(mine.values())
    print(f"batch {len(prompts)}, {steps} steps, one profiled call each (CPU time)")
    print("| part | diffusers s/call | ours s/call |")
    print("| --- | --- | --- |")
    for part in theirs:
        print(f"| {part} | {theirs[part]:.3f} ({theirs[part] / total_t:.0%}) | {mine[part]:.3f} "
              f"({mine[part] / total_o:.0%}) |")  # fmt: skip
    print(f"| total | {total_t:.3f} | {total_o:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="transformer layers (amused-256: 22)")
    parser.add_argument("--res-blocks", type=int, default=3, help="ConvNeXt blocks per stage (amused-256: 3)")
    parser.add_argument("--text-layers", type=int, default=12, help="CLIP text layers (ViT-L/14: 12)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--decode", action="store_true", help="time the VQ decoding too")
    parser.add_argument("--profile", action="store_true", help="where the time goes (torch.profiler), per batch")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: time.perf_counter (a quiet machine); thread: the main thread's CPU time, one intra-op thread "
        "(meaningful on a shared machine)",
    )
    args = parser.parse_args()
    clock = time.perf_counter
    if args.clock == "thread":
        if args.device != "cpu":
            parser.error("--clock thread times the CPU's main thread: use it with --device cpu")
        torch.set_num_threads(1)
        clock = time.thread_time
    dtype = getattr(torch, args.dtype)

    reference = build_reference(args.layers, args.text_layers, args.res_blocks)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = VQDiffusionPipeline.from_pretrained(tmp, torch_dtype=dtype)
    reference.to(args.device, dtype)
    ours.to(args.device)
    theirs_type, ours_type = ("pt", "pt") if args.decode else ("latent", "tokens")
    if args.decode:  # the tokens are compared on a separate run of theirs
        reference.set_progress_bar_config(disable=True)

    def run_theirs(prompts: list[str], steps: int) -> torch.Tensor:
        gen = torch.Generator(device=args.device).manual_seed(0)
        return reference(prompts, num_inference_steps=steps, generator=gen, output_type=theirs_type).images

    def theirs_tokens(prompts: list[str]) -> torch.Tensor:
        gen = torch.Generator(device=args.device).manual_seed(0)
        return reference(prompts, num_inference_steps=args.steps, generator=gen, output_type="latent").images.cpu()

    def run_ours(prompts: list[str], steps: int):
        gen = torch.Generator(device=args.device).manual_seed(0)
        return ours(prompts, num_inference_steps=steps, sampler="confidence", generator=gen, output_type=ours_type,
                    progress=False)  # fmt: skip

    params = sum(p.numel() for p in ours.denoiser.parameters())
    print(f"transformer: {args.layers} layers, {args.res_blocks} res blocks per stage, {params / 1e6:.0f}M "
          f"parameters; text: {args.text_layers} layers; "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} threads, clock {args.clock}, {args.steps} steps, "
          "guidance 10")  # fmt: skip
    print("| batch | diffusers s/call (best, median) | ours s/call (best, median) | diffusers / ours | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        run_theirs(PROMPTS[:1], 1), run_ours(PROMPTS[:1], 1)  # warm-up
        if args.profile:
            for batch in args.batches:
                prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
                print_profile(reference, ours, run_theirs, run_ours, prompts, args.steps)
            return
        for batch in args.batches:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            t_best, t_med, theirs = timed(lambda p=prompts: run_theirs(p, args.steps), args.repeats, clock)
            o_best, o_med, got = timed(lambda p=prompts: run_ours(p, args.steps), args.repeats, clock)
            want = theirs_tokens(prompts) if args.decode else theirs.cpu()
            same = torch.equal(got.tokens.cpu(), want)
            print(f"| {batch} | {t_best:.2f}, {t_med:.2f} | {o_best:.2f}, {o_med:.2f} | {t_best / o_best:.2f}x | "
                  f"{'yes' if same else 'no'} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
