"""Wilson score intervals against published values and a brute-force inversion of the score test."""

from __future__ import annotations

import math

import pytest

from vqdiffusion.eval.stats import format_rate, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score, no correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_table(k: int, n: int, low: float, high: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


@pytest.mark.parametrize(("k", "n"), [(3, 7), (50, 128), (127, 128)])
def test_wilson_endpoints_solve_the_score_equation(k: int, n: int) -> None:
    """Each endpoint p0 satisfies |k/n - p0| = z sqrt(p0 (1 - p0) / n): found here by bisection."""
    z = 1.959963984540054

    def score(p0: float) -> float:
        return abs(k / n - p0) - z * math.sqrt(p0 * (1 - p0) / n)

    def root(a: float, b: float) -> float:  # score changes sign on [a, b]
        for _ in range(200):
            m = (a + b) / 2
            a, b = (m, b) if (score(a) > 0) == (score(m) > 0) else (a, m)
        return (a + b) / 2

    low, high = wilson_interval(k, n)
    assert low == pytest.approx(root(0.0, k / n), abs=1e-9)
    assert high == pytest.approx(root(k / n, 1.0), abs=1e-9)


def test_bad_counts_and_formatting() -> None:
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="trials"):
        wilson_interval(0, 0)
    assert format_rate(0, 20) == "0.0% [0.0, 16.1]"


@pytest.mark.parametrize("n", [1, 3, 7, 64, 1000])
def test_wilson_is_exact_at_the_extremes(n: int) -> None:
    """At 0 of n the lower bound is exactly 0 and at n of n the upper bound is exactly 1 (no rounding residue)."""
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    assert wilson_interval(0, n)[1] > 0.0 and wilson_interval(n, n)[0] < 1.0
