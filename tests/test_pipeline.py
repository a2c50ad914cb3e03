"""The pipeline against diffusers' VQDiffusionPipeline with identical random weights, step by step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support.weights import TinySpec, save_diffusers_pipeline

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.config import ConfigError
from vqdiffusion.diffusion import truncate_log_probs
from vqdiffusion.samplers import Ancestral, Purity, Uniform
from vqdiffusion.sampling import guided_predictor

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle", "two blue squares at the top"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers pipeline, its diffusers-layout directory, ours loaded with diffusers' padding)."""
    path = tmp_path_factory.mktemp("diffusers_layout")
    ref = save_diffusers_pipeline(path, TinySpec(seed=1))
    ours = VQDiffusionPipeline.from_pretrained(path, text_pad_token_id=None)
    return ref, path, ours


def diffusers_step_distribution(ref, x_t, t, prompt_embeds, guidance, truncation):
    """One diffusers step written out from its pipeline: guidance, truncation, clamp, q_posterior."""
    with torch.no_grad():
        guided = guidance != 1.0
        model_input = torch.cat([x_t, x_t]) if guided else x_t
        out = ref.transformer(model_input, encoder_hidden_states=prompt_embeds, timestep=torch.tensor(t)).sample
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + guidance * (text - uncond)
            out = out - torch.logsumexp(out, dim=1, keepdim=True)
        out = ref.truncate(out, truncation).clamp(-70)
        log_post = out if t == 0 else ref.scheduler.q_posterior(out, x_t, torch.tensor(t))
    return torch.softmax(log_post.double(), dim=1)


def test_encode_prompt_and_null_match_diffusers(pair) -> None:
    ref, _, ours = pair
    theirs = ref._encode_prompt(PROMPTS, 1, True)  # [null; text]
    torch.testing.assert_close(ours.encode_prompt(PROMPTS), theirs[2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.null_embeddings(2), theirs[:2], rtol=0, atol=0)


@pytest.mark.parametrize(("guidance", "truncation"), [(1.0, 1.0), (5.0, 1.0), (3.0, 0.8), (5.0, 0.3)])
def test_step_distributions_match_diffusers(pair, guidance: float, truncation: float) -> None:
    ref, _, ours = pair
    K = ours.schedule.num_classes
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randint(0, K + 1, (2, 16), generator=gen)
    x_t[:, :6] = K
    cond = ours.encode_prompt(PROMPTS)
    null = ours.null_embeddings(2) if guidance != 1.0 else None
    prompt_embeds = torch.cat([null, cond]) if guidance != 1.0 else cond
    predict = guided_predictor(ours.denoiser, cond, null, guidance)
    for t in [99, 60, 1, 0]:
        theirs = diffusers_step_distribution(ref, x_t, t, prompt_embeds, guidance, truncation)
        log_p_x0 = truncate_log_probs(predict(x_t, t), truncation)
        mine = ours.schedule.posterior_log_probs(log_p_x0, x_t, t, -1 if t == 0 else None).double().exp()
        if t == 0:  # diffusers samples x0 directly at the last step: K classes, no [MASK] row
            assert torch.all(mine[:, K] == 0)
            mine = mine[:, :K]
        torch.testing.assert_close(mine, theirs, rtol=0, atol=2e-5, msg=f"t={t}")


def test_decode_matches_diffusers(pair) -> None:
    ref, _, ours = pair
    tokens = torch.randint(0, ours.schedule.num_classes, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = ref.vqvae.quantize.get_codebook_entry(tokens.view(2, -1), shape=(2, 4, 4, ref.vqvae.config.vq_embed_dim))
        theirs = (ref.vqvae.decode(z, force_not_quantize=True).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(ours.decode(tokens), theirs, rtol=0, atol=1e-4)


def test_full_run_shapes_types_and_seed(pair) -> None:
    _, _, ours = pair
    K = ours.schedule.num_classes
    out = ours(
        PROMPTS,
        num_inference_steps=10,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        progress=False,
    )
    assert out.images.shape == (4, 8, 8, 3) and out.images.dtype == np.float32
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.tokens.shape == (4, 4, 4) and out.tokens.max() < K and out.tokens.min() >= 0
    again = ours(
        PROMPTS,
        num_inference_steps=10,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
        output_type="tokens",
        progress=False,
    )
    assert torch.equal(out.tokens, again.tokens) and again.images is None
    other = ours(
        PROMPTS,
        num_inference_steps=10,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(1),
        output_type="tokens",
        progress=False,
    )
    assert not torch.equal(out.tokens, other.tokens)
    pil = ours("a red circle", num_inference_steps=3, output_type="pil", progress=False).images
    assert len(pil) == 1 and pil[0].size == (8, 8)
    pt = ours("a red circle", num_inference_steps=3, output_type="pt", progress=False).images
    assert pt.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("steps", [1, 2, 7, 100])
def test_any_number_of_steps_ends_unmasked(pair, steps: int) -> None:
    _, _, ours = pair
    calls = []
    hook = ours.denoiser.register_forward_hook(lambda m, args, kwargs_out: calls.append(args[1]))
    try:
        tokens = ours("a red circle", num_inference_steps=steps, output_type="tokens", progress=False).tokens
    finally:
        hook.remove()
    assert tokens.max() < ours.schedule.num_classes
    assert len(calls) == steps and calls[0] == 99


@pytest.mark.parametrize("sampler", ["uniform", "purity"])
def test_budget_samplers_through_the_pipeline(pair, sampler: str) -> None:
    _, _, ours = pair
    weight = 1.0 if sampler == "purity" else None
    run = dict(num_inference_steps=10, sampler=sampler, prior_weight=weight, output_type="tokens", progress=False)
    a = ours(PROMPTS, generator=torch.Generator().manual_seed(0), **run).tokens
    b = ours(PROMPTS, generator=torch.Generator().manual_seed(0), **run).tokens
    assert torch.equal(a, b) and int(a.max()) < ours.schedule.num_classes


def test_call_options_override_model_defaults(pair) -> None:
    import dataclasses

    _, _, ours = pair
    saved = ours.defaults
    try:
        ours.defaults = dataclasses.replace(saved, sampler="purity", prior_weight=2.0, tokens_per_call=3)
        assert ours.sampling_options().sampler == Purity(prior_weight=2.0, tokens_per_call=3)
        # another sampler drops the purity-only settings the call does not give
        assert ours.sampling_options(sampler="ancestral").sampler == Ancestral()
        assert ours.sampling_options(sampler="uniform").sampler == Uniform(tokens_per_call=3)
        with pytest.raises(ValueError, match="prior_weight"):
            ours.sampling_options(sampler="uniform", prior_weight=1.0)
    finally:
        ours.defaults = saved


@pytest.mark.parametrize(("guidance", "rows_in"), [(1.0, 2), (5.0, 4)])
def test_guidance_one_costs_one_forward_pass(pair, guidance: float, rows_in: int) -> None:
    """One denoiser call per step; with guidance it reads the [null; text] condition rows for the shared x_t
    and returns the B guided rows."""
    _, _, ours = pair
    calls = []

    def record(module, args, kwargs, out) -> None:
        calls.append((args[0].shape[0], kwargs["cond_cache"][0][0].shape[0], out.shape[0]))

    hook = ours.denoiser.register_forward_hook(record, with_kwargs=True)
    try:
        ours(PROMPTS, num_inference_steps=5, guidance_scale=guidance, output_type="tokens", progress=False)
    finally:
        hook.remove()
    assert calls == [(2, rows_in, 2)] * 5


def guidance_inputs(ours, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t [2, 16] with [MASK] allowed, and the [null; text] condition rows [4, L, D] of PROMPTS."""
    K = ours.schedule.num_classes
    x_t = torch.randint(0, K + 1, (2, 16), generator=torch.Generator().manual_seed(seed))
    return x_t, torch.cat([ours.null_embeddings(2), ours.encode_prompt(PROMPTS)])


@pytest.mark.parametrize("normalize", [True, False])
def test_guidance_before_the_head_equals_guided_log_probs(pair, normalize: bool) -> None:
    """forward(guidance_scale=s) combines the head's input; it must equal log_softmax(l_u + s (l_c - l_u)) of
    the two groups' own logits (the combination of the paper, computed here in float64)."""
    _, _, ours = pair
    x_t, cond = guidance_inputs(ours, seed=3)
    with torch.no_grad():
        kv = ours.denoiser.precompute_condition(cond)
        logits_u, logits_c = ours.denoiser(x_t, 40, cond_cache=kv, return_logits=True).double().chunk(2)
        guided = ours.denoiser(x_t, 40, cond_cache=kv, return_logits=not normalize, guidance_scale=5.0)
    expected = logits_u + 5.0 * (logits_c - logits_u)
    if normalize:
        expected = torch.log_softmax(expected, dim=1)
        torch.testing.assert_close(guided.double(), expected, rtol=0, atol=1e-4)
    else:  # logits are defined up to a per-position constant only in the softmax; here they are exact
        torch.testing.assert_close(guided.double(), expected, rtol=1e-5, atol=1e-4)
    assert guided.shape == (2, ours.schedule.num_classes, 16)


def test_guidance_scale_needs_two_condition_groups(pair) -> None:
    _, _, ours = pair
    x_t = torch.zeros(2, 16, dtype=torch.long)
    kv = ours.denoiser.precompute_condition(ours.encode_prompt(PROMPTS))
    with pytest.raises(ValueError, match=r"two groups \[null; cond\] \(4 rows .* got 2 rows"):
        ours.denoiser(x_t, 40, cond_cache=kv, guidance_scale=5.0)


def test_shared_x_t_groups_equal_explicit_copies(pair) -> None:
    """Sharing the first block's self-attention and cross-attention queries across guidance groups equals
    running the duplicated batch."""
    _, _, ours = pair
    x_t, cond = guidance_inputs(ours, seed=5)
    with torch.no_grad():
        kv = ours.denoiser.precompute_condition(cond)
        shared = ours.denoiser(x_t, torch.tensor([3, 70]), cond_cache=kv)
        explicit = ours.denoiser(torch.cat([x_t, x_t]), torch.tensor([3, 70, 3, 70]), cond)
    torch.testing.assert_close(shared, explicit, rtol=0, atol=1e-5)


def test_save_load_round_trip(pair, tmp_path: Path) -> None:
    _, _, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "vqdiffusion.json").is_file()
    loaded = VQDiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert loaded.text_encoder.pad_token_id == ours.text_encoder.pad_token_id
    a = ours(
        PROMPTS,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(7),
        output_type="tokens",
        progress=False,
    )
    b = loaded(
        PROMPTS,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(7),
        output_type="tokens",
        progress=False,
    )
    assert torch.equal(a.tokens, b.tokens)
    for name, module in ours.modules().items():
        other = loaded.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, other[key]), (name, key)


def test_diffusers_layout_defaults_to_authors_padding(pair) -> None:
    _, path, _ = pair
    pipe = VQDiffusionPipeline.from_pretrained(path)
    assert pipe.text_encoder.pad_token_id == 0


def test_non_learnable_null_uses_empty_prompt(tmp_path: Path) -> None:
    ref = save_diffusers_pipeline(tmp_path, TinySpec(learnable_null=False, seed=2))
    ours = VQDiffusionPipeline.from_pretrained(tmp_path, text_pad_token_id=None)
    assert ours.null_condition is None
    theirs = ref._encode_prompt(PROMPTS, 1, True)
    torch.testing.assert_close(ours.null_embeddings(2), theirs[:2], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": []}, "non-empty"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 101}, "num_inference_steps"),
        ({"prompt": "x", "truncation_rate": 0.0}, "truncation_rate"),
        ({"prompt": "x", "truncation_rate": 1.5}, "truncation_rate"),
        ({"prompt": "x", "guidance_scale": -1.0}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "x", "num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"prompt": "x", "output_type": "jpeg"}, "output_type"),
        ({"prompt": "x", "sampler": "greedy"}, "sampler"),
        ({"prompt": "x", "spacing": "log"}, "spacing"),
        ({"prompt": "x", "temperature": -1.0}, "temperature"),
        ({"prompt": "x", "prior_weight": 1.0}, "prior_weight"),
        ({"prompt": "x", "tokens_per_call": 4}, "tokens_per_call"),
    ],
)
def test_bad_call_arguments(pair, kwargs, match: str) -> None:
    _, _, ours = pair
    with pytest.raises(ValueError, match=match):
        ours(progress=False, **kwargs)


def test_bad_model_directories(pair, tmp_path: Path) -> None:
    _, _, ours = pair
    with pytest.raises(FileNotFoundError):
        VQDiffusionPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a model directory"):
        VQDiffusionPipeline.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="not a model directory"):
        VQDiffusionPipeline.from_pretrained(tmp_path)
    ours.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "denoiser" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        VQDiffusionPipeline.from_pretrained(tmp_path / "m")
    ours.save_pretrained(tmp_path / "m2")
    (tmp_path / "m2" / "schedule.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        VQDiffusionPipeline.from_pretrained(tmp_path / "m2")
    # Weights that do not fit the config: a config with one layer more.
    ours.save_pretrained(tmp_path / "m3")
    cfg_path = tmp_path / "m3" / "denoiser" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        VQDiffusionPipeline.from_pretrained(tmp_path / "m3")
    # A schedule that disagrees with the denoiser.
    ours.save_pretrained(tmp_path / "m4")
    sch_path = tmp_path / "m4" / "schedule.json"
    sch = json.loads(sch_path.read_text())
    sch["num_classes"] += 1
    sch_path.write_text(json.dumps(sch))
    with pytest.raises(ConfigError, match="K="):
        VQDiffusionPipeline.from_pretrained(tmp_path / "m4")


def test_bf16_denoiser_close_to_fp32(pair, tmp_path: Path) -> None:
    _, path, ours = pair
    bf16 = VQDiffusionPipeline.from_pretrained(path, text_pad_token_id=None, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    K = ours.schedule.num_classes
    x_t = torch.randint(0, K + 1, (2, 16), generator=torch.Generator().manual_seed(0))
    cond = ours.encode_prompt(PROMPTS)
    p32 = guided_predictor(ours.denoiser, cond, ours.null_embeddings(2), 5.0)(x_t, 50).exp()
    p16 = guided_predictor(bf16.denoiser, cond.bfloat16(), bf16.null_embeddings(2), 5.0)(x_t, 50).exp()
    assert p16.dtype == torch.float32
    # Documented tolerance of the bf16 mode: per-step probabilities within 0.05 (total variation <= 0.1).
    assert (p16 - p32).abs().max() < 0.05
    assert 0.5 * (p16 - p32).abs().sum(1).max() < 0.1


def test_diffusers_layout_with_legacy_bin_weights(pair, tmp_path: Path) -> None:
    """Published diffusers checkpoints ship ``diffusion_pytorch_model.bin``; they load without unpickling."""
    import shutil

    from safetensors.torch import load_file

    _, path, ours = pair
    copy = tmp_path / "bin_layout"
    shutil.copytree(path, copy)
    for sub in ("vqvae", "transformer", "learned_classifier_free_sampling_embeddings"):
        st = copy / sub / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(str(st)), copy / sub / "diffusion_pytorch_model.bin")
        st.unlink()
    loaded = VQDiffusionPipeline.from_pretrained(copy, text_pad_token_id=None)
    for name in ("vqvae", "denoiser", "null_condition"):
        mine, theirs = ours.modules()[name].state_dict(), loaded.modules()[name].state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # A pickle that holds more than tensors is refused with a clear error.
    torch.save({"weights": torch.zeros(1), "extra": object()}, copy / "vqvae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        VQDiffusionPipeline.from_pretrained(copy)
