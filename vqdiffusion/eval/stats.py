"""Confidence intervals for the rates the evaluation suites report."""

from __future__ import annotations

import math

__all__ = ["Z_95", "format_rate", "wilson_interval"]

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (Wilson 1927), 95% by default.

    With p = k / n: centre (p + z^2 / 2n) / (1 + z^2 / n), half-width
    z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).  Unlike the normal interval it stays inside [0, 1]
    and is not degenerate at k = 0 or k = n.
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # The bounds at k = 0 and k = n are exactly 0 and 1 (the rounding of centre - half can leave 1e-17).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def format_rate(successes: int, trials: int) -> str:
    """``"68.4% [62.5, 73.8]"``: the rate and its 95% Wilson interval, in percent."""
    low, high = wilson_interval(successes, trials)
    return f"{100 * successes / trials:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
