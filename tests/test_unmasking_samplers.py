"""The newer samplers (confidence, ReMDM remasking, first-hitting, Halton order) against exact enumeration,
hand-computed values and large-sample frequencies with bounds."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_samplers import K_TOY, N_TOY, ToyPredictor, exact_subset_probabilities, frequency_bound

from vqdiffusion.diffusion import MaskReplaceSchedule, ordered_unmask_step, spaced_timesteps
from vqdiffusion.sampling import SamplingOptions, sample_tokens
from vqdiffusion.unmasking import (
    confidence_masked_counts,
    confidence_unmask_step,
    first_hitting_steps,
    halton_order,
    halton_ranks,
    nearest_step,
    radical_inverse,
    remask_sigma,
    remask_step,
)


def mask_only(K: int, T: int, g0: float = 0.01, g1: float = 1.0) -> MaskReplaceSchedule:
    """An exactly mask-only schedule: abar = 1 - gbar."""
    return MaskReplaceSchedule(K, T, alpha_cum_start=1 - g0, alpha_cum_end=1 - g1, gamma_cum_start=g0, gamma_cum_end=g1)


def gbar_from_steps(schedule: MaskReplaceSchedule) -> list[float]:
    """gbar_t = 1 - prod_{j <= t} (1 - gamma_j) from the one-step parameters (independent of the table)."""
    gammas = schedule.step_params[2]
    return [1.0 - math.prod(1.0 - g for g in gammas[: t + 1]) for t in range(schedule.num_timesteps)]


# ---------------------------------------------------------------------------------------------------------
# Confidence (MaskGIT) sampler
# ---------------------------------------------------------------------------------------------------------


def test_confidence_masked_counts_by_hand() -> None:
    # cosine, N = 10, n = 4: floor(10 cos(pi r / 2)) at r = 1/4, 1/2, 3/4 -> 9, 7, 3; then 0
    assert confidence_masked_counts(10, 4, "cosine") == [9, 7, 3, 0]
    assert confidence_masked_counts(10, 4, "linear") == [7, 5, 2, 0]
    # more steps than tokens: at least one per step until none is left
    assert confidence_masked_counts(5, 12, "linear") == [4, 3, 2, 1] + [0] * 8
    assert confidence_masked_counts(3, 1) == [0]
    with pytest.raises(ValueError, match="masking_schedule"):
        confidence_masked_counts(3, 2, "square")


@pytest.mark.parametrize("noise", [1.5, 0.0])
def test_confidence_step_distribution_by_enumeration(noise: float) -> None:
    """K = 2, N = 3 all [MASK], fill 2: candidates c ~ prod p_n, then the filled pair is the top 2 of
    log p_n(c_n) + tau G_n: a draw without replacement with weights p_n(c_n)^(1 / tau)."""
    K, N = 2, 3
    p = torch.tensor([[0.8, 0.2], [0.55, 0.45], [0.3, 0.7]], dtype=torch.float64)  # [N, K]
    log_p = p.T.log().float()[None]  # [1, K, N]
    n = 40000
    out = confidence_unmask_step(
        log_p.expand(n, -1, -1), torch.full((n, N), K), 1, noise, torch.Generator().manual_seed(0)
    )
    exact: dict[tuple[int, ...], float] = {}
    for c in itertools.product(range(K), repeat=N):
        prior = math.prod(float(p[i, c[i]]) for i in range(N))
        if noise > 0:
            weights = [float(p[i, c[i]]) ** (1 / noise) for i in range(N)]
            subsets = exact_subset_probabilities(weights, 2)
        else:  # greedy: the two most confident
            top = sorted(range(N), key=lambda i: -float(p[i, c[i]]))[:2]
            subsets = {frozenset(top): 1.0}
        for subset, prob in subsets.items():
            state = tuple(c[i] if i in subset else K for i in range(N))
            exact[state] = exact.get(state, 0.0) + prior * prob
    rows = [tuple(r) for r in out.tolist()]
    assert set(rows) <= set(exact)
    for state, prob in exact.items():
        freq = sum(r == state for r in rows) / n
        assert abs(freq - prob) <= frequency_bound(prob, n), (state, freq, prob)


def test_confidence_loop_follows_its_schedule() -> None:
    schedule = MaskReplaceSchedule(K_TOY, 100)
    predict = ToyPredictor()
    options = SamplingOptions(num_inference_steps=4, sampler="confidence", masking_schedule="cosine")
    gen = torch.Generator().manual_seed(1)
    out = sample_tokens(predict, schedule, 2, N_TOY, options, generator=gen, progress=False)
    assert int(out.max()) < K_TOY
    masked_before = [N_TOY, *confidence_masked_counts(N_TOY, 4)[:-1]]
    assert [m[0] for _, m in predict.calls] == masked_before
    gbar = schedule.cumulative[2]
    for (t, _), before in zip(predict.calls, masked_before, strict=True):
        assert all(abs(gbar[t] - before / N_TOY) <= abs(g - before / N_TOY) + 1e-12 for g in gbar)
    assert nearest_step(schedule, 1.0) == 99 and nearest_step(schedule, 0.0) == 0


# ---------------------------------------------------------------------------------------------------------
# ReMDM remasking
# ---------------------------------------------------------------------------------------------------------


def test_remask_sigma_by_hand() -> None:
    schedule = mask_only(4, 10)
    gbar = gbar_from_steps(schedule)
    for t, s in [(9, 8), (5, 4), (1, 0), (0, -1)]:
        alpha_t, alpha_s = 1 - gbar[t], 1 - (gbar[s] if s >= 0 else 0.0)
        sigma_max = min(1.0, (1 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0
        assert remask_sigma(schedule, t, s, "cap", 0.05) == pytest.approx(min(0.05, sigma_max), abs=1e-12)
        assert remask_sigma(schedule, t, s, "rescale", 0.3) == pytest.approx(0.3 * sigma_max, abs=1e-12)
    assert remask_sigma(schedule, 0, -1, "cap", 0.5) == 0.0  # the last step never remasks
    with pytest.raises(ValueError, match="remask_schedule"):
        remask_sigma(schedule, 3, 2, "loop", 0.1)


def test_remask_step_frequencies() -> None:
    K, n = 3, 40000
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    log_p = p.log().float()[None, :, None].expand(n, K, 2)
    x_t = torch.tensor([[K, 1]]).expand(n, 2)
    alpha_t, alpha_s, sigma = 0.4, 0.6, 0.25
    out = remask_step(log_p, x_t, alpha_t, alpha_s, sigma, torch.Generator().manual_seed(3))
    unmask = (alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t)  # the paper's formula, by hand: 0.5
    for j in range(K):
        prob = unmask * float(p[j])
        assert abs(float((out[:, 0] == j).float().mean()) - prob) <= frequency_bound(prob, n)
    assert abs(float((out[:, 1] == K).float().mean()) - sigma) <= frequency_bound(sigma, n)
    assert set(out[:, 1].tolist()) <= {1, K}
    with pytest.raises(ValueError, match="sigma"):
        remask_step(log_p, x_t, 0.4, 0.8, 0.9, None)  # above (1 - alpha_s) / alpha_t = 0.5


def test_remasking_preserves_the_forward_marginal() -> None:
    """With a perfect denoiser and z_t ~ q(z_t | x0), a ReMDM step leaves [MASK] with prob 1 - alpha_s."""
    K, n, alpha_t, alpha_s = 4, 60000, 0.3, 0.55
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, K, (n, 1), generator=gen)
    z_t = torch.where(torch.rand(n, 1, generator=gen) < 1 - alpha_t, K, x0)
    perfect = torch.full((n, K, 1), -math.inf).scatter_(1, x0[:, None], 0.0)
    sigma_max = min(1.0, (1 - alpha_s) / alpha_t)
    for sigma in (0.0, 0.5 * sigma_max, sigma_max):
        z_s = remask_step(perfect, z_t, alpha_t, alpha_s, sigma, gen)
        assert torch.equal(z_s[z_s != K], x0[z_s != K])
        assert abs(float((z_s == K).float().mean()) - (1 - alpha_s)) <= frequency_bound(1 - alpha_s, n)


def test_remdm_needs_a_mask_only_schedule() -> None:
    options = SamplingOptions(num_inference_steps=5, sampler="remdm")
    for sampler in ("remdm", "first_hitting"):
        options = SamplingOptions(num_inference_steps=5, sampler=sampler)
        with pytest.raises(ValueError, match="mask-only"):
            sample_tokens(ToyPredictor(), MaskReplaceSchedule.paper_mask_and_replace(K_TOY, 100), 1, N_TOY, options,
                          progress=False)  # fmt: skip
        # the reference schedule (replace mass 1e-6) counts as mask-only
        sample_tokens(ToyPredictor(), MaskReplaceSchedule(K_TOY, 100), 1, N_TOY, options, progress=False)


# ---------------------------------------------------------------------------------------------------------
# First-hitting sampler: the exact ancestral chain, fewer calls
# ---------------------------------------------------------------------------------------------------------


def test_first_hitting_step_frequencies() -> None:
    schedule = MaskReplaceSchedule(K_TOY, 100)
    steps = spaced_timesteps(100, 7)
    gbar = gbar_from_steps(schedule)
    survival = [gbar[s] / gbar[steps[0]] for s in steps[1:]] + [0.0]
    n = 40000
    hit = first_hitting_steps(schedule, steps, n, 1, torch.Generator().manual_seed(5))
    for i in range(7):
        prob = (1.0 if i == 0 else survival[i - 1]) - survival[i]
        assert abs(float((hit == i).float().mean()) - prob) <= frequency_bound(prob, n), i


class TinyPredictor:
    """Row-wise log p(x0 | x_t) for K = 2, N = 2 that depends on the other token and on t; counts calls."""

    K, N = 2, 2

    def __init__(self) -> None:
        self.calls = 0

    def probs(self, x: tuple[int, ...], t: int) -> list[list[float]]:
        """[N][K] probabilities for state x (values 0, 1 or 2 = [MASK])."""
        out = []
        for n in range(self.N):
            other = x[1 - n]
            a = 0.2 + 0.25 * other + 0.1 * n + 0.05 * t
            out.append([a, 1 - a])
        return out

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        self.calls += 1
        probs = torch.tensor([self.probs(tuple(row), t) for row in x_t.tolist()])  # [B, N, K]
        return probs.log().transpose(1, 2)


def exact_ancestral(schedule: MaskReplaceSchedule, steps: list[int], predictor: TinyPredictor) -> dict:
    """The final distribution of the mask-only ancestral chain by dynamic programming over states: at t -> s
    each [MASK] token unmasks with prob (gbar_t - gbar_s) / gbar_t to x0 ~ p(x0 | x_t), real tokens stay;
    the last step draws x0 ~ p(x0 | x_t) at every position (docs/design.md §6.2)."""
    K, N = predictor.K, predictor.N
    gbar = gbar_from_steps(schedule)
    dist = {(K,) * N: 1.0}
    for i, t in enumerate(steps):
        g_s = gbar[steps[i + 1]] if i + 1 < len(steps) else 0.0
        unmask = (gbar[t] - g_s) / gbar[t]
        new: dict = {}
        for x, px in dist.items():
            probs = predictor.probs(x, t)
            last = i == len(steps) - 1
            options = [[(x[n], 1.0)] if x[n] != K and not last else
                       [(K, 1 - unmask)] + [(k, unmask * probs[n][k]) for k in range(K)] for n in range(N)]  # fmt: skip
            for combo in itertools.product(*options):
                y = tuple(v for v, _ in combo)
                new[y] = new.get(y, 0.0) + px * math.prod(q for _, q in combo)
        dist = new
    return dist


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting"])
def test_first_hitting_has_the_ancestral_distribution(sampler: str) -> None:
    schedule = mask_only(2, 4, g0=0.2, g1=1.0)
    steps = [3, 2, 1, 0]
    exact = exact_ancestral(schedule, steps, TinyPredictor())
    exact = {x: p for x, p in exact.items() if p > 0}
    assert abs(sum(exact.values()) - 1) < 1e-12 and all(2 not in x for x in exact)
    n = 30000
    options = SamplingOptions(num_inference_steps=4, sampler=sampler, guidance_scale=1.0)
    out = sample_tokens(TinyPredictor(), schedule, n, 2, options, generator=torch.Generator().manual_seed(6),
                        progress=False)  # fmt: skip
    rows = [tuple(r) for r in out.tolist()]
    for state, prob in exact.items():
        freq = sum(r == state for r in rows) / n
        assert abs(freq - prob) <= frequency_bound(prob, n), (sampler, state, freq, prob)


def test_first_hitting_calls_only_where_tokens_unmask() -> None:
    schedule = MaskReplaceSchedule(K_TOY, 100)
    options = SamplingOptions(num_inference_steps=100, sampler="first_hitting")
    predict = ToyPredictor()
    gen = torch.Generator().manual_seed(7)
    out = sample_tokens(predict, schedule, 1, N_TOY, options, generator=gen, progress=False)
    hit = first_hitting_steps(schedule, list(range(99, -1, -1)), 1, N_TOY, torch.Generator().manual_seed(7))
    expected = sorted(set(hit.flatten().tolist()) | {99})  # and the last step, which draws every position
    assert [t for t, _ in predict.calls] == [99 - i for i in expected]
    assert len(predict.calls) <= N_TOY + 1 < 100 and int(out.max()) < K_TOY
    # each call sees exactly the tokens not yet hit as [MASK]
    assert [m[0] for _, m in predict.calls] == [int((hit >= i).sum()) for i in expected]


# ---------------------------------------------------------------------------------------------------------
# Halton order
# ---------------------------------------------------------------------------------------------------------


def test_radical_inverse_and_halton_order_by_hand() -> None:
    i = torch.arange(1, 5)
    torch.testing.assert_close(radical_inverse(i, 2), torch.tensor([0.5, 0.25, 0.75, 0.125], dtype=torch.float64))
    torch.testing.assert_close(radical_inverse(i, 3), torch.tensor([1, 2, 1 / 3, 4 / 3], dtype=torch.float64) / 3)
    # 4 x 4 grid, cell = row * 4 + col with col = floor(4 phi_2(i)), row = floor(4 phi_3(i)):
    # i = 0 -> (0, 0); 1 -> (row 1, col 2); 2 -> (2, 1); 3 -> (0, 3); 4 -> (1, 0)
    order = halton_order(4, 4)
    assert order[:5].tolist() == [0, 6, 9, 3, 4]
    for h, w in [(4, 4), (3, 5), (32, 32)]:
        assert sorted(halton_order(h, w, (0.3, 0.7)).tolist()) == list(range(h * w))


def test_halton_order_is_spread_out() -> None:
    """The first quarter of a 16 x 16 order puts 16 +- 4 cells in each 8 x 8 quadrant (random: +- 8 often)."""
    for shift in [(0.0, 0.0), (0.37, 0.81)]:
        first = halton_order(16, 16, shift)[:64]
        quadrant = (first // 16 >= 8).long() * 2 + (first % 16 >= 8).long()
        assert torch.bincount(quadrant, minlength=4).sub(16).abs().max() <= 4


def test_ordered_step_and_halton_loop() -> None:
    K = 3
    log_p = torch.log_softmax(torch.randn(1, K, 5), 1)
    x_t = torch.tensor([[K, 1, K, K, K]])
    rank = torch.tensor([[4, 0, 2, 1, 3]])
    out = ordered_unmask_step(log_p, x_t, 2, rank, torch.Generator().manual_seed(0))
    assert (out[0, [2, 3]] < K).all() and out[0, 1] == 1 and (out[0, [0, 4]] == K).all()
    # the loop fills positions in each image's order
    schedule = MaskReplaceSchedule(K_TOY, 100)
    options = SamplingOptions(num_inference_steps=5, sampler="uniform", order="halton")

    class Recorder(ToyPredictor):
        def __call__(self, x_t, t):
            self.states = [*getattr(self, "states", []), x_t.clone()]
            return super().__call__(x_t, t)

    predict = Recorder()
    sample_tokens(predict, schedule, 2, N_TOY, options, generator=torch.Generator().manual_seed(8), progress=False,
                  token_shape=(2, 5))  # fmt: skip
    ranks = halton_ranks(2, 2, 5, torch.Generator().manual_seed(8))
    for state in predict.states:
        filled = (state < K_TOY).sum(1)
        assert torch.equal(state < K_TOY, ranks < filled[:, None])
    with pytest.raises(ValueError, match="token_shape"):
        sample_tokens(ToyPredictor(), schedule, 1, N_TOY, options, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Loop properties shared by the new samplers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(num_inference_steps=6, sampler="confidence", masking_schedule="linear", temperature=0.8),
        SamplingOptions(num_inference_steps=10, sampler="remdm", remask_schedule="rescale", remask_eta=0.5),
        SamplingOptions(num_inference_steps=20, sampler="remdm", truncation_rate=0.8),
        SamplingOptions(num_inference_steps=30, sampler="first_hitting"),
        SamplingOptions(num_inference_steps=7, sampler="uniform", order="halton"),
    ],
)
def test_batch_equals_one_at_a_time_with_per_image_generators(options: SamplingOptions) -> None:
    schedule = MaskReplaceSchedule(K_TOY, 100)
    seeds = [3, 4, 5]
    shape = (2, 5)
    batch = sample_tokens(
        ToyPredictor(), schedule, 3, N_TOY, options, token_shape=shape,
        generator=[torch.Generator().manual_seed(s) for s in seeds], progress=False,
    )  # fmt: skip
    assert int(batch.max()) < K_TOY
    for row, seed in enumerate(seeds):
        single = sample_tokens(
            ToyPredictor(), schedule, 1, N_TOY, options, token_shape=shape,
            generator=[torch.Generator().manual_seed(seed)], progress=False,
        )  # fmt: skip
        assert torch.equal(batch[row : row + 1], single)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"order": "halton"}, "order"),
        ({"sampler": "purity", "order": "halton"}, "order"),
        ({"sampler": "uniform", "order": "spiral"}, "order"),
        ({"masking_schedule": "linear"}, "masking_schedule"),
        ({"sampler": "confidence", "masking_schedule": "square"}, "masking_schedule"),
        ({"sampler": "confidence", "choice_temperature": -1.0}, "choice_temperature"),
        ({"choice_temperature": 1.0}, "choice_temperature"),
        ({"sampler": "remdm", "remask_eta": 1.5}, "remask_eta"),
        ({"remask_eta": 0.1}, "remask_eta"),
        ({"sampler": "remdm", "remask_schedule": "loop"}, "remask_schedule"),
        ({"sampler": "first_hitting", "tokens_per_call": 2}, "tokens_per_call"),
    ],
)
def test_new_options_validate_their_fields(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingOptions(**kwargs)
    assert str(info.value).startswith(f"{field} must ")


@pytest.mark.parametrize("sampler", ["confidence", "remdm", "first_hitting"])
def test_callback_counts_the_loop_of_every_new_sampler(sampler: str) -> None:
    """callback(done, total) after each iteration of the sampler's own loop, ending at (total, total); the
    confidence loop with more steps than tokens still reports every step."""
    schedule = mask_only(K_TOY, 40)
    steps = 3 * N_TOY if sampler == "confidence" else 12
    predict = ToyPredictor()
    seen: list[tuple[int, int]] = []
    options = SamplingOptions(num_inference_steps=steps, sampler=sampler)
    sample_tokens(predict, schedule, 2, N_TOY, options, generator=torch.Generator().manual_seed(1), progress=False,
                  callback=lambda done, total: seen.append((done, total)))  # fmt: skip
    total = seen[-1][1]
    assert seen == [(i, total) for i in range(1, total + 1)]
    expected_total = len(predict.calls) if sampler == "first_hitting" else steps
    assert total == expected_total
