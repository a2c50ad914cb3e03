"""Training objectives (vlb, masked_ce, elbo) against independent computations, the relation between the
masked-diffusion bound and VQ-Diffusion's KL terms on a mask-only schedule, and their use in training;
``--init-from`` (weights copied, fresh optimizer, refused mismatches) and the training history of exports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from support.data import make_token_dir
from test_diffusion_math import SCHEDULES, brute_force_posterior
from test_train_denoiser import make_config

from vqdiffusion.config import ConfigError
from vqdiffusion.diffusion import MaskReplaceSchedule, diffusion_loss, q_sample
from vqdiffusion.formats.ours import read_history
from vqdiffusion.objectives import (
    is_mask_only,
    masked_cross_entropy,
    masked_elbo,
    objective_loss,
    unmask_probabilities,
)
from vqdiffusion.training.denoiser import train_denoiser
from vqdiffusion.training.denoiser_config import DenoiserTrainConfig
from vqdiffusion.training.denoiser_trainer import DenoiserTrainer

K, T, N, B = 4, 8, 6, 5


def batch(schedule: MaskReplaceSchedule, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, K, (B, N), generator=gen)
    t = torch.tensor([0, 1, 3, 6, 7])
    x_t = q_sample(schedule, x0, t, gen)
    x_t[2, :2] = K  # some masks at a small t
    log_p = torch.log_softmax(torch.randn(B, K, N, generator=gen), 1)
    return x0, x_t, t, log_p


def test_masked_cross_entropy_equals_a_loop_over_corrupted_positions() -> None:
    schedule = SCHEDULES["paper"](K, T)  # masks and replacements
    x0, x_t, t, log_p = batch(schedule)
    x_t[0, 3] = (x0[0, 3] + 1) % K  # a replaced token counts, a kept one does not
    expected = np.zeros(B)
    for b in range(B):
        for n in range(N):
            if int(x_t[b, n]) != int(x0[b, n]):
                expected[b] -= float(log_p[b, x0[b, n], n])
    np.testing.assert_allclose(masked_cross_entropy(log_p, x0, x_t).numpy(), expected, rtol=1e-5)
    assert masked_cross_entropy(log_p, x0, x0).abs().max() == 0  # nothing corrupted, no loss


@pytest.mark.parametrize("name", ["reference", "mask_only_exact"])
def test_unmask_probability_is_the_dense_bayes_posterior(name: str) -> None:
    """r_t = q(x_{t-1} = x0 | x_t = [MASK], x0) from dense float64 transition matrices."""
    schedule = SCHEDULES[name](K, T)
    r = unmask_probabilities(schedule)
    for t in range(T):
        post = brute_force_posterior(schedule, torch.eye(K, dtype=torch.float64)[1], K, t, t - 1)
        assert math.isclose(float(r[t]), float(post[1]), rel_tol=1e-9, abs_tol=1e-12), t
    assert float(r[0]) == pytest.approx(1.0)


def test_masked_elbo_equals_a_loop_over_masked_positions() -> None:
    schedule = SCHEDULES["mask_only_exact"](K, T)
    x0, x_t, t, log_p = batch(schedule, seed=1)
    r = unmask_probabilities(schedule)
    expected = np.zeros(B)
    for b in range(B):
        for n in range(N):
            if int(x_t[b, n]) == K:
                expected[b] -= float(r[int(t[b])]) * float(log_p[b, x0[b, n], n])
    np.testing.assert_allclose(masked_elbo(schedule, log_p, x0, x_t, t).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_a_mask_only_schedule_the_vlb_step_term_is_unmask_probability_times_cross_entropy(seed: int) -> None:
    """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) at a [MASK] position = r_t * -log p(x0 | x_t), 0 at a kept
    one; the decoder NLL at t = 0 is the cross-entropy at the masked positions (r_0 = 1)."""
    schedule = SCHEDULES["mask_only_exact"](K, T)
    assert is_mask_only(schedule)
    x0, x_t, t, log_p = batch(schedule, seed)
    vlb = diffusion_loss(schedule, log_p, x0, x_t, t, aux_weight=0.0).vb
    torch.testing.assert_close(vlb, masked_elbo(schedule, log_p, x0, x_t, t), rtol=1e-4, atol=1e-5)
    assert (x_t == K).any() and (x_t != K).any()  # both kinds of positions took part


def test_objective_loss_dispatch_and_errors() -> None:
    schedule = SCHEDULES["reference"](K, T)
    x0, x_t, t, log_p = batch(schedule)
    vlb = objective_loss("vlb", schedule, log_p, x0, x_t, t, aux_weight=0.1)
    ref = diffusion_loss(schedule, log_p, x0, x_t, t, aux_weight=0.1)
    torch.testing.assert_close(vlb.total(), ref.total())
    ce = objective_loss("masked_ce", schedule, log_p, x0, x_t, t)
    torch.testing.assert_close(ce.total(), masked_cross_entropy(log_p, x0, x_t))
    with pytest.raises(ValueError, match="objective must be one of"):
        objective_loss("mse", schedule, log_p, x0, x_t, t)
    assert is_mask_only(MaskReplaceSchedule(K, T)) and not is_mask_only(SCHEDULES["paper"](K, T))


# ---------------------------------------------------------------------------------------------------------
# In training
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return make_token_dir(tmp_path_factory.mktemp("data"))[0]


def config(token_dir, out, **overrides) -> DenoiserTrainConfig:
    """The training tests' tiny text-model run (test_train_denoiser.make_config), 4 steps by default."""
    return make_config(token_dir, out, **{"steps": 4, "lr_warmup": 2, "log_every": 2, **overrides})


def test_elbo_needs_a_mask_only_schedule(token_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match="mask-only"):
        config(token_dir, tmp_path / "x", objective="elbo", noise_schedule="mask_and_replace")
    with pytest.raises(ConfigError, match="objective must be one of"):
        config(token_dir, tmp_path / "x", objective="mse")


@pytest.mark.parametrize("objective", ["masked_ce", "elbo"])
def test_uniform_objectives_train_and_keep_the_step_sampler_uniform(objective: str, token_dir, tmp_path) -> None:
    trainer = DenoiserTrainer(config(token_dir, tmp_path / objective, objective=objective), _data(token_dir))
    before = [p.detach().clone() for p in trainer.module.parameters()]
    x0 = trainer.data.tokens[:8].reshape(8, -1).long()
    cond = trainer.condition_inputs(list(range(8)))
    out = trainer.train_step({"x0": x0, "cond": cond})
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert int(trainer.sampler.count.sum()) == 0  # never updated: p(t) stays 1/T
    torch.testing.assert_close(trainer.sampler.probabilities(), torch.full((trainer.schedule.num_timesteps,), 0.01,
                                                                          dtype=torch.float64))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.module.parameters(), strict=True))
    # the logged loss is the objective's term per token, not divided by p(t)
    draws = trainer.draws(0, x0)
    assert out["loss"] < 100 * math.log(trainer.data.num_classes) * (draws.x_t != x0).float().mean() + 1


def _data(token_dir):
    from vqdiffusion.data.tokens import TokenDataset

    return TokenDataset(token_dir)


def test_init_from_copies_weights_and_records_the_history(token_dir, tmp_path) -> None:
    first = train_denoiser(config(token_dir, tmp_path / "a", steps=3))
    stages = read_history(first)
    assert len(stages) == 1 and stages[0]["samples_seen"] == 24 and stages[0]["objective"] == "vlb"
    assert stages[0]["init_from"] is None and "cpu" in stages[0]["machine"]

    run = config(token_dir, tmp_path / "b", steps=2, init_from=str(first), objective="masked_ce", lr_warmup=2)
    trainer = DenoiserTrainer(run, _data(token_dir))
    from vqdiffusion.pipeline import VQDiffusionPipeline

    exported = VQDiffusionPipeline.from_pretrained(first)
    for key, value in exported.denoiser.state_dict().items():
        torch.testing.assert_close(trainer.denoiser.state_dict()[key], value.float(), msg=key)
    for key, value in exported.text_encoder.text_model.state_dict().items():
        torch.testing.assert_close(trainer.module.text.text_model.state_dict()[key], value.float(), msg=key)
    torch.testing.assert_close(trainer.module.null.embedding.detach(), exported.null_condition.embedding.float())
    assert trainer.step == 0 and trainer.lr(0) < run.lr  # a fresh warm-up
    assert not trainer.optimizer.state  # a fresh optimizer

    second = train_denoiser(run)
    stages = read_history(second)
    assert [s["objective"] for s in stages] == ["vlb", "masked_ce"]
    assert stages[1]["init_from"] == str(first) and stages[1]["samples_seen"] == 16
    assert json.loads((second / "history.json").read_text())["stages"] == stages


def test_init_from_refuses_another_architecture_or_a_missing_model(token_dir, tmp_path) -> None:
    first = train_denoiser(config(token_dir, tmp_path / "a", steps=1))
    with pytest.raises(ConfigError, match=r"denoiser differs .*num_layers"):
        DenoiserTrainer(config(token_dir, tmp_path / "b", init_from=str(first), num_layers=3), _data(token_dir))
    with pytest.raises(ConfigError, match="noise schedule differs"):
        DenoiserTrainer(config(token_dir, tmp_path / "c", init_from=str(first), gamma_cum_end=0.99), _data(token_dir))
    with pytest.raises(ConfigError, match="--init-from"):
        DenoiserTrainer(config(token_dir, tmp_path / "d", init_from=str(tmp_path / "nothing")), _data(token_dir))


def test_cli_train_init_from_and_info_show_the_history(token_dir, tmp_path, capsys) -> None:
    from vqdiffusion.cli import main

    first = train_denoiser(config(token_dir, tmp_path / "a", steps=2))
    args = ["train", str(token_dir), "--out", str(tmp_path / "b"), "--init-from", str(first), "--objective", "elbo",
            "--train-text-model", "--cond-dim", "32", "--text-heads", "2", "--text-max-length", "16",
            "--batch-size", "8", "--steps", "2", "--lr-warmup", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "b" / "model")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["objective"] for s in report["training_history"]] == ["vlb", "elbo"]
    assert report["training_history"][1]["command"].startswith("vqdiffusion")
    bad = [*args[:3], str(tmp_path / "c"), *args[4:]]
    bad[bad.index("--cond-dim") + 1] = "64"
    assert main(bad) == 2
    assert "--init-from" in capsys.readouterr().err
