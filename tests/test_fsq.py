"""Finite scalar quantization (docs/design.md §13): the math against brute force, the VQ-VAE's FSQ path, and
an FSQ tokenizer trained, resumed, exported and used through the command line."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from support.data import make_blocks_dir

from vqdiffusion.cli import main
from vqdiffusion.config import ConfigError
from vqdiffusion.data.folders import image_to_tensor, load_image
from vqdiffusion.data.tokens import TokenDataset
from vqdiffusion.formats.diffusers_vqvae import vqvae_config_to_diffusers
from vqdiffusion.models.fsq import (
    FSQCodebook,
    fsq_bound,
    fsq_codes_to_indices,
    fsq_grid,
    fsq_indices_to_codes,
    fsq_quantize,
    fsq_round,
)
from vqdiffusion.models.vqvae import VQVAE, VQVAEConfig, load_vqvae, save_vqvae
from vqdiffusion.training.vqvae_config import VQVAETrainConfig
from vqdiffusion.training.vqvae_trainer import VQVAETrainer

LEVEL_SETS = [(8, 5, 5, 5), (2, 3), (7,), (4, 2, 6)]
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 255, 255], [0, 0, 0]], np.uint8)


def integer_levels(level: int) -> list[int]:
    """The L integers a dimension rounds to, written out: L consecutive integers around 0, the extra one on
    the negative side for even L."""
    return list(range(-(level // 2), -(level // 2) + level))


# ---------------------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_rounding_is_the_nearest_grid_point_by_brute_force(levels):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(500, len(levels), generator=generator, dtype=torch.float64) * 2
    bounded = fsq_bound(z, levels)
    rounded = fsq_round(bounded)
    grid = torch.tensor(list(itertools.product(*(integer_levels(level) for level in levels))), dtype=torch.float64)
    distance = (bounded.unsqueeze(1) - grid.unsqueeze(0)).square().sum(dim=-1)  # [500, K]
    assert torch.equal(rounded, grid[distance.argmin(dim=1)])
    # fsq_quantize gives the same point, scaled by L // 2, and its index names that point
    codes, indices = fsq_quantize(z, levels)
    half = torch.tensor([level // 2 for level in levels], dtype=torch.float64)
    assert torch.allclose(codes, rounded / half, atol=0, rtol=0)
    assert torch.allclose(fsq_indices_to_codes(indices, levels).double(), codes, atol=1e-7)


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_indices_and_codes_are_a_bijection_over_the_whole_grid(levels):
    k = math.prod(levels)
    indices = torch.arange(k)
    codes = fsq_indices_to_codes(indices, levels)
    assert codes.shape == (k, len(levels)) and codes.dtype == torch.float32
    assert len({tuple(row) for row in codes.tolist()}) == k  # K distinct codes
    assert torch.equal(fsq_codes_to_indices(codes, levels), indices)
    assert codes.min() >= -1 and codes.max() <= 1
    # mixed radix, dimension 0 least significant, written out by hand
    digits = [[(i // math.prod(levels[:d])) % levels[d] for d in range(len(levels))] for i in range(k)]
    expected = torch.tensor(
        [[(dig - lv // 2) / (lv // 2) for dig, lv in zip(row, levels, strict=True)] for row in digits]
    )
    assert torch.allclose(codes, expected.float())
    assert torch.equal(fsq_grid(levels), codes)


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_bounded_values_stay_in_range_and_hit_every_level(levels):
    z = torch.cat([torch.linspace(-30, 30, 4001).unsqueeze(1).expand(-1, len(levels)), torch.zeros(1, len(levels))])
    bounded = fsq_bound(z, levels)
    for d, level in enumerate(levels):
        low, high = -(level // 2), (level - 1) // 2
        assert bounded[:, d].min() >= low - 0.5 and bounded[:, d].max() <= high + 0.5
        assert sorted(set(torch.round(bounded[:, d]).tolist())) == integer_levels(level)
    # a zero latent is a grid point for L >= 3 (the shift's purpose)
    for d, level in enumerate(levels):
        if level >= 3:
            assert abs(float(bounded[-1, d])) < 1e-6


def test_straight_through_gradient_is_the_identity():
    x = torch.tensor([-1.7, -0.5, 0.2, 0.5, 2.49], requires_grad=True)
    y = fsq_round(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)
    # through the whole quantizer the gradient is that of the bounding alone
    levels = (8, 5)
    z = torch.randn(6, 2, requires_grad=True)
    codes, _ = fsq_quantize(z, levels)
    codes.sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (fsq_bound(z2, levels) / torch.tensor([4.0, 2.0])).sum().backward()
    assert torch.allclose(z.grad, z2.grad)


def test_fsq_codebook_is_a_codebook_over_the_grid():
    codebook = FSQCodebook((4, 3))
    assert codebook.num_embeddings == 12 and "weight" in dict(codebook.named_buffers())
    assert list(codebook.state_dict()) == ["weight"] and not list(codebook.parameters())
    z = torch.randn(50, 2)
    tokens = codebook.nearest(z)
    assert torch.equal(codebook.lookup(tokens), fsq_quantize(z, (4, 3))[0])
    with pytest.raises(ValueError, match=">= 2"):
        FSQCodebook((4, 1))


# ---------------------------------------------------------------------------------------------------------
# The model and its config
# ---------------------------------------------------------------------------------------------------------
def fsq_model_config(levels=(4, 3, 2)) -> VQVAEConfig:
    data = VQVAEConfig.preset("tiny").to_dict()
    data.update(embed_dim=len(levels), num_embeddings=math.prod(levels), quantizer="fsq", fsq_levels=list(levels))
    return VQVAEConfig.from_dict(data)


def test_config_validation_and_old_configs_load():
    data = VQVAEConfig.preset("tiny").to_dict()
    del data["quantizer"], data["fsq_levels"]  # a config.json written before FSQ
    assert VQVAEConfig.from_dict(data).quantizer == "vq"
    config = fsq_model_config()
    assert VQVAEConfig.from_dict(config.to_dict()) == config
    bad = [
        (dict(embed_dim=4), "embed_dim=4 must equal len(fsq_levels)=3"),
        (dict(num_embeddings=16), "num_embeddings=16 must equal prod(fsq_levels)=24"),
        (dict(fsq_levels=[4, 1, 6], num_embeddings=24), "one integer >= 2"),
        (dict(quantizer="vq"), "fsq_levels=[4, 3, 2] is for quantizer='fsq'"),
        (dict(quantizer="lfq"), "quantizer must be one of"),
    ]
    for change, words in bad:
        with pytest.raises(ConfigError, match=re.escape(words)):
            VQVAEConfig.from_dict({**config.to_dict(), **change})


def test_vqvae_fsq_forward_has_no_vq_losses_and_saves(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(fsq_model_config())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(images)
    assert torch.equal(out.commitment_loss, torch.zeros(2)) and torch.equal(out.codebook_loss, torch.zeros(2))
    out.reconstruction.square().mean().backward()
    assert model.encoder.stem.weight.grad.abs().sum() > 0  # the straight-through gradient reaches the encoder
    z = model.encode_latents(images)
    z_q, tokens = model.quantize(z)
    assert torch.allclose(z_q, model.lookup(tokens))  # the quantised latent is the codebook row of its token
    save_vqvae(model, tmp_path / "vq")
    loaded = load_vqvae(tmp_path / "vq")
    assert isinstance(loaded.codebook, FSQCodebook)
    assert torch.equal(loaded.encode(images), model.encode(images))
    # weights saved with other levels (same K and d) do not load silently
    data = model.config.to_dict()
    (tmp_path / "vq" / "config.json").write_text(__import__("json").dumps({**data, "fsq_levels": [2, 3, 4]}))
    with pytest.raises(ValueError, match="not the FSQ grid"):
        load_vqvae(tmp_path / "vq")


def test_trainer_fsq_has_no_codebook_state_and_resumes(tmp_path):
    config = VQVAETrainConfig(
        data_dir=str(tmp_path),
        output_dir=str(tmp_path / "run"),
        image_size=16,
        quantizer="fsq",
        fsq_levels=(4, 3, 2),
        device="cpu",
        progress=False,
    )
    assert config.model_config().embed_dim == 3 and config.model_config().num_embeddings == 24
    batches = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(4)]
    straight = VQVAETrainer(config)
    for batch in batches:
        result = straight.train_step(batch)
    assert float(result["commit"]) == 0 and not result["restarted"].any() and result["restarted"].shape == (24,)
    first = VQVAETrainer(config)
    for batch in batches[:2]:
        first.train_step(batch)
    first.save(tmp_path / "c.safetensors")
    tensors, _ = first.state_tensors()
    assert not any(key.startswith("codebook_ema.") for key in tensors)
    resumed = VQVAETrainer.from_checkpoint(tmp_path / "c.safetensors")
    for batch in batches[2:]:
        resumed.train_step(batch)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (dict(codebook_init="kmeans"), "codebook_init='kmeans' (--codebook-init)"),
        (dict(code_restart="distance"), "code_restart='distance'"),
        (dict(codebook_l2=True), "codebook_l2=True"),
        (dict(dead_code_threshold=5), "dead_code_threshold=5"),
        (dict(num_embeddings=256), "num_embeddings=256 must equal prod(fsq_levels)=24"),
        (dict(fsq_levels=()), "needs fsq_levels"),
    ],
)
def test_train_config_refuses_codebook_settings_with_fsq(tmp_path, change, words):
    base = dict(data_dir=str(tmp_path), output_dir=str(tmp_path), quantizer="fsq", fsq_levels=(4, 3, 2))
    with pytest.raises(ConfigError) as err:
        VQVAETrainConfig(**{**base, **change})
    assert words in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# The command line: train, resume, export, tokenize
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory):
    root = make_blocks_dir(tmp_path_factory.mktemp("blocks"), PALETTE, 8)
    for png in root.glob("*.png"):
        png.with_suffix(".txt").write_text("coloured blocks")
    return root


def test_cli_trains_resumes_exports_and_tokenizes_an_fsq_tokenizer(blocks_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = [str(blocks_dir), "--out", str(out), "--image-size", "16", "--batch-size", "4", "--device", "cpu"]
    fsq = ["--quantizer", "fsq", "--fsq-levels", "5,4,3"]
    assert main(["train-vqvae", *common, *fsq, "--steps", "3", "--quiet"]) == 0
    assert main(["train-vqvae", *common, "--steps", "5", "--resume", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "vqvae")
    model = load_vqvae(out / "vqvae")
    assert model.config.quantizer == "fsq" and model.config.fsq_levels == (5, 4, 3)
    assert model.config.num_embeddings == 60 and model.config.embed_dim == 3
    tok = tmp_path / "tok"
    argv = ["tokenize", str(blocks_dir), "--vqvae", str(out / "vqvae"), "--out", str(tok), "--image-size", "16"]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 0
    data = TokenDataset(tok)
    assert data.num_classes == 60
    images = torch.stack([image_to_tensor(load_image(blocks_dir / name, 16)) for name in data.files])
    assert torch.equal(data.tokens.long(), model.eval().encode(images))


def test_an_fsq_tokenizer_serves_a_whole_model(blocks_dir, tmp_path, capsys):
    """Train the tokenizer, tokenize, train a denoiser one step, export (half precision), info, generate,
    eval-tokenizer; the diffusers layout is refused."""
    vq, tok, run, model = (tmp_path / name for name in ("vq", "tok", "run", "model"))
    argv = [str(blocks_dir), "--out", str(vq), "--image-size", "16", "--batch-size", "4", "--steps", "2"]
    assert (
        main(["train-vqvae", *argv, "--quantizer", "fsq", "--fsq-levels", "4,3,2", "--device", "cpu", "--quiet"]) == 0
    )
    assert main(["tokenize", str(blocks_dir), "--vqvae", str(vq / "vqvae"), "--out", str(tok), "--quiet"]) == 0
    train = ["train", str(tok), "--out", str(run), "--preset", "tiny", "--train-text-model", "--cond-dim", "32"]
    train += ["--text-heads", "2", "--text-max-length", "16", "--batch-size", "4", "--steps", "1", "--device", "cpu"]
    assert main([*train, "--quiet"]) == 0
    assert main(["export", str(run), str(model), "--half"]) == 0
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vqvae"]["quantizer"] == "fsq" and info["vqvae"]["fsq_levels"] == [4, 3, 2]
    assert info["vqvae"]["num_embeddings"] == 24 and info["denoiser"]["num_classes"] == 24
    out = tmp_path / "g.png"
    assert main(["generate", "coloured blocks", "--model", str(model), "--steps", "2", "--output", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["eval-tokenizer", str(model), "--n", "2", "--out", str(tmp_path / "ev")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| tokenizer ceiling") and lines[-2].startswith("tokenizer PSNR")
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["quantizer"] == "fsq" and set(report["ceiling"]["sets"]) == {"single_seen", "two_objects", "heldout"}
    assert main(["convert", str(model), str(tmp_path / "d"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "FSQ" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="no FSQ bounding step"):
        vqvae_config_to_diffusers(load_vqvae(model).config)
