"""High-quality inference (uniform / purity prior), step spacings, budgets and temperature, checked against
exact enumeration, large-sample frequencies with bounds, and independent float64 computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vqdiffusion.diffusion import (
    MaskReplaceSchedule,
    prior_unmask_step,
    purity_scores,
    select_positions,
    spaced_timesteps,
    temper_log_probs,
    unmask_budget,
)
from vqdiffusion.sampling import SamplingOptions, sample_tokens


def frequency_bound(p: float, n: int) -> float:
    """Five standard deviations of a frequency of probability p over n draws (plus a small floor)."""
    return 5.0 * math.sqrt(p * (1 - p) / n) + 1e-3


# ---------------------------------------------------------------------------------------------------------
# Step spacings and budgets
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("n", [1, 2, 5, 10, 25, 50, 99, 100])
def test_spacings_are_strictly_decreasing_from_the_last_step(spacing: str, n: int) -> None:
    steps = spaced_timesteps(100, n, spacing)
    assert len(steps) == n and steps[0] == 99 and steps[-1] >= 0
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))
    if n == 100:
        assert steps == list(range(99, -1, -1))


def test_quadratic_spacing_is_denser_near_x0() -> None:
    steps = spaced_timesteps(100, 10, "quadratic")
    jumps = [a - b for a, b in zip(steps, steps[1:] + [-1], strict=True)]
    assert jumps == sorted(jumps, reverse=True) and jumps[0] > jumps[-1]
    # t_i = ceil(T (i / n)^2) - 1, in exact integer arithmetic
    assert steps == [-(-100 * i * i // 100) - 1 for i in range(10, 0, -1)]
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(100, 10, "cosine")


@pytest.mark.parametrize(
    "schedule",
    [
        MaskReplaceSchedule(16, 100),
        MaskReplaceSchedule.paper_mask_and_replace(16, 100),
        MaskReplaceSchedule(7, 10, gamma_cum_start=0.2, gamma_cum_end=0.9, alpha_cum_start=0.7, alpha_cum_end=0.05),
    ],
)
@pytest.mark.parametrize("num_tokens", [1, 5, 64, 1024])
def test_budget_follows_the_expected_masked_count(schedule: MaskReplaceSchedule, num_tokens: int) -> None:
    T = schedule.num_timesteps
    for n in {1, 2, T // 4 or 1, T}:
        steps = spaced_timesteps(T, n)
        budget = unmask_budget(schedule, steps, num_tokens)
        assert len(budget) == n and sum(budget) == num_tokens and min(budget) >= 0
        # independent float64: gbar_s = 1 - prod_{j <= s} (1 - gamma_j) from the one-step parameters
        gammas = schedule.step_params[2]
        gbar = [1.0 - math.prod(1.0 - g for g in gammas[: s + 1]) for s in range(T)]
        masked = num_tokens
        for i, count in enumerate(budget):
            masked -= count
            s = steps[i + 1] if i + 1 < n else None
            expected = 0.0 if s is None else num_tokens * gbar[s] / gbar[steps[0]]
            assert abs(masked - expected) <= 0.5 + 1e-9


def test_budget_matches_the_authors_table_for_1024_tokens() -> None:
    # the authors' n_sample for T = 100 (index = step): step 0 is their plain posterior step that fills the rest
    authors = [1, 10] + [11, 10, 10] * 32 + [11, 11]
    ours = unmask_budget(MaskReplaceSchedule(4096, 100), list(range(99, -1, -1)), 1024)
    filled_authors = list(itertools.accumulate(authors[::-1]))[:-1]  # after steps 99 .. 1
    filled_ours = list(itertools.accumulate(ours))[:-1]
    assert max(abs(a - b) for a, b in zip(filled_authors, filled_ours, strict=True)) <= 2
    assert sum(ours) == 1024


def test_budget_rejects_bad_steps() -> None:
    schedule = MaskReplaceSchedule(4, 10)
    for steps in ([], [9, 9], [3, 5], [10, 2], [4, -1]):
        with pytest.raises(ValueError):
            unmask_budget(schedule, steps, 4)


# ---------------------------------------------------------------------------------------------------------
# Temperature, purity, weighted selection without replacement
# ---------------------------------------------------------------------------------------------------------


def test_temperature_against_float64() -> None:
    log_p = torch.log_softmax(torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    for tau in (0.3, 1.0, 2.5):
        p = log_p.double().exp() ** (1.0 / tau)
        torch.testing.assert_close(temper_log_probs(log_p, tau).double().exp(), p / p.sum(1, keepdim=True))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            temper_log_probs(log_p, bad)


def test_purity_scores() -> None:
    p = torch.tensor([[[0.9, 0.5, 0.2], [0.1, 0.5, 0.8]]])  # [1, K=2, N=3]
    torch.testing.assert_close(purity_scores(p.log()), torch.tensor([[0.9, 0.5, 0.8]]) / 0.9)


def exact_subset_probabilities(weights: list[float], count: int) -> dict[frozenset, float]:
    """Sequential draws without replacement, each proportional to the remaining weights, by enumeration."""
    out: dict[frozenset, float] = {}
    for order in itertools.permutations(range(len(weights)), count):
        prob, left = 1.0, sum(weights)
        for i in order:
            if left <= 0 or weights[i] == 0:
                prob = 0.0
                break
            prob *= weights[i] / left
            left -= weights[i]
        key = frozenset(order)
        out[key] = out.get(key, 0.0) + prob
    return out


@pytest.mark.parametrize("count", [1, 2, 3])
def test_select_positions_distribution(count: int) -> None:
    weights = [0.1, 1.0, 0.0, 0.45, 0.3]
    n = 40000
    chosen = select_positions(torch.tensor([weights]).expand(n, -1), count, torch.Generator().manual_seed(1))
    assert (chosen.sum(1) == count).all() and not chosen[:, 2].any()  # weight 0: never drawn
    keys = [frozenset(torch.nonzero(row).flatten().tolist()) for row in chosen]
    for subset, p in exact_subset_probabilities(weights, count).items():
        freq = sum(k == subset for k in keys) / n
        assert abs(freq - p) <= frequency_bound(p, n), (subset, freq, p)


@pytest.mark.parametrize("rule, weight", [("uniform", 0.0), ("purity", 0.0), ("purity", 2.0)])
def test_one_prior_step_distribution_by_enumeration(rule: str, weight: float) -> None:
    """K = 3 classes, N = 3 positions, position 1 already real: fill one [MASK] position."""
    K = 3
    logits = torch.tensor([[2.0, 0.1, -1.0], [0.0, 0.0, 0.0], [-0.5, 1.5, 0.3]]).T[None]  # [1, K, N]
    log_p = torch.log_softmax(logits, dim=1)
    x_t = torch.tensor([[K, 2, K]])
    n = 40000
    out = prior_unmask_step(
        log_p.expand(n, -1, -1), x_t.expand(n, -1), 1, rule=rule, prior_weight=weight,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    assert (out[:, 1] == 2).all() and ((out == K).sum(1) == 1).all()
    # exact: position i with prob score_i / sum over masked scores, token k ~ softmax((1 + r score_i) log p_i)
    p = log_p[0].double().exp()  # [K, N]
    purity = p.max(0).values / p.max(0).values.max()
    score = purity if rule == "purity" else torch.ones(3, dtype=torch.float64)
    masked = [0, 2]
    for i in masked:
        tilted = torch.softmax((1 + weight * score[i]) * p[:, i].log(), dim=0)
        for k in range(K):
            prob = float(score[i] / score[masked].sum() * tilted[k])
            freq = float(((out[:, i] == k) & (out[:, 2 - i] == K)).float().mean())
            assert abs(freq - prob) <= frequency_bound(prob, n), (i, k, freq, prob)


def test_prior_step_argument_errors() -> None:
    log_p = torch.log_softmax(torch.randn(1, 3, 4), dim=1)
    x_t = torch.full((1, 4), 3)
    with pytest.raises(ValueError, match="rule"):
        prior_unmask_step(log_p, x_t, 1, rule="top")
    with pytest.raises(ValueError, match="purity"):
        prior_unmask_step(log_p, x_t, 1, rule="uniform", prior_weight=1.0)
    with pytest.raises(ValueError, match="x_t"):
        prior_unmask_step(log_p, x_t[:, :3], 1)


# ---------------------------------------------------------------------------------------------------------
# The sampling loop
# ---------------------------------------------------------------------------------------------------------

K_TOY, N_TOY = 6, 10


class ToyPredictor:
    """Row-wise log p(x0 | x_t): a fixed function of each image's own tokens (so batching cannot matter),
    recording the number of [MASK] tokens it saw at each call."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.weight = torch.randn(K_TOY, K_TOY + 1, generator=g)  # class x (token value)
        self.bias = torch.randn(K_TOY, N_TOY, generator=g)
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        self.calls.append((t, (x_t == K_TOY).sum(1).tolist()))
        one_hot = torch.nn.functional.one_hot(x_t, K_TOY + 1).float()  # [B, N, K+1]
        context = one_hot.mean(1) @ self.weight.T  # [B, K]
        return torch.log_softmax(self.bias[None] + context[:, :, None] * (1 + t / 50), dim=1)


@pytest.mark.parametrize("sampler", ["uniform", "purity"])
@pytest.mark.parametrize("steps, spacing", [(100, "uniform"), (7, "uniform"), (7, "quadratic"), (1, "uniform")])
def test_budget_samplers_follow_the_budget_and_end_unmasked(sampler: str, steps: int, spacing: str) -> None:
    schedule = MaskReplaceSchedule(K_TOY, 100)
    predict = ToyPredictor()
    weight = 1.0 if sampler == "purity" else 0.0
    options = SamplingOptions(num_inference_steps=steps, spacing=spacing, sampler=sampler, prior_weight=weight)
    generator = torch.Generator().manual_seed(0)
    out = sample_tokens(predict, schedule, 3, N_TOY, options, generator=generator, progress=False)
    assert out.shape == (3, N_TOY) and int(out.max()) < K_TOY
    timesteps = spaced_timesteps(100, steps, spacing)
    budget = unmask_budget(schedule, timesteps, N_TOY)
    expected_calls = [(t, N_TOY - sum(budget[:i])) for i, t in enumerate(timesteps) if budget[i] > 0]
    assert [(t, masked[0]) for t, masked in predict.calls] == expected_calls  # empty budgets make no call
    assert all(len(set(masked)) == 1 for _, masked in predict.calls)  # every image on the same budget


def test_tokens_per_call_splits_each_step() -> None:
    schedule = MaskReplaceSchedule(K_TOY, 100)
    predict = ToyPredictor()
    options = SamplingOptions(num_inference_steps=2, sampler="purity", tokens_per_call=2)
    sample_tokens(predict, schedule, 2, N_TOY, options, generator=torch.Generator().manual_seed(0), progress=False)
    budget = unmask_budget(schedule, spaced_timesteps(100, 2), N_TOY)  # [5, 5]
    assert len(predict.calls) == sum(-(-b // 2) for b in budget)
    masked = [m[0] for _, m in predict.calls]
    assert masked == [10, 8, 6, 5, 3, 1]  # 5 = 2 + 2 + 1 twice, largest parts first


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(num_inference_steps=10),
        SamplingOptions(num_inference_steps=10, sampler="uniform", temperature=0.7),
        SamplingOptions(num_inference_steps=10, sampler="purity", prior_weight=1.0, truncation_rate=0.8),
        SamplingOptions(num_inference_steps=5, spacing="quadratic", sampler="purity", tokens_per_call=1),
    ],
)
def test_batch_equals_one_at_a_time_with_per_image_generators(options: SamplingOptions) -> None:
    schedule = MaskReplaceSchedule(K_TOY, 100)
    seeds = [3, 4, 5]
    batch = sample_tokens(
        ToyPredictor(), schedule, 3, N_TOY, options,
        generator=[torch.Generator().manual_seed(s) for s in seeds], progress=False,
    )  # fmt: skip
    for row, seed in enumerate(seeds):
        single = sample_tokens(
            ToyPredictor(), schedule, 1, N_TOY, options, generator=[torch.Generator().manual_seed(seed)], progress=False
        )
        assert torch.equal(batch[row : row + 1], single)
    again = sample_tokens(
        ToyPredictor(), schedule, 3, N_TOY, options,
        generator=[torch.Generator().manual_seed(s) for s in seeds], progress=False,
    )  # fmt: skip
    assert torch.equal(batch, again)


def test_explicit_timesteps_run_the_one_step_posterior() -> None:
    """diffusers' fewer-steps behaviour (steps n-1..0 from all-[MASK]) reproduced with explicit indices."""
    schedule = MaskReplaceSchedule(K_TOY, 100)
    predict = ToyPredictor()
    options = SamplingOptions(num_inference_steps=5)
    out = sample_tokens(
        predict, schedule, 2, N_TOY, options, generator=torch.Generator().manual_seed(0), progress=False,
        timesteps=[4, 3, 2, 1, 0],
    )  # fmt: skip
    assert [t for t, _ in predict.calls] == [4, 3, 2, 1, 0] and int(out.max()) < K_TOY
    with pytest.raises(ValueError, match="decreasing"):
        sample_tokens(predict, schedule, 1, N_TOY, options, progress=False, timesteps=[3, 4])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "greedy"}, "sampler"),
        ({"spacing": "cosine"}, "spacing"),
        ({"temperature": 0.0}, "temperature"),
        ({"prior_weight": 1.0}, "prior_weight"),
        ({"sampler": "uniform", "prior_weight": 1.0}, "prior_weight"),
        ({"sampler": "purity", "prior_weight": -1.0}, "prior_weight"),
        ({"tokens_per_call": 2}, "tokens_per_call"),
        ({"sampler": "purity", "tokens_per_call": 0}, "tokens_per_call"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
    ],
)
def test_option_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**kwargs).validate(100)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"truncation_rate": 0.0}, "truncation_rate"),
        ({"spacing": "cosine"}, "spacing"),
        ({"temperature": float("inf")}, "temperature"),
        ({"sampler": "greedy"}, "sampler"),
        ({"prior_weight": 1.0}, "prior_weight"),
        ({"sampler": "purity", "prior_weight": float("nan")}, "prior_weight"),
        ({"tokens_per_call": 2}, "tokens_per_call"),
        ({"sampler": "uniform", "tokens_per_call": 1.5}, "tokens_per_call"),
    ],
)
def test_options_validate_their_fields_on_construction(kwargs: dict, field: str) -> None:
    """No model needed: the error comes from the constructor and starts with "<field> must"."""
    with pytest.raises(ValueError) as info:
        SamplingOptions(**kwargs)
    assert str(info.value).startswith(f"{field} must ")


def test_step_count_upper_bound_needs_the_model() -> None:
    options = SamplingOptions(num_inference_steps=101)  # fine without a model
    options.validate(101)
    with pytest.raises(ValueError, match=r"^num_inference_steps must be an integer in \[1, 100\]"):
        options.validate(100)
