"""Denoiser training: learning, exact resume after SIGKILL, refused resumes, export + generation, condition
dropout, accumulation, frozen pretrained text, class/unconditional data, CLI."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.data import make_caption_folder, make_token_dir
from support.weights import make_vqvae_dir

from vqdiffusion.cli.export import add_export_parser, run_export
from vqdiffusion.cli.train import add_train_parser, run_train
from vqdiffusion.config import ConfigError
from vqdiffusion.data.tokens import TokenDataset
from vqdiffusion.diffusion import diffusion_loss, q_sample
from vqdiffusion.models.conditions import CLIPTextCondition
from vqdiffusion.pipeline import VQDiffusionPipeline
from vqdiffusion.training.batching import StepBatchSampler
from vqdiffusion.training.checkpoint import find_latest_checkpoint, load_checkpoint
from vqdiffusion.training.denoiser import train_denoiser
from vqdiffusion.training.denoiser_config import DenoiserTrainConfig
from vqdiffusion.training.denoiser_trainer import DenoiserTrainer, StepBatches
from vqdiffusion.training.export import export_pipeline
from vqdiffusion.training.tokenize import tokenize_dataset

REPO = Path(__file__).resolve().parents[1]
# Flags of a tiny jointly trained model (CLI spelling), shared by the subprocess runs.
TINY_FLAGS = [
    "--preset", "tiny", "--train-text-model", "--cond-dim", "32", "--text-heads", "2", "--text-max-length", "16",
    "--batch-size", "8", "--lr", "1e-3", "--lr-warmup", "5", "--sample-every", "100000", "--log-every", "5",
    "--device", "cpu", "--seed", "3", "--quiet",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest, and steadiest on a shared machine, with one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("data"))[0]


def make_config(token_dir, out, **overrides) -> DenoiserTrainConfig:
    base = dict(
        token_dir=str(token_dir),
        output_dir=str(out),
        text_model="train",
        cond_dim=32,
        text_heads=2,
        text_max_length=16,
        batch_size=8,
        steps=10,
        lr=1e-3,
        lr_warmup=5,
        log_every=5,
        save_every=100000,
        sample_every=100000,
        sample_steps=4,
        num_samples=4,
        device="cpu",
        progress=False,
    )
    base.update(overrides)
    return DenoiserTrainConfig(**base)


def batch_of(trainer: DenoiserTrainer, step: int) -> dict:
    order = StepBatchSampler(len(trainer.data), trainer.config.batch_size, trainer.config.seed, 0, step + 1)
    return StepBatches(trainer.data, order, trainer.rank_rows(), trainer.caption_ids)[step]


def evaluate(trainer: DenoiserTrainer) -> float:
    """Mean loss per token over every item, 34 step indices and two corruptions each (fixed generator),
    conditions kept."""
    n = len(trainer.data)
    x0 = trainer.data.tokens.reshape(n, -1).long()
    cond = trainer.encode_condition(trainer.condition_inputs(list(range(n))))
    keep = torch.zeros(n, dtype=torch.bool)
    generator = torch.Generator().manual_seed(123)
    trainer.module.eval()
    losses = []
    with torch.no_grad():
        for t in range(0, 100, 3):
            t_batch = torch.full((n,), t)
            for _ in range(2):
                x_t = q_sample(trainer.schedule, x0, t_batch, generator)
                log_p = trainer.module(x_t, t_batch, cond, keep)
                losses.append(diffusion_loss(trainer.schedule, log_p, x0, x_t, t_batch).total().mean() / x0.shape[1])
    return float(torch.stack(losses).mean())


def test_overfits_a_handful_of_grids(token_dir, tmp_path):
    config = make_config(token_dir, tmp_path / "run", steps=150, log_every=10, save_every=75, sample_every=75)
    fresh = DenoiserTrainer(config, TokenDataset(token_dir))
    start = evaluate(fresh)
    exported = train_denoiser(config)
    assert exported == tmp_path / "run" / "model"
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000150.safetensors"
    trained = DenoiserTrainer.from_checkpoint(ckpt)
    end = evaluate(trained)
    # measured: 0.121 -> 0.037 nats per token (ratio 0.31) after 150 steps of batch 8
    assert end < 0.5 * start, (start, end)
    # the text model learned too (its gradient path is live), and so did the null condition
    for name, param in fresh.module.named_parameters():
        if name.startswith(("text.", "null.")) and param.ndim == 2:
            assert not torch.equal(param, trained.module.get_parameter(name)), name
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(10, 151, 10))
    assert {"loss", "vb", "aux", "grad_norm", "lr", "samples_per_s"} <= set(rows[0])
    assert float(rows[-1]["aux"]) < 0.6 * float(rows[0]["aux"])  # x0 cross-entropy: measured 2.69 -> 1.11
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["step_00000075.png", "step_00000150.png"]
    assert Image.open(tmp_path / "run" / "samples" / samples[0]).size == (4 * 8, 2 * 8)
    tensors, meta = load_checkpoint(ckpt)
    prefixes = {".".join(k.split(".")[:2]) for k in tensors}
    assert {"model.denoiser", "model.text", "model.null", "ema.denoiser", "ema.text", "ema.null"} <= prefixes
    assert {"sampler.count", "sampler.loss_sq", "rng.torch_cpu"} <= set(tensors)
    assert any(k.startswith("optimizer.") for k in tensors)
    assert meta["step"] == 150 and meta["config"] == config.to_dict() and meta["condition"] == "text"
    assert meta["denoiser_config"]["num_classes"] == 16 and meta["denoiser_config"]["height"] == 4
    assert int(tensors["sampler.count"].sum()) == 150 * 8
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_denoiser(config)


def _train_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vqdiffusion.cli", "train", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err


def test_resume_after_sigkill_is_bit_exact(token_dir, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    process = _train_cli([str(token_dir), "--out", str(killed), "--steps", "100000", "--save-every", "5", *TINY_FLAGS])
    # the uninterrupted run (to a step the killed run passes) runs alongside
    total = 100
    reference = _train_cli([str(token_dir), "--out", str(straight), "--steps", str(total), *TINY_FLAGS])
    target = killed / "checkpoints" / "step_00000010.safetensors"
    deadline = time.monotonic() + 60
    while not target.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint at step 10 within 60 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = int(find_latest_checkpoint(killed / "checkpoints").stem.split("_")[1])
    assert 10 <= killed_at < total, killed_at
    _finish(_train_cli([str(token_dir), "--out", str(killed), "--resume", "--steps", str(total), "--quiet"]))
    _finish(reference)

    name = f"step_{total:08d}.safetensors"
    a, meta_a = load_checkpoint(straight / "checkpoints" / name)
    b, meta_b = load_checkpoint(killed / "checkpoints" / name)
    assert a.keys() == b.keys()
    for key in a:
        if not key.startswith("rng."):
            assert torch.equal(a[key], b[key]), key
    assert meta_a["step"] == meta_b["step"] == total and meta_a["optimizer"] == meta_b["optimizer"]
    # the exported models are identical too
    model_a = (straight / "model" / "denoiser" / "model.safetensors").read_bytes()
    assert model_a == (killed / "model" / "denoiser" / "model.safetensors").read_bytes()


def test_resume_refuses_a_different_model(token_dir, tmp_path):
    config = make_config(token_dir, tmp_path / "run", steps=2)
    train_denoiser(config)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002.safetensors"
    with pytest.raises(ConfigError, match=r"num_layers: None -> 3.*dim: None -> 64|dim.*num_layers"):
        DenoiserTrainer.from_checkpoint(ckpt, dataclasses.replace(config, num_layers=3, dim=64))
    with pytest.raises(ConfigError, match="noise_schedule"):
        train_denoiser(dataclasses.replace(config, steps=4, noise_schedule="mask_and_replace"), resume=True)
    # only run-control fields may change; the resumed run continues from step 2
    assert train_denoiser(dataclasses.replace(config, steps=3, log_every=1), resume=True).is_dir()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000003.safetensors")[1]["step"] == 3


def test_export_and_generate(token_dir, tmp_path):
    config = make_config(token_dir, tmp_path / "run", steps=6, ema_decay=0.5)
    train_denoiser(config)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000006.safetensors"
    out = export_pipeline(ckpt, tmp_path / "exported")
    pipe = VQDiffusionPipeline.from_pretrained(out)
    assert pipe.defaults.guidance_scale == 5.0 and pipe.null_condition is not None
    assert pipe.denoiser.config.num_classes == 16 and pipe.text_encoder.max_length == 16
    result = pipe(["a red square", "blue sky"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(result.images) == 2 and result.images[0].size == (8, 8) and result.tokens.shape == (2, 4, 4)
    tensors, _ = load_checkpoint(ckpt)
    for key, value in pipe.denoiser.state_dict().items():
        assert torch.equal(value, tensors[f"ema.denoiser.{key}"]), key
    # the same text encoding as during training
    trainer = DenoiserTrainer.from_checkpoint(ckpt)
    trainer.ema.copy_to(trainer.module)
    with torch.no_grad():
        ids = trainer.condition_inputs([0])
        torch.testing.assert_close(pipe.encode_prompt([trainer.data.captions[0]]), trainer.module.text.encode_ids(ids))
    raw = VQDiffusionPipeline.from_pretrained(export_pipeline(tmp_path / "run", tmp_path / "raw", ema=False))
    assert torch.equal(raw.denoiser.head.weight, tensors["model.denoiser.head.weight"])
    # the CLI
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    assert run_export(parser.parse_args(["export", str(ckpt), str(tmp_path / "cli"), "--raw"])) == 0
    assert (tmp_path / "cli" / "vqdiffusion.json").is_file()
    # half-precision storage and default sampling settings
    flags = ["--half", "--steps", "7", "--guidance", "3", "--truncation", "0.9"]
    assert run_export(parser.parse_args(["export", str(ckpt), str(tmp_path / "half"), *flags])) == 0
    half = VQDiffusionPipeline.from_pretrained(tmp_path / "half")
    defaults = half.defaults
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.truncation_rate) == (7, 3.0, 0.9)
    assert half.dtype == torch.float32
    for key, value in half.denoiser.state_dict().items():
        assert torch.equal(value, tensors[f"ema.denoiser.{key}"].half().float()), key
    stored = (tmp_path / "half" / "denoiser" / "model.safetensors").stat().st_size
    assert stored < 0.6 * (tmp_path / "exported" / "denoiser" / "model.safetensors").stat().st_size
    with pytest.raises(ValueError, match="num_inference_steps"):
        run_export(parser.parse_args(["export", str(ckpt), str(tmp_path / "bad"), "--steps", "1000"]))


def test_condition_dropout_uses_the_null_for_the_configured_fraction(token_dir, tmp_path):
    trainer = DenoiserTrainer(make_config(token_dir, tmp_path, cond_drop_prob=0.25), TokenDataset(token_dir))
    x0 = trainer.data.tokens.reshape(8, -1).long()
    drops = torch.cat([trainer.draws(step, x0).drop for step in range(200)])
    assert 0.22 < drops.float().mean() < 0.28  # 1600 coins; measured 0.2525
    first, again = trainer.draws(7, x0), trainer.draws(7, x0)  # a pure function of (seed, step)
    assert all(torch.equal(getattr(first, f), getattr(again, f)) for f in ("t", "p_t", "drop", "x_t"))
    ids = trainer.condition_inputs(list(range(8)))
    drop = torch.tensor([True, False] * 4)
    with torch.no_grad():
        cond = trainer.module.condition(ids, drop)
        text = trainer.module.text.encode_ids(ids)
        null = trainer.module.null.embedding
        assert all(torch.equal(cond[i], null if drop[i] else text[i]) for i in range(8))
        # the forward pass really sees the null: same output as the null fed by hand
        t = torch.full((8,), 40)
        x_t = q_sample(trainer.schedule, x0, t, torch.Generator().manual_seed(0))
        by_hand = trainer.denoiser(x_t, t, torch.where(drop[:, None, None], null.expand(8, -1, -1), text))
        torch.testing.assert_close(trainer.module(x_t, t, ids, drop), by_hand)
    # the null starts as the empty prompt's encoding and is trained (it gets a gradient when used)
    batch = batch_of(trainer, 0)
    before = null.detach().clone()
    trainer.train_step(batch)
    assert trainer.draws(0, x0).drop.any() and not torch.equal(before, trainer.module.null.embedding)
    no_null = DenoiserTrainer(make_config(token_dir, tmp_path, cond_drop_prob=0.0), TokenDataset(token_dir))
    assert no_null.module.null is None and not no_null.draws(0, x0).drop.any()


def test_accumulation_matches_one_big_batch(token_dir, tmp_path):
    data = TokenDataset(token_dir)
    results = []
    for accum in (1, 4):
        trainer = DenoiserTrainer(make_config(token_dir, tmp_path, grad_accum=accum), data)
        for step in range(3):
            trainer.train_step(batch_of(trainer, step))
        results.append(trainer.module.state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_bf16_autocast_and_fp16_refused_on_cpu(token_dir, tmp_path):
    trainer = DenoiserTrainer(make_config(token_dir, tmp_path, mixed_precision="bf16"), TokenDataset(token_dir))
    result = trainer.train_step(batch_of(trainer, 0))
    assert torch.isfinite(result["loss"]) and all(p.dtype == torch.float32 for p in trainer.module.parameters())
    with pytest.raises(ConfigError, match="fp16"):
        DenoiserTrainer(make_config(token_dir, tmp_path, mixed_precision="fp16"), TokenDataset(token_dir))


def test_frozen_pretrained_text_encoder(token_dir, tmp_path, tiny_clip_dirs):
    text_dir, tok_dir = tiny_clip_dirs
    config = make_config(
        token_dir,
        tmp_path / "run",
        text_model="pretrained",
        text_encoder_dir=str(text_dir),
        tokenizer_dir=str(tok_dir),
        text_pad_token_id=0,
        cond_dim=None,
        text_heads=4,
        text_max_length=77,
        steps=2,
    )
    trainer = DenoiserTrainer(config, TokenDataset(token_dir))
    reference = CLIPTextCondition.from_pretrained(text_dir, tok_dir, pad_token_id=0)
    captions = trainer.data.captions[:3] + ["a caption far longer than seventy-seven characters " * 3]
    assert torch.equal(trainer.caption_ids(captions), reference.tokenize(captions))
    # independently: transformers' own padding and truncation (which keeps EOS), then pad id 0 after EOS
    ids = reference.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = ids.input_ids
    first_eos = (ids == reference.tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
    assert torch.equal(trainer.caption_ids(captions), ids.masked_fill(torch.arange(77)[None] > first_eos, 0))
    assert trainer.denoiser.config.cond_dim == reference.hidden_size
    frozen = {n: p.detach().clone() for n, p in trainer.frozen_text.named_parameters()}
    trainer.train_step(batch_of(trainer, 0))
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.frozen_text.named_parameters())
    exported = train_denoiser(config)
    tensors, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.safetensors")
    assert not any(k.startswith("model.text.") for k in tensors)  # the frozen CLIP is not checkpointed
    pipe = VQDiffusionPipeline.from_pretrained(exported)
    assert pipe.text_encoder.pad_token_id == 0
    torch.testing.assert_close(pipe.encode_prompt(["a red cat"]), reference.encode(["a red cat"]))


def test_class_and_unconditional_models_train_export_and_sample(tmp_path):
    """End to end, as for text: train, export, load with the pipeline, sample (labels with guidance)."""
    vqvae_dir = make_vqvae_dir(tmp_path / "vqvae")
    for name in ("a", "b", "c"):
        make_caption_folder(tmp_path / "classes" / name, count=2, seed=ord(name))
    for kind in ("classes", "unconditional"):
        tokens = tokenize_dataset(
            tmp_path / "classes", vqvae_dir, tmp_path / kind, kind=kind, image_size=8, device="cpu", progress=False
        )
        config = make_config(tokens, tmp_path / f"run_{kind}", text_model="pretrained", batch_size=4, steps=3)
        exported = train_denoiser(config)
        assert exported == tmp_path / f"run_{kind}" / "model"
        ckpt = tmp_path / f"run_{kind}" / "checkpoints" / "step_00000003.safetensors"
        tensors, meta = load_checkpoint(ckpt)
        pipe = VQDiffusionPipeline.from_pretrained(exported)
        if kind == "classes":
            assert meta["condition"] == "class" and meta["class_names"] == ["a", "b", "c"]
            # the label AdaLN table of every block: 3 classes + the learned null row
            assert tensors["model.denoiser.blocks.0.norm_mlp.timestep_embedding.weight"].shape[0] == 4
            assert pipe.condition_kind == "class" and pipe.null_class_label == 3 and pipe.num_class_labels == 3
            out = pipe([0, 2], guidance_scale=3.0, num_inference_steps=5, output_type="tokens", progress=False)
            with pytest.raises(ValueError, match="class labels"):
                pipe([3], progress=False)
        else:
            assert meta["condition"] == "none" and not meta["null_condition"]
            assert pipe.condition_kind == "none"
            out = pipe(None, num_images_per_prompt=2, num_inference_steps=5, output_type="tokens", progress=False)
        assert out.tokens.shape == (2, 4, 4)
        # the trainer samples through the same pipeline, from its EMA weights
        trainer = DenoiserTrainer.from_checkpoint(ckpt)
        again = trainer.pipeline(pipe.vqvae)
        for name, param in again.denoiser.state_dict().items():
            torch.testing.assert_close(param, pipe.denoiser.state_dict()[name])


def test_config_validation(token_dir, tmp_path):
    with pytest.raises(ConfigError, match="mixed_precision"):
        make_config(token_dir, tmp_path, mixed_precision="fp8")
    with pytest.raises(ConfigError, match="grad_accum"):
        make_config(token_dir, tmp_path, batch_size=6, grad_accum=4)
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        make_config(token_dir, tmp_path, cond_drop_prob=1.0)
    with pytest.raises(ConfigError, match="both text_encoder_dir and tokenizer_dir"):
        make_config(token_dir, tmp_path, text_model="pretrained", text_encoder_dir="x")
    with pytest.raises(ConfigError, match="schedule"):
        make_config(token_dir, tmp_path, gamma_cum_end=0.0)
    config = make_config(token_dir, tmp_path, noise_schedule="mask_and_replace")
    assert config.schedule(16).gamma_cum_end == 0.9 and DenoiserTrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="text_encoder_dir and tokenizer_dir"):
        DenoiserTrainer(make_config(token_dir, tmp_path, text_model="pretrained"), TokenDataset(token_dir))
    with pytest.raises(ConfigError, match="world size 3"):
        DenoiserTrainer(make_config(token_dir, tmp_path), TokenDataset(token_dir), world_size=3)


def test_cli_train_and_resume(token_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vqdiffusion")
    add_train_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    base = ["train", str(token_dir), "--out", str(out)]
    args = parser.parse_args([*base, *TINY_FLAGS, "--steps", "2", "--mask-weight", "1,0.5", "--grad-clip", "0"])
    assert run_train(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "model")
    assert run_train(parser.parse_args([*base, "--resume", "--steps", "3", "--quiet"])) == 0
    _, meta = load_checkpoint(out / "checkpoints" / "step_00000003.safetensors")
    assert meta["config"]["mask_weight"] == [1.0, 0.5] and meta["config"]["grad_clip"] is None
    assert meta["config"]["text_model"] == "train" and meta["config"]["seed"] == 3
    with pytest.raises(ConfigError, match="lr"):
        run_train(parser.parse_args([*base, "--resume", "--steps", "4", "--lr", "0.1", "--quiet"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_train(parser.parse_args(["train", str(token_dir), "--out", str(tmp_path / "none"), "--resume"]))


def test_word_vocabulary_text_model_trains_exports_and_encodes_like_training(token_dir, tmp_path):
    parser = argparse.ArgumentParser(prog="vqdiffusion")
    add_train_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "words"
    base = ["train", str(token_dir), "--out", str(out)]
    assert run_train(parser.parse_args([*base, *TINY_FLAGS, "--steps", "2", "--text-vocab", "words"])) == 0
    ckpt = out / "checkpoints" / "step_00000002.safetensors"
    words = load_checkpoint(ckpt)[1]["config"]["text_words"]
    captions = TokenDataset(token_dir).captions
    assert words and set(words) == {w for c in captions for w in c.lower().replace(",", " ").split() if w.isalpha()}
    pipe = VQDiffusionPipeline.from_pretrained(out / "model")
    tokenizer = pipe.text_encoder.tokenizer
    assert all(len(tokenizer.tokenize(w)) == 1 for w in words)
    trainer = DenoiserTrainer.from_checkpoint(ckpt)
    trainer.ema.copy_to(trainer.module)
    with torch.no_grad():
        expected = trainer.module.text.encode_ids(trainer.condition_inputs([0]))
        torch.testing.assert_close(pipe.encode_prompt([captions[0]]), expected)
    # the vocabulary belongs to the checkpoint: it cannot change on resume
    with pytest.raises(ValueError, match="--text-vocab"):
        run_train(parser.parse_args([*base, "--resume", "--steps", "3", "--text-vocab", "chars", "--quiet"]))
    assert run_train(parser.parse_args([*base, "--resume", "--steps", "3", "--text-vocab", "words", "--quiet"])) == 0
    with pytest.raises(ConfigError, match="text_words"):
        make_config(token_dir, tmp_path, text_model="pretrained", text_words=("red",))


class _CountingTrainer:
    """The smallest Trainer: counts steps, saves its step count."""

    def __init__(self) -> None:
        self.step = 0
        self.saved: list[int] = []

    def train_step(self, batch):
        self.step += 1
        return {"loss": torch.tensor(1.0)}

    def lr(self, step: int) -> float:
        return 1e-3

    def save(self, path) -> None:
        self.saved.append(self.step)
        Path(path).write_bytes(b"x")


def test_time_limit_ends_the_run_at_the_first_metrics_row_past_it(tmp_path):
    from vqdiffusion.training.loop import LoopSettings, SumWindow, run_loop

    ticks = iter(range(1000))  # the fake clock advances one second per reading
    trainer, rows = _CountingTrainer(), []
    settings = LoopSettings(
        steps=100, log_every=4, save_every=50, sample_every=1000, keep_checkpoints=5, progress=False, time_limit=9.5
    )
    last = run_loop(
        trainer, range(100), settings, tmp_path, SumWindow(("loss",), 1),
        log=lambda step, values: rows.append(step), clock=lambda: float(next(ticks)),
    )  # fmt: skip
    # readings: start 0, then one per metrics row (steps 4, 8, 12 ...): 1, 2, 3 ... -> 10 >= 9.5 at step 40
    assert trainer.step == 40 and rows[-1] == 40
    assert trainer.saved == [40] and last.name == "step_00000040.safetensors"


def test_time_limit_stops_with_an_export_and_resume_reaches_the_uninterrupted_run(token_dir, tmp_path):
    stopped = train_denoiser(make_config(token_dir, tmp_path / "stopped", steps=10, time_limit=1e-9))
    assert (stopped / "denoiser" / "model.safetensors").is_file()
    assert find_latest_checkpoint(tmp_path / "stopped" / "checkpoints").name == "step_00000005.safetensors"
    train_denoiser(make_config(token_dir, tmp_path / "stopped", steps=10), resume=True)
    train_denoiser(make_config(token_dir, tmp_path / "straight", steps=10))
    a = (tmp_path / "straight" / "model" / "denoiser" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "stopped" / "model" / "denoiser" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "soon"])
def test_time_limit_must_be_positive_seconds(token_dir, tmp_path, bad):
    with pytest.raises(ConfigError, match="time_limit"):
        make_config(token_dir, tmp_path / "run", time_limit=bad)
