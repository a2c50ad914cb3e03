"""The discrete diffusion math against dense float64 transition matrices and brute-force Bayes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vqdiffusion.config import ConfigError
from vqdiffusion.diffusion import (
    ImportanceTimestepSampler,
    MaskReplaceSchedule,
    diffusion_loss,
    guided_log_probs,
    log_one_hot,
    posterior_log_probs,
    q_sample,
    sample_categorical,
    truncate_log_probs,
    uniform_timesteps,
)

# ---------------------------------------------------------------------------------------------------------
# Dense reference: (K+1) x (K+1) matrices, rows = from, columns = to, in float64
# ---------------------------------------------------------------------------------------------------------


def dense_kernel(K: int, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    Q = torch.full((K + 1, K + 1), beta, dtype=torch.float64)
    Q[:K, :K] += torch.eye(K, dtype=torch.float64) * alpha
    Q[:K, K] = gamma
    Q[K, :] = 0.0
    Q[K, K] = 1.0
    return Q


def one_step_matrices(schedule: MaskReplaceSchedule) -> list[torch.Tensor]:
    """Q_i = q(x_i | x_{i-1}) for i = 0..T-1 from the per-step parameters."""
    alphas, betas, gammas = schedule.step_params
    return [dense_kernel(schedule.num_classes, a, b, g) for a, b, g in zip(alphas, betas, gammas, strict=True)]


def product(mats: list[torch.Tensor], size: int) -> torch.Tensor:
    out = torch.eye(size, dtype=torch.float64)
    for m in mats:
        out = out @ m
    return out


def brute_force_posterior(schedule: MaskReplaceSchedule, p_x0: torch.Tensor, x_t: int, t: int, s: int) -> torch.Tensor:
    """p(x_s | x_t) = sum_x0 p(x0) Q_{s->t}[x_s, x_t] Qbar_s[x0, x_s] / Qbar_t[x0, x_t], normalised.

    x0 values that cannot produce x_t (Qbar_t[x0, x_t] = 0) are dropped, i.e. the prediction is conditioned
    on being consistent with the observation.
    """
    K = schedule.num_classes
    Qs = one_step_matrices(schedule)
    Qbar_s = product(Qs[: s + 1], K + 1)  # identity when s = -1
    Qbar_t = product(Qs[: t + 1], K + 1)
    Q_st = product(Qs[s + 1 : t + 1], K + 1)
    out = torch.zeros(K + 1, dtype=torch.float64)
    for x0 in range(K):
        if Qbar_t[x0, x_t] <= 0:
            continue
        out += p_x0[x0] * Q_st[:, x_t] * Qbar_s[x0, :] / Qbar_t[x0, x_t]
    return out / out.sum()


SCHEDULES = {
    "reference": lambda K, T: MaskReplaceSchedule(K, T),
    "paper": lambda K, T: MaskReplaceSchedule.paper_mask_and_replace(K, T),
    "replace_heavy": lambda K, T: MaskReplaceSchedule(K, T, 0.9, 0.05, 0.02, 0.6),
    "mask_only_exact": lambda K, T: MaskReplaceSchedule(K, T, 0.95, 0.0, 0.05, 1.0),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("K", [2, 5])
def test_dense_rows_and_cumulative_product(name: str, K: int) -> None:
    T = 7
    schedule = SCHEDULES[name](K, T)
    Qs = one_step_matrices(schedule)
    for Q in Qs:
        assert torch.all(Q >= -1e-15)
        torch.testing.assert_close(Q.sum(1), torch.ones(K + 1, dtype=torch.float64), rtol=0, atol=1e-12)
    for i in range(T):
        a, b, g = schedule.cumulative_at(i)
        torch.testing.assert_close(product(Qs[: i + 1], K + 1), dense_kernel(K, a, b, g), rtol=0, atol=1e-12)
    # Two-time kernels equal the product of the one-step kernels in between.
    for s in range(-1, T - 1):
        for t in range(s + 1, T):
            torch.testing.assert_close(
                dense_kernel(K, *schedule.transition(s, t)),
                product(Qs[s + 1 : t + 1], K + 1),
                rtol=0,
                atol=1e-12,
            )


def test_reference_schedule_endpoints_are_mask_only() -> None:
    schedule = MaskReplaceSchedule(4096)
    a0, b0, g0 = schedule.cumulative_at(0)
    aT, bT, gT = schedule.cumulative_at(99)
    assert (a0, g0) == pytest.approx((0.99999, 0.000009))
    assert (aT, gT) == pytest.approx((0.000009, 0.99999))
    for i in range(100):
        assert 4096 * schedule.cumulative_at(i)[1] == pytest.approx(1e-6, rel=1e-6)
    paper = MaskReplaceSchedule.paper_mask_and_replace(4096)
    _, bT, gT = paper.cumulative_at(99)
    assert (gT, 4096 * bT) == pytest.approx((0.9, 0.1))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("K", [2, 3, 5])
def test_posterior_matches_brute_force_bayes(name: str, K: int) -> None:
    T = 6
    schedule = SCHEDULES[name](K, T)
    gen = torch.Generator().manual_seed(K)
    # One position per possible x_t value (including [MASK]); a batch of 2 independent predictions.
    x_t = torch.arange(K + 1).repeat(2, 1)
    log_p_x0 = torch.log_softmax(torch.randn(2, K, K + 1, generator=gen, dtype=torch.float64) * 2, dim=1)
    pairs = [(t, t - 1) for t in range(T)] + [(T - 1, -1), (T - 1, 2), (4, 0), (3, -1)]
    for t, s in pairs:
        ours = posterior_log_probs(schedule, log_p_x0.float(), x_t, t, s).double().exp()
        for b in range(2):
            for n in range(K + 1):
                ref = brute_force_posterior(schedule, log_p_x0[b, :, n].exp(), int(x_t[b, n]), t, s)
                if torch.isnan(ref).any():  # x_t cannot occur at step t (e.g. a real token when gbar_t = 1)
                    continue
                torch.testing.assert_close(ours[b, :, n], ref, rtol=0, atol=2e-6, msg=f"t={t} s={s} x_t={n}")


def test_posterior_default_s_and_per_example_steps() -> None:
    K, T = 4, 10
    schedule = MaskReplaceSchedule.paper_mask_and_replace(K, T)
    gen = torch.Generator().manual_seed(0)
    log_p_x0 = torch.log_softmax(torch.randn(3, K, 8, generator=gen), 1)
    x_t = torch.randint(0, K + 1, (3, 8), generator=gen)
    t = torch.tensor([0, 4, 9])
    batched = posterior_log_probs(schedule, log_p_x0, x_t, t)
    for b in range(3):
        alone = posterior_log_probs(schedule, log_p_x0[b : b + 1], x_t[b : b + 1], int(t[b]), int(t[b]) - 1)
        torch.testing.assert_close(batched[b : b + 1], alone)
    # s = -1 returns the prediction itself, with no mass on [MASK].
    final = posterior_log_probs(schedule, log_p_x0, x_t, 3, -1).exp()
    torch.testing.assert_close(final[:, :K], log_p_x0.exp(), rtol=0, atol=1e-6)
    assert torch.all(final[:, K] == 0)


def test_posterior_matches_diffusers_scheduler() -> None:
    diffusers = pytest.importorskip("diffusers")
    for K, seed in [(7, 0), (64, 1)]:
        ref = diffusers.VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=100)
        ours = MaskReplaceSchedule(K, 100)
        gen = torch.Generator().manual_seed(seed)
        log_p_x0 = torch.log_softmax(torch.randn(2, K, 50, generator=gen) * 3, dim=1)
        x_t = torch.randint(0, K + 1, (2, 50), generator=gen)
        x_t[:, :10] = K  # make sure masks are present
        for t in [1, 2, 37, 98, 99]:
            theirs = ref.q_posterior(log_p_x0, x_t, torch.tensor(t))
            theirs = torch.softmax(theirs.double(), dim=1)
            mine = ours.posterior_log_probs(log_p_x0, x_t, t).double().exp()
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5, msg=f"t={t}")


def test_q_sample_frequencies_match_closed_form() -> None:
    K, T, n = 3, 5, 200_000
    schedule = MaskReplaceSchedule(K, T, 0.9, 0.1, 0.05, 0.7)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((1, n), 1)
    for t in [0, 2, 4]:
        x_t = q_sample(schedule, x0, t, gen)
        freq = torch.bincount(x_t[0], minlength=K + 1).double() / n
        a, b, g = schedule.cumulative_at(t)
        expected = dense_kernel(K, a, b, g)[1]
        # 5 standard deviations of a binomial proportion
        bound = 5 * torch.sqrt(expected * (1 - expected) / n) + 1e-9
        assert torch.all((freq - expected).abs() <= bound), (t, freq, expected)


def test_q_sample_reproducible_and_validates() -> None:
    schedule = MaskReplaceSchedule(8, 10)
    x0 = torch.randint(0, 8, (2, 16))
    a = q_sample(schedule, x0, torch.tensor([3, 9]), torch.Generator().manual_seed(1))
    b = q_sample(schedule, x0, torch.tensor([3, 9]), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="outside"):
        q_sample(schedule, x0, 10)


def test_schedule_validation_errors() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        MaskReplaceSchedule(1)
    with pytest.raises(ConfigError, match="must not increase"):
        MaskReplaceSchedule(4, 10, alpha_cum_start=0.1, alpha_cum_end=0.5)
    with pytest.raises(ConfigError, match="negative transition"):
        # abar falls slower than 1 - gbar: would need a negative beta
        MaskReplaceSchedule(4, 10, alpha_cum_start=0.5, alpha_cum_end=0.49, gamma_cum_start=0.0, gamma_cum_end=0.9)
    with pytest.raises(ConfigError, match="unknown key"):
        MaskReplaceSchedule.from_dict({"num_classes": 4, "bogus": 1})
    schedule = MaskReplaceSchedule.paper_mask_and_replace(16, 20)
    assert MaskReplaceSchedule.from_dict(schedule.to_dict()) == schedule


def test_sample_categorical_frequencies_and_generators() -> None:
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3], dtype=torch.float64)
    log_probs = probs.log().float()[None, :, None].expand(1, 4, 100_000)
    x = sample_categorical(log_probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(x[0], minlength=4).double() / x.shape[1]
    assert freq[2] == 0
    assert torch.all((freq - probs).abs() < 5 * torch.sqrt(probs * (1 - probs) / 1e5) + 1e-9)
    # A list of generators: row b only depends on generator b.
    lp = torch.randn(2, 5, 7)
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    both = sample_categorical(lp, gens)
    alone = sample_categorical(lp[1:], [torch.Generator().manual_seed(4)])
    assert torch.equal(both[1:], alone)


def test_sample_categorical_is_an_exact_float64_inverse_cdf() -> None:
    """One float64 uniform per position, mapped through the float64 CDF (issue: float32 Gumbel draws can never
    exceed about 16.6 and under-sample rare classes).  Rebuilt independently in numpy from the same stream,
    with probabilities only float64 resolves: two classes of 1e-9 near 0.5 of the cumulative mass."""
    probs = np.array([0.5 - 1e-9, 1e-9, 1e-9, 0.5 - 1e-9])
    log_probs = torch.from_numpy(np.log(probs))[None, :, None].expand(1, 4, 50_000)
    got = sample_categorical(log_probs, torch.Generator().manual_seed(7))
    u = torch.rand((1, 50_000), generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()[0]
    cdf = np.cumsum(probs)
    expected = np.searchsorted(cdf, (1.0 - u) * cdf[-1], side="left")
    assert np.array_equal(got[0].numpy(), expected)


@pytest.mark.parametrize("num_classes", [1, 2, 5, 17, 64, 65, 300])
@pytest.mark.parametrize("layout", ["contiguous", "classes_last"])
def test_sample_categorical_two_level_search_equals_a_flat_cdf(num_classes: int, layout: str) -> None:
    """The two-level (block, then class) search draws exactly the class a flat float64 CDF over all classes
    gives for the same uniforms, in any memory layout, with zero-mass classes and whole zero-mass blocks
    (which must never be drawn)."""
    B, N = 3, 400
    gen = torch.Generator().manual_seed(num_classes)
    log_p = torch.randn(B, num_classes, N, generator=gen) * 3
    if num_classes > 4:
        log_p[:, 1::3] = -math.inf  # scattered zero-mass classes
        log_p[:, : num_classes // 2] = -math.inf  # the first half, whole blocks included
    if layout == "classes_last":
        log_p = log_p.transpose(1, 2).contiguous().transpose(1, 2)
    got = sample_categorical(log_p, torch.Generator().manual_seed(11)).numpy()
    u = torch.rand((B, N), generator=torch.Generator().manual_seed(11), dtype=torch.float64).numpy()
    p = np.exp(log_p.double().numpy() - log_p.double().numpy().max(axis=1, keepdims=True))
    for b in range(B):
        for n in range(N):
            cdf = np.cumsum(p[b, :, n])
            assert got[b, n] == np.searchsorted(cdf, (1.0 - u[b, n]) * cdf[-1], side="left")
            assert p[b, got[b, n], n] > 0



def reference_truncation(log_p: torch.Tensor, rate: float) -> torch.Tensor:
    """Full-sort truncation in float64: keep class j if the mass of the classes sorted before it < rate."""
    p = log_p.double().exp()
    out = torch.zeros_like(p)
    B, K, N = p.shape
    for b in range(B):
        for n in range(N):
            order = torch.argsort(p[b, :, n], descending=True)
            mass = 0.0
            for j in order:
                if mass >= rate:
                    break
                out[b, j, n] = p[b, j, n]
                mass += float(p[b, j, n])
    return out / out.sum(1, keepdim=True)


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.86, 0.99])
def test_truncation_matches_full_sort_and_diffusers(rate: float) -> None:
    gen = torch.Generator().manual_seed(int(rate * 100))
    K = 300
    log_p = torch.log_softmax(torch.randn(2, K, 6, generator=gen) * 0.3, 1)
    ours = truncate_log_probs(log_p, rate)
    torch.testing.assert_close(ours.double().exp(), reference_truncation(log_p, rate), rtol=0, atol=1e-6)
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.VQDiffusionPipeline.truncate(None, log_p, rate)  # does not use self
    assert torch.equal(torch.isfinite(theirs), torch.isfinite(ours))


def test_truncation_identity_at_one_and_validation() -> None:
    log_p = torch.log_softmax(torch.randn(1, 5, 3), 1)
    assert truncate_log_probs(log_p, 1.0) is log_p
    for bad in [0.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match="truncation"):
            truncate_log_probs(log_p, bad)


def test_guidance_arithmetic() -> None:
    gen = torch.Generator().manual_seed(0)
    lu = torch.log_softmax(torch.randn(2, 6, 4, generator=gen, dtype=torch.float64), 1)
    lc = torch.log_softmax(torch.randn(2, 6, 4, generator=gen, dtype=torch.float64), 1)
    for scale in [1.0, 3.0, 5.0]:
        out = guided_log_probs(lu, lc, scale)
        unnorm = lu.exp() ** (1 - scale) * lc.exp() ** scale  # p_u^(1-s) p_c^s
        torch.testing.assert_close(out.exp(), unnorm / unnorm.sum(1, keepdim=True))
    torch.testing.assert_close(guided_log_probs(lu, lc, 1.0), lc)


def test_uniform_timesteps() -> None:
    assert uniform_timesteps(100, 100) == list(range(99, -1, -1))
    assert uniform_timesteps(100, 1) == [99]
    assert uniform_timesteps(100, 4) == [99, 74, 49, 24]
    for n in range(1, 101):
        ts = uniform_timesteps(100, n)
        assert len(ts) == n and ts[0] == 99 and ts[-1] >= 0
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    with pytest.raises(ValueError, match="steps"):
        uniform_timesteps(100, 0)
    with pytest.raises(ValueError, match="steps"):
        uniform_timesteps(100, 101)


def dense_loss_reference(schedule, log_p_x0, x0, x_t, t, aux_weight, adaptive, mask_weight):
    """Per-example loss terms computed with brute-force posteriors in float64."""
    B, K, N = log_p_x0.shape
    vb, aux, weights = [], [], []
    for b in range(B):
        tb = int(t[b])
        kl = nll = ce = 0.0
        for n in range(N):
            xt = int(x_t[b, n])
            w = mask_weight[0] if xt == K else mask_weight[1]
            p_model = brute_force_posterior(schedule, log_p_x0[b, :, n].double().exp(), xt, tb, tb - 1)
            p_true = brute_force_posterior(schedule, torch.eye(K, dtype=torch.float64)[x0[b, n]], xt, tb, tb - 1)
            pos = p_true > 0
            kl += w * float((p_true[pos] * (p_true[pos].log() - p_model[pos].log())).sum())
            nll += -math.log(float(p_model[x0[b, n]]))
            ce += -w * float(log_p_x0[b, x0[b, n], n])
        vb.append(nll if tb == 0 else kl)
        aux.append(nll if tb == 0 else ce)
        factor = (1 - tb / schedule.num_timesteps) + 1 if adaptive else 1.0
        weights.append(aux_weight * factor)
    return (
        torch.tensor(vb, dtype=torch.float64),
        torch.tensor(aux, dtype=torch.float64),
        torch.tensor(weights, dtype=torch.float64),
    )


@pytest.mark.parametrize("name", ["reference", "paper"])
def test_loss_terms_match_dense_reference(name: str) -> None:
    K, T, N = 4, 8, 6
    schedule = SCHEDULES[name](K, T)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, K, (4, N), generator=gen)
    t = torch.tensor([0, 1, 5, 7])
    x_t = q_sample(schedule, x0, t, gen)
    x_t[2, 0] = K
    log_p_x0 = torch.log_softmax(torch.randn(4, K, N, generator=gen), 1)
    terms = diffusion_loss(schedule, log_p_x0, x0, x_t, t, aux_weight=0.1, adaptive_aux=True, mask_weight=(1.0, 0.5))
    vb, aux, w = dense_loss_reference(schedule, log_p_x0, x0, x_t, t, 0.1, True, (1.0, 0.5))
    torch.testing.assert_close(terms.vb.double(), vb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms.aux.double(), aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.aux_weight.double(), w)
    p_t = torch.full((4,), 1 / T)
    torch.testing.assert_close(terms.total(p_t), (terms.vb + terms.aux_weight * terms.aux) * T)


def test_loss_is_zero_for_a_perfect_prediction() -> None:
    K, T = 5, 10
    schedule = MaskReplaceSchedule.paper_mask_and_replace(K, T)
    x0 = torch.randint(0, K, (3, 9))
    t = torch.tensor([2, 5, 9])
    x_t = q_sample(schedule, x0, t, torch.Generator().manual_seed(0))
    perfect = log_one_hot(x0, K)
    terms = diffusion_loss(schedule, perfect, x0, x_t, t)
    assert torch.all(terms.vb.abs() < 1e-4)
    assert torch.all(terms.aux.abs() < 1e-4)


def test_importance_sampler() -> None:
    T = 6
    sampler = ImportanceTimestepSampler(T, min_count=2)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    t, p = sampler.sample(1000, gen)
    assert t.min() >= 0 and t.max() < T and torch.allclose(p, torch.full_like(p, 1 / T))
    # Step t has loss t + 1; after enough updates p(t) ~ sqrt(E[L^2]) = t + 1 (step 0 copies step 1).
    for _ in range(200):
        steps = torch.arange(T)
        sampler.update(steps, (steps + 1).float())
    probs = sampler.probabilities()
    weight = torch.tensor([2.0, 2, 3, 4, 5, 6], dtype=torch.float64) + 1e-4
    torch.testing.assert_close(probs, weight / weight.sum(), rtol=1e-4, atol=1e-6)
    state = sampler.state_dict()
    other = ImportanceTimestepSampler(T, min_count=2)
    other.load_state_dict(state)
    torch.testing.assert_close(other.probabilities(), probs)
    with pytest.raises(ValueError, match="shape"):
        ImportanceTimestepSampler(T + 1).load_state_dict(state)


def test_loss_gradient_is_finite_at_every_step_including_the_first() -> None:
    """Zero posterior coefficients (e.g. b_s = 0 at s = -1) must not turn into 0 * inf = NaN gradients."""
    K, T = 6, 10
    for schedule in (MaskReplaceSchedule(K, T), MaskReplaceSchedule.paper_mask_and_replace(K, T)):
        x0 = torch.randint(0, K, (T, 5), generator=torch.Generator().manual_seed(0))
        t = torch.arange(T)
        x_t = q_sample(schedule, x0, t, torch.Generator().manual_seed(1))
        logits = torch.randn(T, K, 5, requires_grad=True)
        terms = diffusion_loss(schedule, torch.log_softmax(logits, 1), x0, x_t, t)
        terms.total().sum().backward()
        assert torch.isfinite(logits.grad).all()
        assert logits.grad[0].abs().sum() > 0  # the decoder NLL at t = 0 does train the model


def test_a_generator_draws_on_its_own_device_and_the_noise_moves() -> None:
    """A CPU generator driving a pipeline on another device (here "meta", the one other device every machine
    has) draws its numbers on the CPU, as diffusers does, so the same seed gives the same noise on any device;
    one generator per row does the same."""
    from vqdiffusion.diffusion import rand_uniform

    g, twin = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = rand_uniform((2, 3), g, torch.device("meta"))
    assert out.device.type == "meta" and out.shape == (2, 3) and out.dtype == torch.float64
    assert torch.equal(g.get_state(), (torch.rand((2, 3), generator=twin, dtype=torch.float64), twin)[1].get_state())
    rows = [torch.Generator().manual_seed(s) for s in (1, 2)]
    before = [r.get_state().clone() for r in rows]
    assert rand_uniform((2, 3), rows, torch.device("meta")).device.type == "meta"
    assert all(not torch.equal(b, r.get_state()) for b, r in zip(before, rows, strict=True))  # each drew on the CPU
