"""float16 pipelines: the denoiser runs in half, the VQ decoder in float32 unless forced (docs/design.md §11.2).

The test decoder overflows float16 by construction: its input projection is scaled by 10 and its stem
convolution by 1e5 (every weight stays below float16's largest value, 65504), so the stem's activations
(up to about 3e5) pass 65504, while in float32 every later GroupNorm (the residual stream ends in
``out_norm``) takes the scale out again and the images stay finite.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from support.weights import tiny_label_components

from vqdiffusion import VQDiffusionPipeline
from vqdiffusion.config import ConfigError
from vqdiffusion.models.vqvae import VQVAE, VQVAEConfig

F16_MAX = torch.finfo(torch.float16).max  # 65504


def overflowing(vqvae: VQVAE) -> VQVAE:
    with torch.no_grad():
        for conv, scale in ((vqvae.post_quant_proj, 10.0), (vqvae.decoder.stem, 1e5)):
            conv.weight.mul_(scale)
            conv.bias.mul_(scale)
    return vqvae


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parts = tiny_label_components("class")
    parts = dataclasses.replace(parts, vqvae=overflowing(parts.vqvae))
    path = tmp_path_factory.mktemp("half") / "class"
    VQDiffusionPipeline.from_components(parts).save_pretrained(path)
    return path


def generate(pipe: VQDiffusionPipeline):
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    return pipe([0, 1, 2], generator=generators, output_type="pt", progress=False)


def test_the_test_decoder_overflows_float16_and_not_float32(model_dir: Path) -> None:
    vqvae = VQDiffusionPipeline.from_pretrained(model_dir).vqvae
    tokens = torch.randint(0, vqvae.config.num_embeddings, (2, 4, 4))
    stem = vqvae.decoder.stem(vqvae.post_quant_proj(vqvae.lookup(tokens)))
    assert stem.abs().max() > 2 * F16_MAX  # in float32
    assert max(p.abs().max() for p in vqvae.parameters()) < F16_MAX / 2  # the weights fit float16
    assert torch.isfinite(vqvae.decode_tokens(tokens, clamp=False)).all()
    with pytest.warns(RuntimeWarning, match="overflowed float16"):
        half = vqvae.half().decode_tokens(tokens, clamp=False)
    assert not torch.isfinite(half).all()


def test_float16_pipeline_upcasts_the_decoder_and_gives_finite_images(model_dir: Path) -> None:
    pipe = VQDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float16)
    assert pipe.dtype == torch.float16
    assert {p.dtype for p in pipe.denoiser.parameters()} == {torch.float16}
    assert {p.dtype for p in pipe.vqvae.parameters()} == {torch.float32}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = generate(pipe)
    assert torch.isfinite(result.images).all() and result.images.dtype == torch.float32
    # the images are what the float32 decoder of the saved weights makes of the sampled tokens
    reference = VQDiffusionPipeline.from_pretrained(model_dir)
    torch.testing.assert_close(result.images, reference.decode(result.tokens), rtol=0, atol=0)
    assert result.images.std() > 0.01  # not a flat (all NaN -> 0) image
    # moving again keeps the rule: float32 everywhere, then half with the decoder upcast
    pipe.to(dtype=torch.float32)
    assert {p.dtype for p in pipe.denoiser.parameters()} == {torch.float32}
    pipe.to(dtype=torch.float16)
    assert {p.dtype for p in pipe.vqvae.parameters()} == {torch.float32}
    # bfloat16 has float32's range: the decoder runs in it
    assert pipe.vqvae.dtype_for(torch.bfloat16) == torch.bfloat16


def test_forcing_half_on_an_overflowing_decoder_is_an_error(model_dir: Path, tmp_path: Path) -> None:
    """The VQ-VAE's own decode warns; the pipeline refuses the NaN pixels, naming the decoder and the fix."""
    forced = tmp_path / "forced"
    VQDiffusionPipeline.from_pretrained(model_dir).save_pretrained(forced)
    config = json.loads((forced / "vqvae" / "config.json").read_text())
    assert config["force_upcast"] is True  # written out, so a model folder can turn it off
    (forced / "vqvae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    pipe = VQDiffusionPipeline.from_pretrained(forced, dtype=torch.float16)
    assert {p.dtype for p in pipe.vqvae.parameters()} == {torch.float16}
    with (
        pytest.warns(RuntimeWarning, match=r"VQ decoder overflowed float16 .*force_upcast"),
        pytest.raises(ValueError, match=r"VQ-VAE decoder produced NaN or infinite pixels in float16.*force_upcast"),
    ):
        generate(pipe)
    tokens = pipe([0], output_type="tokens", progress=False).tokens
    with torch.no_grad(), pytest.warns(RuntimeWarning):  # the pixels really are NaN or inf
        assert not torch.isfinite(pipe.vqvae.decode_tokens(tokens.clone(), clamp=False)).all()


def test_forced_half_on_a_decoder_that_fits_is_quiet() -> None:
    parts = tiny_label_components("class")
    vqvae = VQVAE(dataclasses.replace(parts.vqvae.config, force_upcast=False))
    vqvae.load_state_dict(parts.vqvae.state_dict())
    pipe = VQDiffusionPipeline.from_components(dataclasses.replace(parts, vqvae=vqvae)).to(dtype=torch.float16)
    assert {p.dtype for p in pipe.vqvae.parameters()} == {torch.float16}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = generate(pipe)
    assert torch.isfinite(result.images).all()


def test_force_upcast_must_be_a_bool() -> None:
    base = tiny_label_components("class").vqvae.config.to_dict()
    with pytest.raises(ConfigError, match="force_upcast must be true or false"):
        VQVAEConfig.from_dict({**base, "force_upcast": "no"})
