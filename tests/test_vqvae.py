"""The VQ autoencoder: equality with diffusers' VQModel on random weights, conversion, configs, inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.weights import randomize_

from vqdiffusion.config import ConfigError
from vqdiffusion.formats.diffusers_vqvae import (
    diffusers_to_vqvae_key_map,
    vqvae_config_from_diffusers,
    vqvae_config_to_diffusers,
    vqvae_state_dict_from_diffusers,
    vqvae_state_dict_to_diffusers,
)
from vqdiffusion.formats.keymap import ConversionError
from vqdiffusion.models.vqvae import VQVAE, Codebook, VQVAEConfig

diffusers = pytest.importorskip("diffusers")

# Small layouts covering 1-3 levels, attention on some levels of either half, with and without middle
# attention, several GroupNorm group counts, a shortcut conv (channel change) and K != embed_dim.
CONFIGS = {
    "one_level_enc_attn": VQVAEConfig(
        block_out_channels=(16,),
        latent_channels=4,
        embed_dim=4,
        num_embeddings=12,
        encoder_attention=(True,),
        decoder_attention=(False,),
        layers_per_block=1,
        mid_attention=True,
        norm_num_groups=8,
        sample_size=8,
    ),
    "two_levels_no_mid_attn": VQVAEConfig(
        block_out_channels=(16, 32),
        latent_channels=6,
        embed_dim=5,
        num_embeddings=20,
        encoder_attention=(False, True),
        decoder_attention=(True, False),
        layers_per_block=1,
        mid_attention=False,
        norm_num_groups=16,
        sample_size=16,
    ),
    "three_levels": VQVAEConfig(
        block_out_channels=(16, 32, 32),
        latent_channels=8,
        embed_dim=6,
        num_embeddings=24,
        encoder_attention=(False, False, True),
        decoder_attention=(False, True, True),
        layers_per_block=2,
        mid_attention=True,
        norm_num_groups=4,
        sample_size=16,
    ),
}


# Moderate random weights, so that no path is trivially zero or identity: GroupNorm scales ~ N(1, 0.1^2),
# everything else ~ N(0, 0.1^2); the codebook ~ N(0, 0.3^2), about the scale of the encoder's latents (see
# `diffusers_pair`, which matches it exactly).
NOISE = dict(std=0.1, gain_std=0.1, std_by_name={"embedding": 0.3, "codebook": 0.3})


def diffusers_pair(config: VQVAEConfig, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    reference = diffusers.VQModel(**vqvae_config_to_diffusers(config)).eval()
    randomize_(reference, generator, **NOISE)
    with torch.no_grad():
        # codebook on the scale of the latents (per channel), so that images map to many different codes
        side = 4 * config.downsample_factor
        latents = reference.encode(random_images(4, side, side, seed=seed + 100)).latents
        scale = latents.std(dim=(0, 2, 3))
        codes = reference.quantize.embedding.weight
        codes.copy_(latents.mean(dim=(0, 2, 3)) + scale * torch.randn(codes.shape, generator=generator))
    ours = VQVAE(config).eval()
    ours.load_state_dict(vqvae_state_dict_from_diffusers(reference.state_dict(), config), strict=True)
    return reference, ours


def random_images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def tiny_model(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    model = VQVAE(VQVAEConfig.preset("tiny")).eval()
    randomize_(model, torch.Generator().manual_seed(seed), **NOISE)
    return model


# ---------------------------------------------------------------------------------------------------------
# Equality with diffusers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_on_random_weights(name: str) -> None:
    config = CONFIGS[name]
    reference, ours = diffusers_pair(config)
    f = config.downsample_factor
    images = random_images(2, 4 * f, 6 * f)  # non-square on purpose
    with torch.no_grad():
        # encode: continuous latents and the chosen code indices
        ref_latents = reference.encode(images).latents
        our_latents = ours.encode_latents(images)
        latent_diff = (ref_latents - our_latents).abs().max().item()
        _, _, (_, _, ref_idx) = reference.quantize(ref_latents)
        tokens = ours.encode(images)
        assert tokens.shape == (2, 4, 6) and tokens.dtype == torch.long
        # diffusers ranks codes by cdist, we by ||e||^2 - 2 z.e (a matmul): rounding differs by ~1e-6, so
        # only a near-tie could flip a choice. Check there is none (best and second-best distances differ by
        # far more than the latent error), then require every token to be equal.
        flat = our_latents.permute(0, 2, 3, 1).reshape(-1, config.embed_dim).double()
        best2 = torch.cdist(flat, ours.codebook.weight.double()).topk(2, largest=False).values
        assert ((best2[:, 1] - best2[:, 0]) / best2[:, 0]).min() > 1e-4
        assert torch.equal(ref_idx.view(tokens.shape), tokens)
        assert tokens.unique().numel() >= 8, "degenerate test: the images map to too few codes"

        # decode: tokens -> diffusers' codebook lookup -> decoder without re-quantising, clamped
        ref_zq = reference.quantize.get_codebook_entry(tokens, shape=(*tokens.shape, config.embed_dim))
        ref_images = reference.decode(ref_zq, force_not_quantize=True).sample
        our_images = ours.decode_tokens(tokens)
        decode_diff = (ref_images.clamp(-1, 1) - our_images).abs().max().item()
        assert ref_images.abs().max() > 0.5, "degenerate test: decoder output is nearly constant"

        # full forward pass (quantise inside)
        ref_recon = reference(images).sample
        our_recon = ours(images).reconstruction
        forward_diff = (ref_recon - our_recon).abs().max().item()
    assert latent_diff < 1e-5
    assert decode_diff < 1e-4
    assert forward_diff < 1e-4


def test_decode_tokens_clamp_flag() -> None:
    reference, ours = diffusers_pair(CONFIGS["two_levels_no_mid_attn"])
    tokens = torch.randint(0, 20, (1, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = ours.decode_tokens(tokens, clamp=False)
        clamped = ours.decode_tokens(tokens)
    assert raw.abs().max() > 1.0, "degenerate test: nothing to clamp"
    assert torch.equal(clamped, raw.clamp(-1, 1))


# ---------------------------------------------------------------------------------------------------------
# State-dict and config conversion
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_round_trip_through_diffusers(name: str) -> None:
    config = CONFIGS[name]
    ours = VQVAE(config)
    randomize_(ours, torch.Generator().manual_seed(5), **NOISE)
    reference = diffusers.VQModel(**vqvae_config_to_diffusers(config))
    reference.load_state_dict(vqvae_state_dict_to_diffusers(ours.state_dict(), config), strict=True)
    back = vqvae_state_dict_from_diffusers(reference.state_dict(), config)
    original = ours.state_dict()
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


def test_key_map_is_one_to_one_and_covers_both_models() -> None:
    config = CONFIGS["three_levels"]
    key_map = diffusers_to_vqvae_key_map(config)
    assert set(key_map) == set(diffusers.VQModel(**vqvae_config_to_diffusers(config)).state_dict())
    assert sorted(key_map.values()) == sorted(VQVAE(config).state_dict())
    assert len(set(key_map.values())) == len(key_map)
    # decoder levels are reversed relative to diffusers' up_blocks
    assert key_map["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "decoder.levels.2.resample.conv.weight"
    assert key_map["decoder.up_blocks.1.attentions.2.to_out.0.bias"] == "decoder.levels.1.attn_blocks.2.proj.bias"


def test_conversion_rejects_bad_state_dicts() -> None:
    config = CONFIGS["one_level_enc_attn"]
    good = diffusers.VQModel(**vqvae_config_to_diffusers(config)).state_dict()
    with pytest.raises(ConversionError, match="unmapped"):
        vqvae_state_dict_from_diffusers({**good, "encoder.extra.weight": torch.zeros(1)}, config)
    missing = dict(good)
    del missing["quantize.embedding.weight"]
    with pytest.raises(ConversionError, match="missing"):
        vqvae_state_dict_from_diffusers(missing, config)
    wrong = {**good, "quantize.embedding.weight": torch.zeros(13, 4)}
    with pytest.raises(ConversionError, match="shape mismatch"):
        vqvae_state_dict_from_diffusers(wrong, config)
    # a checkpoint of another layout (no mid attention) does not fit
    other = dataclasses.replace(config, mid_attention=False)
    with pytest.raises(ConversionError):
        vqvae_state_dict_from_diffusers(good, other)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trip_through_diffusers(name: str) -> None:
    config = CONFIGS[name]
    model = diffusers.VQModel(**vqvae_config_to_diffusers(config))
    assert vqvae_config_from_diffusers(dict(model.config)) == config


def test_config_from_diffusers_defaults_and_rejections() -> None:
    # a config.json with only some keys: the rest take VQModel's defaults (64 channels, K=256, 1 level)
    cfg = vqvae_config_from_diffusers({"_class_name": "VQModel", "latent_channels": 4}, sample_size=64)
    assert cfg.block_out_channels == (64,) and cfg.num_embeddings == 256 and cfg.embed_dim == 4
    assert cfg.sample_size == 64 and cfg.mid_attention
    with pytest.raises(ConfigError, match="spatial"):
        vqvae_config_from_diffusers({"norm_type": "spatial"})
    with pytest.raises(ConfigError, match="relu"):
        vqvae_config_from_diffusers({"act_fn": "relu"})
    with pytest.raises(ConfigError, match="DownBlock2D"):
        vqvae_config_from_diffusers({"down_block_types": ["DownBlock2D"]})
    with pytest.raises(ConfigError, match="2 entries"):
        vqvae_config_from_diffusers({"up_block_types": ["UpDecoderBlock2D"] * 2})
    with pytest.raises(ConfigError, match="mystery"):
        vqvae_config_from_diffusers({"mystery": 1})
    with pytest.raises(ConfigError, match="norm_eps"):
        vqvae_config_to_diffusers(dataclasses.replace(CONFIGS["three_levels"], norm_eps=1e-5))


def test_config_json_round_trip(tmp_path) -> None:
    for config in (*CONFIGS.values(), VQVAEConfig.preset("tiny"), VQVAEConfig.preset("ithq")):
        path = tmp_path / "vqvae.json"
        config.save_json(path)
        assert VQVAEConfig.load_json(path) == config
        assert VQVAEConfig.from_dict(config.to_dict()) == config


def test_presets() -> None:
    tiny = VQVAEConfig.preset("tiny")
    assert tiny.downsample_factor == 2 and tiny.token_shape == (8, 8)
    ithq = VQVAEConfig.preset("ithq")
    assert ithq.downsample_factor == 8 and ithq.token_shape == (32, 32) and ithq.num_embeddings == 4096
    with torch.device("meta"):
        model = VQVAE(ithq)
    assert model.codebook.weight.shape == (4096, 128)
    # the diffusers port of the ITHQ tokenizer uses these block types
    d = vqvae_config_to_diffusers(ithq)
    assert d["down_block_types"][-1] == "AttnDownEncoderBlock2D" and d["up_block_types"][0] == "AttnUpDecoderBlock2D"
    with pytest.raises(ConfigError, match="huge"):
        VQVAEConfig.preset("huge")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(block_out_channels=()), "at least one level"),
        (dict(block_out_channels=(32, 36)), "36"),
        (dict(encoder_attention=(True,)), "encoder_attention"),
        (dict(decoder_attention=(False, 1)), "decoder_attention"),
        (dict(num_embeddings=0), "num_embeddings"),
        (dict(embed_dim=2.0), "embed_dim"),
        (dict(sample_size=15), "sample_size=15"),
        (dict(norm_eps=-1.0), "norm_eps"),
        (dict(layers_per_block=True), "layers_per_block"),
        (dict(mid_attention=1), "mid_attention"),
    ],
)
def test_config_validation(change: dict, match: str) -> None:
    kwargs = {**VQVAEConfig.preset("tiny").to_dict(), **change}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=match):
        VQVAEConfig(**kwargs)


def test_config_from_dict_rejects_unknown_and_missing() -> None:
    data = VQVAEConfig.preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="unknown"):
        VQVAEConfig.from_dict({**data, "codebook_size": 3})
    del data["num_embeddings"]
    with pytest.raises(ConfigError):
        VQVAEConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------------------
# Our model on its own
# ---------------------------------------------------------------------------------------------------------


def test_shapes_non_square() -> None:
    model = tiny_model()
    images = random_images(3, 12, 20)
    with torch.no_grad():
        latents = model.encode_latents(images)
        tokens = model.encode(images)
        z_q, tokens_again = model.quantize(latents)
        decoded = model.decode_tokens(tokens)
    assert latents.shape == (3, 8, 6, 10)
    assert tokens.shape == (3, 6, 10) and tokens.dtype == torch.long
    assert torch.equal(tokens, tokens_again)
    assert torch.equal(z_q, model.lookup(tokens))
    assert decoded.shape == (3, 3, 12, 20)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_nearest_matches_brute_force_and_chunking(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(7)
    codebook = Codebook(37, 5)
    with torch.no_grad():
        codebook.weight.copy_(torch.randn(37, 5, generator=generator))
    z = torch.randn(1000, 5, generator=generator)
    brute = ((z[:, None, :] - codebook.weight[None].detach()) ** 2).sum(-1).argmin(1)
    assert torch.equal(codebook.nearest(z), brute)
    monkeypatch.setattr("vqdiffusion.models.codebook._DISTANCE_CHUNK_ELEMENTS", 37 * 64)  # 16 chunks
    assert torch.equal(codebook.nearest(z), brute)
    # bf16 inputs are compared in float32 and give the float32 answer for the same (rounded) values
    z16 = z.bfloat16()
    assert torch.equal(codebook.nearest(z16), codebook.nearest(z16.float()))


def test_encoding_a_codebook_vector_returns_its_index() -> None:
    model = tiny_model()
    tokens = torch.randint(0, 16, (2, 3, 4), generator=torch.Generator().manual_seed(2))
    _, requantized = model.quantize(model.lookup(tokens))
    # codes of the random codebook are distinct, so each vector is nearest to itself
    assert torch.equal(requantized, tokens)


def test_forward_straight_through_and_loss_terms() -> None:
    model = tiny_model().train()
    images = random_images(2, 8, 8)
    out = model(images)
    assert out.reconstruction.shape == images.shape
    assert out.tokens.shape == (2, 4, 4)
    assert out.commitment_loss.shape == (2,) and out.codebook_loss.shape == (2,)
    assert torch.allclose(out.commitment_loss, out.codebook_loss)  # same value, different gradients
    assert (out.commitment_loss > 0).all()
    # the reconstruction loss reaches the encoder through the straight-through estimator, not the codebook
    out.reconstruction.square().mean().backward(retain_graph=True)
    assert model.encoder.stem.weight.grad is not None and model.encoder.stem.weight.grad.abs().sum() > 0
    assert model.codebook.weight.grad is None or model.codebook.weight.grad.abs().sum() == 0
    model.zero_grad()
    out.codebook_loss.sum().backward(retain_graph=True)
    assert model.codebook.weight.grad.abs().sum() > 0
    assert model.encoder.stem.weight.grad is None or model.encoder.stem.weight.grad.abs().sum() == 0
    model.zero_grad()
    out.commitment_loss.sum().backward()
    assert model.encoder.stem.weight.grad.abs().sum() > 0
    assert model.codebook.weight.grad is None or model.codebook.weight.grad.abs().sum() == 0


def test_encode_does_not_track_gradients() -> None:
    model = tiny_model()
    tokens = model.encode(random_images(1, 8, 8))
    assert not tokens.requires_grad


def test_bfloat16_runs() -> None:
    model = tiny_model()
    images = random_images(2, 8, 12)
    with torch.no_grad():
        tokens32 = model.encode(images)
        decoded32 = model.decode_tokens(tokens32)
        model_bf16 = model.to(torch.bfloat16)
        tokens16 = model_bf16.encode(images.bfloat16())
        decoded16 = model_bf16.decode_tokens(tokens32)
    assert tokens16.shape == tokens32.shape and tokens16.dtype == torch.long
    assert ((tokens16 >= 0) & (tokens16 < 16)).all()
    assert decoded16.dtype == torch.bfloat16 and torch.isfinite(decoded16).all()
    assert (decoded16.float() - decoded32).abs().max() < 0.1


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(1, 4, 8, 8), "4 channels"),
        (torch.zeros(1, 3, 9, 8), "9x8"),
        (torch.zeros(1, 3, 8, 7), "8x7"),
        (torch.zeros(3, 8, 8), "3 dims"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images(images: torch.Tensor, match: str) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model.encode(images)
    with pytest.raises(ValueError, match=match):
        model(images)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (torch.full((1, 2, 2), 16), r"\[0, 16\).*\[MASK\]"),
        (torch.full((1, 2, 2), -1), r"\[0, 16\)"),
        (torch.zeros(1, 2, 2), "integer"),
        (torch.zeros(1, 2, 2, dtype=torch.bool), "integer"),
        (torch.zeros(1, 4, dtype=torch.long), r"\[B, h, w\]"),
    ],
)
def test_bad_tokens(tokens: torch.Tensor, match: str) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model.decode_tokens(tokens)


def test_bad_latents() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="latents"):
        model.quantize(torch.zeros(1, 7, 2, 2))
    with pytest.raises(ValueError, match="quantised latents"):
        model.decode_latents(torch.zeros(1, 8, 2))


def test_int32_tokens_decode_like_int64() -> None:
    model = tiny_model()
    tokens = torch.randint(0, 16, (1, 2, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model.decode_tokens(tokens.int()), model.decode_tokens(tokens))


def test_replicate_encoder_padding_gives_a_flat_image_one_code() -> None:
    """With zero padding the encoder sees a frame around the image, so a flat image gets other latents along
    the borders; replicating the edge makes every latent of a flat image the same (random weights)."""
    import dataclasses

    import torch

    from vqdiffusion.models.vqvae import VQVAE, VQVAEConfig
    from vqdiffusion.testing import randomize_

    base = dataclasses.replace(VQVAEConfig.preset("tiny"), sample_size=32, num_embeddings=64)
    zeros = randomize_(VQVAE(base), 0).eval()
    replicate = VQVAE(dataclasses.replace(base, encoder_padding="replicate")).eval()
    replicate.load_state_dict(zeros.state_dict())  # same weights, same state-dict keys
    flat = torch.full((1, 3, 32, 32), -1.0)
    z_zeros, z_rep = zeros.encode_latents(flat)[0], replicate.encode_latents(flat)[0]  # [D, 4, 4]
    assert (z_rep - z_rep[:, :1, :1]).abs().max() < 1e-5
    assert (z_zeros - z_zeros[:, :1, :1]).abs().max() > 1e-2
    assert replicate.encode(flat).unique().numel() == 1
    tokens = torch.randint(0, 64, (2, 4, 4))
    assert torch.equal(replicate.decode_tokens(tokens), zeros.decode_tokens(tokens))  # the decoder is unchanged
    with pytest.raises(ValueError, match="encoder_padding"):
        dataclasses.replace(base, encoder_padding="reflect")
