"""Tokenizer training: shared utilities, the EMA codebook math, learning, exact resume, export and CLI."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from support.data import make_blocks_dir

from vqdiffusion.cli.train_vqvae import add_train_vqvae_parser, run_train_vqvae
from vqdiffusion.config import ConfigError
from vqdiffusion.data.folders import ImageFolder
from vqdiffusion.io import load_into, load_weights
from vqdiffusion.models.vqvae import VQVAE, Codebook, VQVAEConfig, load_vqvae
from vqdiffusion.training.batching import StepBatchSampler
from vqdiffusion.training.checkpoint import (
    capture_rng_state,
    flatten_state,
    load_checkpoint,
    load_optimizer,
    optimizer_to_tensors,
    restore_rng_state,
    save_checkpoint,
    unflatten_state,
)
from vqdiffusion.training.codebook import EMACodebook
from vqdiffusion.training.ema import EMA
from vqdiffusion.training.losses import VGGPerceptualLoss
from vqdiffusion.training.lr_schedule import lr_at
from vqdiffusion.training.metrics import CSVLogger
from vqdiffusion.training.vqvae import train_vqvae
from vqdiffusion.training.vqvae_config import VQVAETrainConfig
from vqdiffusion.training.vqvae_trainer import VQVAETrainer

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 255, 255], [0, 0, 0]], np.uint8)


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory):
    """Eight 16x16 PNGs made of four solid 8x8 blocks with colours from a 6-colour palette."""
    return make_blocks_dir(tmp_path_factory.mktemp("blocks"), PALETTE, 8)


def make_config(data_dir, out_dir, **overrides):
    base = dict(
        data_dir=str(data_dir),
        output_dir=str(out_dir),
        image_size=16,
        batch_size=8,
        steps=10,
        lr=1e-3,
        save_every=1000,
        sample_every=1000,
        log_every=5,
        device="cpu",
        progress=False,
    )
    base.update(overrides)
    return VQVAETrainConfig(**base)


def psnr(model, images):
    with torch.no_grad():
        recon = model.decode_tokens(model.encode(images))
    mse = ((recon - images) / 2).square().mean(dim=(1, 2, 3))
    return float((-10 * torch.log10(mse)).mean())


# ---------------------------------------------------------------------------------------------------------
# Common utilities
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_round_trip_is_exact(tmp_path, opt_cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    kwargs = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {"betas": (0.5, 0.9)}
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.01}]
    opt = opt_cls(groups, lr=0.1, **kwargs)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
    tensors, meta = optimizer_to_tensors(opt)
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"optimizer": meta, "note": (1, 2)})
    loaded, loaded_meta = load_checkpoint(tmp_path / "c.safetensors")
    fresh = opt_cls([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}], lr=0.2, **kwargs)
    load_optimizer(fresh, loaded, loaded_meta["optimizer"])
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, state in a["state"].items():
        assert state.keys() == b["state"][pid].keys()
        for key, value in state.items():
            other = b["state"][pid][key]
            assert (
                (torch.equal(value, other) and value.dtype == other.dtype) if torch.is_tensor(value) else value == other
            )
    with pytest.raises(ValueError, match="parameter group sizes"):
        load_optimizer(torch.optim.Adam(model[0].parameters()), loaded, loaded_meta["optimizer"])


def test_flatten_state_structure_and_checkpoint_errors(tmp_path):
    state = {"a": (1, 2.5, None), 3: [torch.arange(3), {"x": torch.tensor(1.0)}], "s": "text"}
    tensors, meta = flatten_state(state, "p")
    assert set(tensors) == {"p.3.0", "p.3.1.x"}
    back = unflatten_state(meta, tensors)
    assert back["a"] == (1, 2.5, None) and back["s"] == "text" and torch.equal(back[3][0], torch.arange(3))
    with pytest.raises(TypeError, match="cannot store"):
        flatten_state({"d": torch.float32}, "p")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not a vqdiffusion training checkpoint"):
        load_checkpoint(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    shared = torch.arange(4.0)
    save_checkpoint(tmp_path / "s.safetensors", {"a": shared, "b": shared}, {})
    assert torch.equal(load_checkpoint(tmp_path / "s.safetensors")[0]["b"], shared)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_rng_capture_and_restore():
    tensors, meta = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(tensors, meta)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_lr_schedule():
    assert lr_at(0, 1.0, 4, 100) == 0.25 and lr_at(3, 1.0, 4, 100) == 1.0 and lr_at(50, 1.0, 4, 100) == 1.0
    assert lr_at(4, 1.0, 4, 104, "cosine") == 1.0
    assert lr_at(54, 1.0, 4, 104, "cosine") == pytest.approx(0.5)
    assert lr_at(104, 1.0, 4, 104, "cosine", min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 4, 104, "cosine", min_lr=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_at(0, 1.0, 0, 10, "linear")


def test_ema_warmup_decays_by_hand():
    """d_n = min(decay, (1 + n) / (10 + n)): updates 0, 1, 2 use 0.1, 2/11, 0.25; later ones decay."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.25)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        d = [0.1, 2 / 11, 0.25, 0.25][n]
        expected = d * expected + (1 - d) * value
        assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-6)
    assert ema.num_updates == 4


def test_ema_of_parameters():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.75, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], start + 1.0)
    target = torch.nn.Linear(2, 1)
    ema.copy_to(target)
    assert torch.allclose(target.weight, start + 1.0)
    other = EMA(target, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["bias"], ema.shadow["bias"])


def test_csv_logger_resume_truncates(tmp_path):
    path = tmp_path / "m.csv"
    log = CSVLogger(path)
    log.log(1, {"loss": 1.0})
    log.log(2, {"loss": 0.5, "psnr": 10.0})  # a new column rewrites the header
    log.log(3, {"loss": 0.25, "psnr": 11.0})
    log = CSVLogger(path, resume_step=2)
    log.log(3, {"loss": 0.3, "psnr": 12.0})
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["psnr"] == "" and rows[2]["loss"] == "0.3"
    CSVLogger(path)  # a fresh run starts over
    assert path.read_text() == ""


def test_step_batch_sampler_is_a_pure_function_of_the_step():
    sampler = StepBatchSampler(num_items=5, batch_size=3, seed=7, start_step=0, end_step=10)
    batches = list(sampler)
    stream = [i for batch in batches for i in batch]
    for epoch in range(6):
        assert sorted(stream[epoch * 5 : epoch * 5 + 5]) == list(range(5))
    resumed = StepBatchSampler(num_items=5, batch_size=3, seed=7, start_step=4, end_step=10)
    assert list(resumed) == batches[4:]
    assert list(StepBatchSampler(5, 3, 8, 0, 10)) != batches


# ---------------------------------------------------------------------------------------------------------
# EMA codebook
# ---------------------------------------------------------------------------------------------------------


def test_ema_codebook_update_matches_hand_computation():
    codebook = Codebook(3, 2)
    w0 = [[0.0, 0.0], [5.0, 5.0], [1.0, -1.0]]
    with torch.no_grad():
        codebook.weight.copy_(torch.tensor(w0))
    decay, eps = 0.9, 0.1
    ema = EMACodebook(codebook, decay=decay, eps=eps)
    assert not codebook.weight.requires_grad
    z = [[1.0, 2.0], [3.0, 0.0], [0.5, -0.5], [1.5, -2.5]]
    tokens = [0, 0, 2, 2]
    ema.update(torch.tensor(z), torch.tensor(tokens), step=0)
    # by hand: N starts at 1, S at w0
    n = [decay * 1 + (1 - decay) * tokens.count(k) for k in range(3)]
    s = [
        [decay * w0[k][d] + (1 - decay) * sum(z[i][d] for i in range(4) if tokens[i] == k) for d in range(2)]
        for k in range(3)
    ]
    total = sum(n)
    smoothed = [(n[k] + eps) / (total + 3 * eps) * total for k in range(3)]
    expected = [[s[k][d] / smoothed[k] for d in range(2)] for k in range(3)]
    assert n == pytest.approx([1.1, 0.9, 1.1])
    assert torch.allclose(ema.cluster_size, torch.tensor(n))
    assert torch.allclose(ema.embed_sum, torch.tensor(s))
    assert torch.allclose(codebook.weight, torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert torch.equal(ema.last_used, torch.tensor([0, 0, 0]))


def test_dead_codes_are_restarted_from_batch_outputs():
    codebook = Codebook(4, 2)
    with torch.no_grad():
        codebook.weight.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [1.0, 1.0], [-1.0, 1.0]]))
    ema = EMACodebook(codebook, decay=0.99, dead_code_threshold=2)
    generator = torch.Generator().manual_seed(0)
    z = torch.tensor([[0.1, 0.0], [1.1, 0.9], [-0.9, 1.2], [0.0, 0.2], [1.0, 1.2]])
    for step in range(3):
        tokens = codebook.nearest(z)
        assert 1 not in tokens.tolist()
        restarted = ema.update(z, tokens, step, generator)
        if step < 2:
            assert not restarted.any()
    assert restarted.tolist() == [False, True, False, False]
    assert any(torch.equal(codebook.weight[1], row) for row in z)
    assert ema.cluster_size[1] == 1.0 and ema.last_used[1] == 2
    assert torch.equal(ema.embed_sum[1], codebook.weight[1])


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def test_training_improves_reconstruction_and_exports(blocks_dir, tmp_path):
    images = torch.stack([item["image"] for item in ImageFolder(blocks_dir, 16)])
    config = make_config(blocks_dir, tmp_path / "run", steps=120, log_every=20, sample_every=60, save_every=60)
    torch.manual_seed(config.seed)
    start_psnr = psnr(VQVAE(config.model_config()), images)
    exported = train_vqvae(config)
    assert exported == tmp_path / "run" / "vqvae"
    # the exported folder loads with the plain model API
    model = VQVAE(VQVAEConfig.load_json(exported / "config.json"))
    load_into(model, load_weights(exported / "model.safetensors"), str(exported))
    end_psnr = psnr(model, images)
    # measured: about 5.3 dB -> 23 dB (solid-colour blocks, 120 steps; 27 dB after 150)
    assert end_psnr > start_psnr + 6 and end_psnr > 18, (start_psnr, end_psnr)
    assert psnr(load_vqvae(tmp_path / "run"), images) == end_psnr
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(20, 121, 20))
    assert float(rows[-1]["psnr"]) > float(rows[0]["psnr"]) + 6
    assert 0 < float(rows[-1]["codebook_usage"]) <= 1 and 1 <= float(rows[-1]["perplexity"]) <= 16
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "step_00000060.png",
        "step_00000120.png",
    ]
    assert Image.open(tmp_path / "run" / "samples" / "step_00000120.png").size == (8 * 16, 2 * 16)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_00000060.safetensors",
        "step_00000120.safetensors",
    ]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_vqvae(config)


def _batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1 for _ in range(n)]


def _full_state(trainer):
    tensors, meta = trainer.state_tensors()
    return {k: v.clone() for k, v in tensors.items() if not k.startswith("rng.")}, meta


@pytest.mark.parametrize(
    "codebook",
    [
        {},
        {"codebook_l2": True, "codebook_init": "kmeans", "code_restart": "distance", "embed_dim": 4},
        {"pad_consistency": 1.0, "code_restart": "distance"},
    ],
    ids=["default", "l2-kmeans-distance", "pad-consistency"],
)
def test_resume_is_bit_exact_with_gan_and_restarts(blocks_dir, tmp_path, codebook):
    config = make_config(
        blocks_dir, tmp_path, gan_weight=0.1, gan_start_step=2, disc_channels=8, dead_code_threshold=2, **codebook
    )
    batches = _batches(10)
    uninterrupted = VQVAETrainer(config)
    for batch in batches:
        uninterrupted.train_step(batch)

    first = VQVAETrainer(config)
    for batch in batches[:5]:
        first.train_step(batch)
    first.save(tmp_path / "ckpt.safetensors")
    torch.rand(100)  # disturb the global RNG: the checkpoint must restore it
    resumed = VQVAETrainer.from_checkpoint(tmp_path / "ckpt.safetensors")
    assert resumed.step == 5
    for batch in batches[5:]:
        resumed.train_step(batch)

    a, meta_a = _full_state(uninterrupted)
    b, meta_b = _full_state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("disc.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert meta_a == meta_b
    assert torch.equal(uninterrupted.generator.get_state(), resumed.generator.get_state())
    changed = dataclasses.replace(config, lr=5e-4)
    with pytest.raises(ConfigError, match="lr"):
        VQVAETrainer.from_checkpoint(tmp_path / "ckpt.safetensors", changed)


def test_train_vqvae_resume_matches_uninterrupted_run(blocks_dir, tmp_path):
    straight = train_vqvae(make_config(blocks_dir, tmp_path / "a", steps=8, dead_code_threshold=3))
    train_vqvae(make_config(blocks_dir, tmp_path / "b", steps=4, dead_code_threshold=3))
    resumed = train_vqvae(make_config(blocks_dir, tmp_path / "b", steps=8, dead_code_threshold=3), resume=True)
    a, b = load_weights(straight / "model.safetensors"), load_weights(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader((tmp_path / "b" / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["4", "5", "8"]  # the first run's final row, then the resumed run's
    rows_a = list(csv.DictReader((tmp_path / "a" / "metrics.csv").open()))
    assert rows[-1]["loss"] == rows_a[-1]["loss"]


def test_cli_train_and_resume(blocks_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vqdiffusion")
    add_train_vqvae_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    common = [str(blocks_dir), "--out", str(out), "--image-size", "16", "--device", "cpu", "--quiet"]
    args = parser.parse_args(["train-vqvae", *common, "--steps", "2", "--batch-size", "4", "--codebook-size", "8"])
    assert run_train_vqvae(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "vqvae")
    args = parser.parse_args(["train-vqvae", *common, "--steps", "3", "--resume"])
    assert run_train_vqvae(args) == 0
    tensors, meta = load_checkpoint(out / "checkpoints" / "step_00000003.safetensors")
    assert meta["step"] == 3 and meta["config"]["batch_size"] == 4 and meta["config"]["num_embeddings"] == 8
    assert load_vqvae(out).config.num_embeddings == 8
    with pytest.raises(ConfigError, match="batch_size"):
        run_train_vqvae(parser.parse_args(["train-vqvae", *common, "--steps", "4", "--resume", "--batch-size", "2"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_train_vqvae(parser.parse_args(["train-vqvae", *common[:1], "--out", str(tmp_path / "x"), "--resume"]))


def test_config_validation_and_model_overrides(tmp_path):
    with pytest.raises(ConfigError, match="codebook_decay"):
        make_config(tmp_path, tmp_path, codebook_decay=1.0)
    with pytest.raises(ConfigError, match="lr_schedule"):
        make_config(tmp_path, tmp_path, lr_schedule="step")
    with pytest.raises(ConfigError, match="not divisible"):
        make_config(tmp_path, tmp_path, image_size=15)
    config = make_config(tmp_path, tmp_path, block_out_channels=(16, 16, 32), num_embeddings=32, embed_dim=4)
    model_config = config.model_config()
    assert model_config.block_out_channels == (16, 16, 32) and model_config.decoder_attention == (
        False,
        False,
        True,
    )
    assert model_config.num_embeddings == 32 and model_config.sample_size == 16
    assert VQVAETrainConfig.from_dict(config.to_dict()) == config


def test_perceptual_loss_on_local_vgg_weights(tmp_path, blocks_dir):
    layers = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    in_channels, tensors = 3, {}
    index = 0
    generator = torch.Generator().manual_seed(0)
    for item in layers:
        if item == "M":
            index += 1
            continue
        scale = math.sqrt(2 / (in_channels * 9))
        tensors[f"features.{index}.weight"] = torch.randn(item, in_channels, 3, 3, generator=generator) * scale
        tensors[f"features.{index}.bias"] = torch.zeros(item)
        in_channels, index = item, index + 2
    tensors["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    path = tmp_path / "vgg16.safetensors"
    save_file(tensors, str(path))
    loss = VGGPerceptualLoss(path)
    x = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    y = x.clone().requires_grad_(True)
    assert torch.allclose(loss(x, x), torch.zeros(2))
    d = loss(x, -y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    save_file({"conv.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="torchvision's VGG16"):
        VGGPerceptualLoss(tmp_path / "bad.safetensors")
    trainer = VQVAETrainer(make_config(blocks_dir, tmp_path, perceptual_weights=str(path)))
    metrics = trainer.train_step(_batches(1)[0])
    assert torch.isfinite(metrics["loss"])
