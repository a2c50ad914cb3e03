"""Codebook math for a lean, distinct codebook: k-means init, cosine lookup with unit codes, distinct restarts,
and their hooks in the tokenizer trainer (exact resume, unchanged export format)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from support.data import make_blocks_dir

from vqdiffusion.cli.train_vqvae import add_train_vqvae_parser, run_train_vqvae
from vqdiffusion.config import ConfigError
from vqdiffusion.io import load_weights
from vqdiffusion.models.vqvae import VQVAE, Codebook, load_vqvae
from vqdiffusion.training.codebook import EMACodebook
from vqdiffusion.training.codebook_init import (
    distinct_rows,
    distortion,
    kmeans,
    kmeans_plus_plus,
    l2_normalize,
    lloyd_step,
    squared_distances,
)
from vqdiffusion.training.regularizers import crop_tokens, pad_background, pad_consistency_loss
from vqdiffusion.training.vqvae import train_vqvae
from vqdiffusion.training.vqvae_config import VQVAETrainConfig
from vqdiffusion.training.vqvae_trainer import VQVAETrainer

# Eight well-separated 2-D cluster centres and 40 points around each (std 0.05).
CENTRES = torch.tensor([[x, y] for x in (0.0, 10.0) for y in (0.0, 10.0, 20.0, 30.0)])


def clustered(seed: int = 0, per: int = 40, std: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (CENTRES.repeat_interleave(per, 0) + std * torch.randn(len(CENTRES) * per, 2, generator=g)).float()


# ---------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------


def test_squared_distances_match_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g)
    direct = torch.tensor([[float(((xi - ck) ** 2).sum()) for ck in c] for xi in x])
    assert torch.allclose(squared_distances(x, c), direct, atol=1e-5)
    assert distortion(x, c) == pytest.approx(float(direct.min(dim=1).values.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="same width"):
        squared_distances(x, torch.randn(5, 4))


def test_kmeans_finds_known_clusters_and_beats_random_init():
    x = clustered()
    centres = kmeans(x, 8, iters=5, generator=torch.Generator().manual_seed(0))
    # every true centre has exactly one found centre next to it
    d = torch.cdist(CENTRES, centres)
    assert torch.equal(d.argmin(dim=1).sort().values, torch.arange(8))
    assert float(d.min(dim=1).values.max()) < 0.05
    # distortion is about the noise variance (2 * 0.05^2 = 0.005) ...
    assert distortion(x, centres) < 0.01
    # ... and far below random initialisations (8 uniformly drawn points, as "data" init does)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        random_init = x[torch.randint(len(x), (8,), generator=g)]
        assert distortion(x, random_init) > 10 * distortion(x, centres)
    # deterministic given the generator
    again = kmeans(x, 8, iters=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(centres, again)


def test_kmeans_plus_plus_seeds_distinct_clusters_and_handles_duplicates():
    x = clustered(std=0.0)  # 8 distinct points, each 40 times
    seeds = kmeans_plus_plus(x, 8, torch.Generator().manual_seed(3))
    # D^2 weighting never picks a point already chosen: one seed per cluster
    assert len({tuple(row.tolist()) for row in seeds}) == 8
    more = kmeans_plus_plus(x, 12, torch.Generator().manual_seed(3))  # more seeds than distinct points
    assert more.shape == (12, 2) and len({tuple(row.tolist()) for row in more}) == 8
    with pytest.raises(ValueError, match="k must be a positive integer"):
        kmeans_plus_plus(x, 0)


def test_lloyd_step_moves_centres_to_means_and_keeps_empty_ones():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    c = torch.tensor([[1.0, 1.0], [9.0, 9.0], [100.0, 100.0]])
    new, assign = lloyd_step(x, c)
    assert assign.tolist() == [0, 0, 1]
    assert torch.equal(new, torch.tensor([[1.0, 0.0], [10.0, 10.0], [100.0, 100.0]]))
    sph, _ = lloyd_step(l2_normalize(x + 1), l2_normalize(c), spherical=True)
    assert torch.allclose(sph.norm(dim=1), torch.ones(3))


def test_distinct_rows_never_duplicate_live_codes_or_each_other():
    live = CENTRES[:6]
    # 100 copies of each live code (a "background" blob), plus three new points
    z = torch.cat([live.repeat(100, 1), torch.tensor([[50.0, 50.0], [60.0, 0.0], [-40.0, 5.0]])])
    for seed in range(20):
        rows = distinct_rows(z, live, 3, torch.Generator().manual_seed(seed))
        assert sorted(rows.tolist()) == [600, 601, 602], rows  # only the three new points can be drawn
    # asking for more than there are distinct rows: the rest is -1 (left as is)
    rows = distinct_rows(z, live, 5, torch.Generator().manual_seed(0))
    assert sorted(rows.tolist()) == [-1, -1, 600, 601, 602]
    # uniform draws (the "uniform" restart) pick copies of live codes almost always: 600 of 603 rows
    uniform = torch.randint(len(z), (300,), generator=torch.Generator().manual_seed(0))
    assert int((uniform < 600).sum()) > 290


def test_unit_codes_make_euclidean_nearest_equal_cosine_nearest():
    g = torch.Generator().manual_seed(0)
    codebook = Codebook(64, 8)
    with torch.no_grad():
        codebook.weight.copy_(l2_normalize(torch.randn(64, 8, generator=g)))
    z = torch.randn(5000, 8, generator=g) * torch.rand(5000, 1, generator=g) * 10  # raw latents, any norm
    cosine = (l2_normalize(z) @ codebook.weight.t()).argmax(dim=1)
    assert torch.equal(codebook.nearest(z), cosine)  # raw z, Euclidean
    assert torch.equal(codebook.nearest(l2_normalize(z)), cosine)  # normalised z, Euclidean
    # without unit codes the claim fails (a control showing that the test can fail)
    with torch.no_grad():
        codebook.weight.mul_(torch.rand(64, 1, generator=g) * 3 + 0.1)
    assert not torch.equal(codebook.nearest(z), cosine)


def test_ema_codebook_l2_keeps_unit_codes_and_distance_restart():
    codebook = Codebook(4, 2)
    ema = EMACodebook(codebook, decay=0.9, dead_code_threshold=1, l2=True, restart="distance")
    assert torch.allclose(codebook.weight.norm(dim=1), torch.ones(4))
    with torch.no_grad():
        codebook.weight.copy_(l2_normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])))
    ema = EMACodebook(codebook, decay=0.9, dead_code_threshold=1, l2=True, restart="distance")
    # all latents next to code 0, one near code 1: codes 2 and 3 become dead after one step
    z = l2_normalize(torch.tensor([[1.0, 0.01]] * 50 + [[0.1, 1.0], [1.0, -0.02]]))
    restarted = ema.update(z, codebook.nearest(z), step=1, generator=torch.Generator().manual_seed(0))
    assert restarted.tolist() == [False, False, True, True]
    assert torch.allclose(codebook.weight.norm(dim=1), torch.ones(4))
    # the restarted codes are latents, and two different ones (the 50 copies of one latent count once)
    assert all(any(torch.equal(codebook.weight[k], row) for row in z) for k in (2, 3))
    assert not torch.equal(codebook.weight[2], codebook.weight[3])
    with pytest.raises(ValueError, match="restart"):
        EMACodebook(Codebook(4, 2), restart="bogus")


# ---------------------------------------------------------------------------------------------------------
# Trainer hooks
# ---------------------------------------------------------------------------------------------------------

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0], [0, 0, 0]], np.uint8)


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory):
    """Twelve 16x16 PNGs of four solid 8x8 blocks (black twice as likely as each colour)."""
    return make_blocks_dir(tmp_path_factory.mktemp("blocks"), PALETTE, 12)


def make_config(data_dir, out_dir, **overrides):
    base = dict(
        data_dir=str(data_dir),
        output_dir=str(out_dir),
        image_size=16,
        batch_size=4,
        steps=8,
        lr=1e-3,
        save_every=1000,
        sample_every=1000,
        log_every=2,
        device="cpu",
        progress=False,
        codebook_l2=True,
        embed_dim=4,
        codebook_init="kmeans",
        kmeans_images=8,
        code_restart="distance",
        dead_code_threshold=2,
    )
    base.update(overrides)
    return VQVAETrainConfig(**base)


def test_new_options_resume_bit_exact_and_export_loads_unchanged(blocks_dir, tmp_path):
    straight = train_vqvae(make_config(blocks_dir, tmp_path / "a"))
    train_vqvae(make_config(blocks_dir, tmp_path / "b", steps=4))
    resumed = train_vqvae(make_config(blocks_dir, tmp_path / "b"), resume=True)
    a, b = load_weights(straight / "model.safetensors"), load_weights(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the export is a plain VQVAE with unit codes; its Euclidean encode is the trainer's cosine lookup
    model = load_vqvae(straight)
    assert type(model) is VQVAE and set(a) == set(model.state_dict())
    assert torch.allclose(model.codebook.weight.norm(dim=1), torch.ones(model.config.num_embeddings), atol=1e-5)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = model.encode_latents(images)
    cosine = torch.einsum("bdhw,kd->bkhw", l2_normalize(z, dim=1), model.codebook.weight).argmax(dim=1)
    assert torch.equal(model.encode(images), cosine)


def test_kmeans_init_uses_the_k_means_of_the_encoder_outputs(blocks_dir, tmp_path):
    config = make_config(blocks_dir, tmp_path, codebook_l2=False, code_restart="uniform", num_embeddings=8)
    trainer = VQVAETrainer(config)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    state = trainer.generator.get_state()
    trainer.init_codebook(images)
    with torch.no_grad():
        z = trainer.model.encode_latents(images)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    generator = torch.Generator()
    generator.set_state(state)
    expected = kmeans(flat, 8, iters=config.kmeans_iters, generator=generator)
    assert torch.allclose(trainer.model.codebook.weight, expected)
    assert trainer.codebook_initialised
    before = trainer.model.codebook.weight.clone()
    trainer.train_step(images[:4])  # step 0 keeps the k-means codes (up to one EMA update)
    data = VQVAETrainer(dataclasses_replace(config, codebook_init="data"))
    assert distortion(flat, before) < distortion(flat, data.model.codebook.weight)


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_cli_flags_and_validation(blocks_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vqdiffusion")
    add_train_vqvae_parser(parser.add_subparsers(dest="command"))
    common = [str(blocks_dir), "--out", str(tmp_path / "run"), "--image-size", "16", "--batch-size", "4", "--quiet"]
    flags = ["--codebook-l2", "--embed-dim", "4", "--codebook-init", "kmeans", "--kmeans-images", "8"]
    flags += ["--kmeans-iters", "3", "--code-restart", "distance", "--steps", "2", "--device", "cpu"]
    flags += ["--pad-consistency", "0.5", "--pad-consistency-images", "2"]
    assert run_train_vqvae(parser.parse_args(["train-vqvae", *common, *flags])) == 0
    saved = VQVAETrainConfig.load_json(tmp_path / "run" / "train_config.json")
    assert saved.codebook_l2 and saved.codebook_init == "kmeans" and saved.kmeans_iters == 3
    assert saved.code_restart == "distance" and saved.kmeans_images == 8
    assert saved.pad_consistency == 0.5 and saved.pad_consistency_images == 2
    # a resumed run keeps the checkpoint's options without repeating the flags
    args = parser.parse_args(["train-vqvae", *common, "--steps", "3", "--resume", "--device", "cpu"])
    assert run_train_vqvae(args) == 0
    with pytest.raises(ConfigError, match="code_restart"):
        make_config(blocks_dir, tmp_path, code_restart="random")
    with pytest.raises(ConfigError, match="kmeans_images"):
        make_config(blocks_dir, tmp_path, kmeans_images=0)
    with pytest.raises(ConfigError, match="codebook_l2"):
        make_config(blocks_dir, tmp_path, codebook_l2=1)


# ---------------------------------------------------------------------------------------------------------
# Padding consistency
# ---------------------------------------------------------------------------------------------------------


def test_pad_background_crop_and_pad_consistency_loss():
    images = torch.zeros(2, 3, 4, 4)
    padded = pad_background(images, 2)
    assert padded.shape == (2, 3, 8, 8)
    assert (padded[..., :2, :] == -1).all() and (padded[..., 2:6, 2:6] == 0).all()
    z = torch.ones(2, 5, 3, 3)
    z_padded = torch.full((2, 5, 5, 5), 7.0)  # the border ring (1 token) differs ...
    z_padded[..., 1:4, 1:4] = 1.0  # ... the centre equals z
    assert torch.equal(crop_tokens(z_padded, 1), z)
    assert torch.equal(pad_consistency_loss(z, z_padded, 1), torch.zeros(2))
    z_padded[1, :, 1:4, 1:4] = 3.0  # second example off by 2 everywhere: squared difference 4, scale (1 + 9) / 2
    assert torch.allclose(pad_consistency_loss(z, z_padded, 1), torch.tensor([0.0, 4.0 / 5.0]))
    # scale-free: the same relative error at 10x the scale
    assert torch.allclose(pad_consistency_loss(10 * z, 10 * z_padded, 1), torch.tensor([0.0, 0.8]))
    with pytest.raises(ValueError, match="do not match"):
        pad_consistency_loss(z, z_padded, 0)
    with pytest.raises(ValueError, match="cannot crop"):
        crop_tokens(z, 2)


def test_pad_consistency_term_trains_and_changes_nothing_when_off(blocks_dir, tmp_path):
    off = make_config(blocks_dir, tmp_path, codebook_init="data", codebook_l2=False, code_restart="uniform")
    on = dataclasses_replace(off, pad_consistency=1.0, pad_consistency_images=2)
    batch = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a, b = VQVAETrainer(off), VQVAETrainer(on)
    ra, rb = a.train_step(batch), b.train_step(batch)
    # same reconstruction terms at step 0 (same init, same batch); the total loss adds weight * L_pad > 0
    assert torch.equal(ra["rec"], rb["rec"]) and float(rb["loss"]) > float(ra["loss"])
    with pytest.raises(ConfigError, match="pad_consistency"):
        dataclasses_replace(off, pad_consistency=-1.0)
