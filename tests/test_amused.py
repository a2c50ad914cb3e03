"""aMUSEd conformance: a tiny random ``AmusedPipeline`` (diffusers' ``UVit2DModel`` + ``VQModel`` +
transformers' ``CLIPTextModelWithProjection``) saved with ``save_pretrained`` and read by our loader; our
network, VQ decoder, text encoder and confidence step against diffusers' to float tolerance, draw for draw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.amused import CODEBOOK, MASK, SIDE, uvit_args
from support.amused import perturb as _perturb
from support.amused import reference_pipeline as _reference_pipeline
from support.tokenizers import write_tiny_tokenizer

from vqdiffusion.config import ConfigError
from vqdiffusion.formats.amused import (
    AmusedComponents,
    diffusers_to_uvit_key_map,
    find_variant_weights,
    is_amused_folder,
    load_amused,
    save_amused,
    uvit_config_from_diffusers,
    uvit_state_dict_from_diffusers,
    uvit_state_dict_to_diffusers,
)
from vqdiffusion.formats.keymap import ConversionError
from vqdiffusion.maskgit import amused_confidence_step, amused_temperatures
from vqdiffusion.models.uvit import AmusedCondition, UVit, UVitConfig, default_micro_conditions

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.deprecated.amused.pipeline_amused import AmusedPipeline  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> AmusedPipeline:
    tokenizer_dir = write_tiny_tokenizer(tmp_path_factory.mktemp("amused_tokenizer"), model_max_length=16)
    return _reference_pipeline(tokenizer_dir)


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("amused") / "amused-tiny"
    reference.save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def ours(folder) -> AmusedComponents:
    return load_amused(folder)


def _condition(batch: int, seed: int = 0) -> AmusedCondition:
    gen = torch.Generator().manual_seed(seed)
    micro = torch.stack([default_micro_conditions(256, 192, crop=(3, 5), aesthetic_score=5.5)] * batch)
    return AmusedCondition(torch.randn(batch, 7, 24, generator=gen), torch.randn(batch, 12, generator=gen), micro)


def _ids(batch: int, seed: int = 0) -> torch.Tensor:
    """[B, h, w] in aMUSEd's vocabulary: row 0 partly masked, row 1 all masked, the others unmasked."""
    ids = torch.randint(0, CODEBOOK, (batch, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))
    ids[0, ::2] = MASK
    ids[1] = MASK
    return ids


def _ours_tokens(ids: torch.Tensor) -> torch.Tensor:
    flat = ids.reshape(ids.shape[0], -1)
    return flat.masked_fill(flat == MASK, CODEBOOK)


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"downsample": False, "upsample": False, "use_bias": True, "block_out_channels": 16},
        {"ln_elementwise_affine": False, "num_res_blocks": 2, "hidden_size": 16, "block_out_channels": 16},
        {"num_res_blocks": 0, "downsample": True, "upsample": True, "use_bias": True},
    ],
)
def test_logits_equal_uvit2d(overrides):
    """Our U-ViT's logits (and log-probs) equal ``UVit2DModel.forward`` on the same ids, hidden states, pooled
    embedding and micro-conditions; the key map round-trips every tensor bit for bit."""
    from diffusers import UVit2DModel

    torch.manual_seed(1)
    ref = UVit2DModel(**uvit_args(**overrides)).eval()
    _perturb(ref, 1)
    config = uvit_config_from_diffusers(dict(ref.config), mask_token_id=MASK)
    model = UVit(config).eval()
    model.load_state_dict(uvit_state_dict_from_diffusers(ref.state_dict(), config), strict=True)
    back = uvit_state_dict_to_diffusers(model.state_dict(), config)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())

    cond, ids = _condition(3), _ids(3)
    with torch.no_grad():
        expected = ref(ids, encoder_hidden_states=cond.hidden_states, pooled_text_emb=cond.pooled,
                       micro_conds=cond.micro_conds)  # fmt: skip
        logits = model(_ours_tokens(ids), cond, return_logits=True)
        log_p = model(_ours_tokens(ids), cond)
    assert logits.shape == (3, CODEBOOK, SIDE * SIDE) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected.flatten(2), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(log_p, torch.log_softmax(expected.flatten(2), dim=1), atol=ATOL, rtol=1e-5)
    assert logits.transpose(1, 2).is_contiguous()  # the denoiser's layout: classes contiguous


def test_guidance_groups_share_the_embedding(ours):
    """A condition cache of G * B rows (e.g. [null; text]) with B grids gives the rows of G separate calls."""
    model = ours.transformer
    cond = _condition(4, seed=3)
    x_t = _ours_tokens(_ids(2))
    with torch.no_grad():
        joint = model(x_t, cond_cache=model.precompute_condition(cond), return_logits=True)
        parts = [
            model(x_t, AmusedCondition(cond.hidden_states[s], cond.pooled[s], cond.micro_conds[s]), return_logits=True)
            for s in (slice(0, 2), slice(2, 4))
        ]
    torch.testing.assert_close(joint, torch.cat(parts), atol=1e-6, rtol=1e-6)


def test_network_checks_inputs(ours):
    model = ours.transformer
    cond = _condition(2)
    with pytest.raises(ValueError, match=r"x_t values must lie in \[0, 30\]"):
        model(torch.full((2, 16), 31), cond)
    with pytest.raises(ValueError, match=r"x_t must be \[B, 16\]"):
        model(torch.zeros(2, 15, dtype=torch.long), cond)
    with pytest.raises(ValueError, match=r"cond.pooled must be a float tensor \[2, 12\]"):
        model(
            torch.zeros(2, 16, dtype=torch.long),
            AmusedCondition(cond.hidden_states, cond.pooled[:, :3], cond.micro_conds),
        )
    with pytest.raises(ValueError, match="exactly one of cond and cond_cache"):
        model(torch.zeros(2, 16, dtype=torch.long))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("micro_cond_embed_dim", 21, r"micro_cond_embed_dim=21 must be 5 x micro_cond_encode_dim = 20"),
        ("hidden_size", 30, r"hidden_size=30 is not divisible by num_attention_heads=4"),
        ("mask_token_id", 3, r"mask_token_id must lie in \[codebook_size, vocab_size\) = \[30, 40\)"),
        ("codebook_size", 40, r"vocab_size=40 must exceed codebook_size=40"),
        ("use_bias", 1, r"use_bias must be true or false"),
        ("upsample", False, r"downsample=True but upsample=False"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    args = {k: v for k, v in uvit_args().items()}
    args[field] = value
    with pytest.raises(ConfigError, match=message):
        UVitConfig(**args)


def test_config_from_diffusers_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus'\]"):
        uvit_config_from_diffusers({**uvit_args(), "bogus": 1})
    assert uvit_config_from_diffusers({"_class_name": "UVit2DModel"}) == UVitConfig(sample_size=64)


def test_key_map_names_every_family():
    config = uvit_config_from_diffusers(uvit_args(use_bias=True, block_out_channels=16))
    key_map = diffusers_to_uvit_key_map(config)
    assert key_map["transformer_layers.1.norm3.norm.weight"] == "layers.1.norm_mlp.norm.weight"
    assert key_map["transformer_layers.0.ff.net.0.proj.weight"] == "layers.0.mlp_in.weight"
    assert key_map["down_block.attention_blocks.0.kv_mapper.bias"] == "down.attn_blocks.0.context_proj.bias"
    assert key_map["up_block.upsample.conv.weight"] == "up.up.conv.weight"
    assert key_map["mlm_layer.conv2.weight"] == "head.weight"
    assert key_map["down_block.res_blocks.0.channelwise_norm.gamma"] == "down.res_blocks.0.grn.gamma"


def test_key_map_refuses_a_mismatched_checkpoint(reference):
    config = uvit_config_from_diffusers(dict(reference.transformer.config), mask_token_id=MASK)
    state = dict(reference.transformer.state_dict())
    state["transformer_layers.0.attn1.to_q.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match=r"shape mismatch for 'transformer_layers.0.attn1.to_q.weight'"):
        uvit_state_dict_from_diffusers(state, config)
    state = dict(reference.transformer.state_dict())
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"1 unmapped key\(s\), e.g. \['extra.weight'\]"):
        uvit_state_dict_from_diffusers(state, config)


# ---------------------------------------------------------------------------------------------------------
# The folder, the VQ decoder, the text encoder
# ---------------------------------------------------------------------------------------------------------
def test_loader_reads_save_pretrained(reference, folder, ours):
    """Every part of the saved folder loads; the transformer equals the saved reference to float tolerance."""
    assert is_amused_folder(folder)
    assert (ours.mask_token_id, ours.masking_schedule, ours.force_upcast) == (MASK, "cosine", True)
    assert ours.token_shape == (SIDE, SIDE) and ours.image_size == 8
    assert ours.transformer.config.mask_embedding_id == MASK
    assert ours.vqvae.config.token_shape == (SIDE, SIDE)  # not diffusers' VQModel sample_size
    cond, ids = _condition(2, seed=5), _ids(2, seed=5)
    with torch.no_grad():
        expected = reference.transformer(ids, encoder_hidden_states=cond.hidden_states, pooled_text_emb=cond.pooled,
                                         micro_conds=cond.micro_conds)  # fmt: skip
        got = ours.transformer(_ours_tokens(ids), cond, return_logits=True)
    torch.testing.assert_close(got, expected.flatten(2), atol=ATOL, rtol=1e-5)


def test_vq_decode_equals_vqmodel_lookup(reference, ours):
    """Our decode of a token grid equals ``VQModel.decode(tokens, force_not_quantize=True, shape=...)``
    (the codebook lookup path aMUSEd's pipeline takes, lookup_from_codebook=True)."""
    tokens = torch.randint(0, CODEBOOK, (2, SIDE, SIDE), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.vqvae.decode(tokens, force_not_quantize=True, shape=(2, SIDE, SIDE, 8)).sample
        got = ours.vqvae.decode_tokens(tokens, clamp=False)
    assert got.shape == (2, 3, 8, 8)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def _reference_text(reference: AmusedPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``AmusedPipeline.__call__`` feeds the transformer for ``prompts``."""
    ids = reference.tokenizer(
        prompts,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=reference.tokenizer.model_max_length,
    ).input_ids
    out = reference.text_encoder(ids, return_dict=True, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def test_text_encoding_equals_the_pipeline(reference, ours):
    """Penultimate hidden states and pooled projection, as the pipeline computes them: short, empty and
    truncated prompts (the tokenizer's padding; a long prompt keeps its EOS)."""
    prompts = ["a photo of a cat", "", "the red dog sitting on a blue table " * 3]
    with torch.no_grad():
        hidden, pooled = ours.text_encoder.encode(prompts)
        want_hidden, want_pooled = _reference_text(reference, prompts)
        null_hidden, null_pooled = ours.text_encoder.encode_unconditional(2)
    assert hidden.shape == (3, 16, 24) and pooled.shape == (3, 12)
    torch.testing.assert_close(hidden, want_hidden, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(null_hidden, want_hidden[1:2].expand(2, -1, -1))
    torch.testing.assert_close(null_pooled, want_pooled[1:2].expand(2, -1))


def test_variant_and_dtype(reference, folder, tmp_path):
    """``variant="fp16"`` reads ``<stem>.fp16.safetensors``; ``dtype`` casts, but a force_upcast VQ stays float32."""
    root = tmp_path / "fp16"
    reference.save_pretrained(str(root), variant="fp16")
    assert (root / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert find_variant_weights(root / "transformer", "fp16").name == "diffusion_pytorch_model.fp16.safetensors"
    loaded = load_amused(root, variant="fp16", dtype=torch.float16)
    assert loaded.transformer.dtype == torch.float16 and loaded.text_encoder.dtype == torch.float16
    assert next(loaded.vqvae.parameters()).dtype == torch.float32
    # plain weights when the variant is absent
    assert find_variant_weights(folder / "transformer", "fp16").name == "diffusion_pytorch_model.safetensors"
    with pytest.raises(FileNotFoundError, match="no weights in"):
        find_variant_weights(tmp_path, "fp16")


def test_loader_errors(folder, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "VQDiffusionPipeline"}))
    assert not is_amused_folder(root)
    with pytest.raises(ValueError, match="not an AmusedPipeline"):
        load_amused(root)
    (root / "model_index.json").write_text(json.dumps(index))
    sched = root / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({"mask_token_id": MASK, "masking_schedule": "square"}))
    with pytest.raises(ConfigError, match=r"masking_schedule must be one of \('cosine', 'linear'\), got 'square'"):
        load_amused(root)
    sched.write_text(json.dumps({"mask_token_id": 5}))
    with pytest.raises(ConfigError, match=r"mask_token_id must lie in \[codebook_size, vocab_size\)"):
        load_amused(root)


def test_our_save_reloads_in_diffusers(reference, ours, tmp_path):
    """``save_amused`` writes a folder that ``AmusedPipeline.from_pretrained`` loads with the same tensors."""
    root = save_amused(ours, tmp_path / "ours")
    again = AmusedPipeline.from_pretrained(str(root))
    for name in ("transformer", "vqvae", "text_encoder"):
        mine, theirs = getattr(again, name).state_dict(), getattr(reference, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
    assert again.scheduler.config.mask_token_id == MASK
    assert load_amused(root).transformer.config == ours.transformer.config


# ---------------------------------------------------------------------------------------------------------
# The sampler, draw for draw
# ---------------------------------------------------------------------------------------------------------
def test_confidence_step_equals_amused_scheduler():
    """Every step of ``AmusedScheduler.step`` (cosine and linear), from the same generator state."""
    from diffusers import AmusedScheduler

    B, S = 3, 5
    for schedule in ("cosine", "linear"):
        scheduler = AmusedScheduler(mask_token_id=MASK, masking_schedule=schedule)
        scheduler.set_timesteps(S, (2, 0))
        temperatures = amused_temperatures(S, (2.0, 0.0))
        torch.testing.assert_close(temperatures, scheduler.temperatures)
        theirs = torch.full((B, SIDE, SIDE), MASK)
        mine = torch.full((B, SIDE * SIDE), CODEBOOK)
        for i, timestep in enumerate(scheduler.timesteps):
            logits = 3 * torch.randn(B, CODEBOOK, SIDE, SIDE, generator=torch.Generator().manual_seed(10 + i))
            gen_a, gen_b = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
            out = scheduler.step(logits, timestep, theirs, generator=gen_a)
            mine, candidates = amused_confidence_step(
                logits.flatten(2), mine, i, S, temperatures=temperatures, masking_schedule=schedule, generator=gen_b
            )
            theirs = out.prev_sample
            assert torch.equal(_ours_tokens(theirs), mine), (schedule, i)
            assert torch.equal(out.pred_original_sample.flatten(1), candidates), (schedule, i)
            assert torch.equal(gen_a.get_state(), gen_b.get_state())
        assert not (mine == CODEBOOK).any()


def test_generation_equals_amused_pipeline(reference, ours):
    """A whole guided run (4 steps, guidance 3, the empty prompt as null) with our network, text encoder,
    confidence step and VQ decoder gives diffusers' tokens and images."""
    prompts, steps, scale = ["a photo of a cat", "a red bird"], 4, 3.0
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        want_tokens = reference(prompts, num_inference_steps=steps, guidance_scale=scale, generator=gen,
                                output_type="latent").images  # fmt: skip
        gen = torch.Generator().manual_seed(123)
        want_images = reference(prompts, num_inference_steps=steps, guidance_scale=scale, generator=gen,
                                output_type="pt").images  # fmt: skip

        model, text = ours.transformer, ours.text_encoder
        hidden, pooled = text.encode(prompts)
        null_hidden, null_pooled = text.encode_unconditional(len(prompts))
        micro = default_micro_conditions(8, 8).expand(2 * len(prompts), -1)
        cond = AmusedCondition(torch.cat([null_hidden, hidden]), torch.cat([null_pooled, pooled]), micro)
        cache = model.precompute_condition(cond)
        temperatures = amused_temperatures(steps)
        x_t = torch.full((len(prompts), SIDE * SIDE), CODEBOOK)
        gen = torch.Generator().manual_seed(123)
        for i in range(steps):
            null, cond_logits = model(x_t, cond_cache=cache, return_logits=True).chunk(2)
            logits = null + scale * (cond_logits - null)
            x_t, _ = amused_confidence_step(logits, x_t, i, steps, temperatures=temperatures, generator=gen)
        images = ours.vqvae.decode_tokens(x_t.view(-1, SIDE, SIDE), clamp=False).clamp(0, 1)
    assert torch.equal(x_t.view(-1, SIDE, SIDE), want_tokens)
    torch.testing.assert_close(images, want_images, atol=ATOL, rtol=1e-5)


# aMUSEd's published VQ-VAE config (amused-256 and amused-512 share it): f = 16, 8192 codes of width 64.
AMUSED_VQ_CONFIG = {
    "_class_name": "VQModel",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512, 768],
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 64,
    "layers_per_block": 2,
    "lookup_from_codebook": True,
    "mid_block_add_attention": False,
    "norm_num_groups": 32,
    "norm_type": "group",
    "num_vq_embeddings": 8192,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "vq_embed_dim": None,
}


@pytest.mark.parametrize("resample", [False, True])
def test_full_size_key_maps_on_meta(resample):
    """At aMUSEd's full size (diffusers' UVit2DModel defaults, 16 x 16 tokens; with and without the
    down/up resampling of the larger model), built on the meta device: the key map covers every tensor with
    the right shape and the parameter counts agree; the published VQ config converts too."""
    from diffusers import UVit2DModel, VQModel

    from vqdiffusion.formats.diffusers_vqvae import vqvae_config_from_diffusers, vqvae_state_dict_from_diffusers

    with torch.device("meta"):
        ref = UVit2DModel(sample_size=16, downsample=resample, upsample=resample)
        config = uvit_config_from_diffusers(dict(ref.config), mask_token_id=8255)
        mine = UVit(config)
        vq_ref = VQModel(**{k: v for k, v in AMUSED_VQ_CONFIG.items() if not k.startswith("_")})
    converted = uvit_state_dict_from_diffusers(ref.state_dict(), config)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in mine.state_dict().items()}
    assert mine.num_parameters() == sum(p.numel() for p in ref.parameters())
    vq_config = vqvae_config_from_diffusers(AMUSED_VQ_CONFIG)
    assert (vq_config.downsample_factor, vq_config.num_embeddings, vq_config.embed_dim) == (16, 8192, 64)
    assert len(vqvae_state_dict_from_diffusers(vq_ref.state_dict(), vq_config)) == len(vq_ref.state_dict())


def test_half_precision_follows_diffusers(reference, ours):
    """In float16 our network keeps diffusers' casts (RMSNorm statistics in float32, the global condition in
    the module's dtype): the logits agree to float16 accuracy."""
    import copy

    ref, model = copy.deepcopy(reference.transformer).half(), copy.deepcopy(ours.transformer).half()
    cond, ids = _condition(2, seed=9), _ids(2, seed=9)
    half = AmusedCondition(cond.hidden_states.half(), cond.pooled.half(), cond.micro_conds.half())
    with torch.no_grad():
        expected = ref(ids, encoder_hidden_states=half.hidden_states, pooled_text_emb=half.pooled,
                       micro_conds=half.micro_conds).float()  # fmt: skip
        got = model(_ours_tokens(ids), half, return_logits=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.flatten(2), atol=5e-2, rtol=1e-2)


def test_legacy_bin_weights_load_without_pickles(reference, ours, tmp_path):
    """``save_pretrained(safe_serialization=False)`` writes ``.bin`` files; they load through
    ``torch.load(weights_only=True)`` into the same tensors."""
    root = tmp_path / "bin"
    reference.save_pretrained(str(root), safe_serialization=False)
    assert (root / "transformer" / "diffusion_pytorch_model.bin").is_file()
    loaded = load_amused(root)
    for name in ("transformer", "vqvae"):
        mine, theirs = getattr(loaded, name).state_dict(), getattr(ours, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def test_mixed_folder_is_refused(folder, tmp_path):
    """A VQ-VAE whose codebook is not the transformer's K is named in one line."""
    root = tmp_path / "mixed"
    shutil.copytree(folder, root)
    config_path = root / "vqvae" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_vq_embeddings": CODEBOOK + 2}))
    with pytest.raises(ConfigError, match=r"the transformer predicts 30 codes but the VQ-VAE has 32"):
        load_amused(root)
