"""Argument types shared by the commands (argparse ``type=`` callables: a bad value is argparse's one-line
error naming the flag)."""

from __future__ import annotations

import argparse

from .. import config

#: The largest seed: torch, numpy and Python's generators all take a seed below 2**63.
MAX_SEED = 2**63 - 1


def seed(text: str) -> int:
    """``--seed``: an integer in [0, :data:`MAX_SEED`]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text}")
    return value


def number_pair(text: str) -> tuple[float, float]:
    """A pair ``a,b`` of numbers (``--crop-coords 0,0``, ``--orig-size 256,256``): :func:`config.number_pair`."""
    try:
        return config.number_pair(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
