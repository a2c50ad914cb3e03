"""Finite scalar quantization (Mentzer et al. 2023, *Finite Scalar Quantization: VQ-VAE Made Simple*;
docs/design.md §13): pure functions over tensors, then :class:`FSQCodebook`, the fixed grid they define.

A latent of d = len(levels) dimensions is bounded and rounded dimension by dimension; dimension i has L_i
levels.  With ``half_i = (L_i - 1) / 2``, ``offset_i = 0.5`` for even L_i (else 0) and
``shift_i = atanh(offset_i / half_i)`` (0 for L_i = 2, where the ratio is 1):

    bound_i(z) = tanh(z + shift_i) * half_i - offset_i     in (-(L_i // 2) - 0.5, (L_i - 1) // 2 + 0.5)
    q_i        = round(bound_i(z))                          integers -(L_i // 2) .. (L_i - 1) // 2: L_i of them
    code_i     = q_i / (L_i // 2)                           in [-1, 1]
    digit_i    = q_i + L_i // 2                             in [0, L_i)
    index      = sum_i digit_i * prod_{j < i} L_j           in [0, K), K = prod_i L_i (dimension 0 varies fastest)

Training passes the rounding straight through, ``round(x) -> x + sg(round(x) - x)``, so the encoder gets the
gradient of the bounding; there is no codebook or commitment loss and no code can die.  The implicit
codebook is the grid of the K codes, stored as :class:`FSQCodebook`'s ``weight`` buffer so that token lookup,
decoding and the saved format are those of a VQ codebook.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .codebook import Codebook

__all__ = [
    "FSQCodebook",
    "fsq_bound",
    "fsq_codes_to_indices",
    "fsq_grid",
    "fsq_indices_to_codes",
    "fsq_quantize",
    "fsq_round",
]

Levels = Sequence[int] | torch.Tensor


def _levels_like(levels: Levels, like: torch.Tensor) -> torch.Tensor:
    """``levels`` as an int64 tensor ``[d]`` on ``like``'s device."""
    return torch.as_tensor(levels, dtype=torch.long, device=like.device)


def _check_width(z: torch.Tensor, levels: torch.Tensor, what: str) -> None:
    if z.ndim == 0 or z.shape[-1] != levels.numel():
        raise ValueError(f"{what} must be [..., {levels.numel()}] (one entry per FSQ level), got {tuple(z.shape)}")


def fsq_bound(z: torch.Tensor, levels: Levels) -> torch.Tensor:
    """Bound each dimension to its level range: ``z [..., d] -> tanh(z + shift) * half - offset [..., d]``
    (see the module docstring; docs/design.md §13).  Same dtype as ``z``."""
    lv = _levels_like(levels, z)
    _check_width(z, lv, "z")
    half = (lv - 1).to(z.dtype) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0).to(z.dtype)
    ratio = torch.where(lv == 2, torch.zeros_like(offset), offset / half)  # L = 2: atanh(1) is infinite
    return torch.tanh(z + torch.atanh(ratio)) * half - offset


def fsq_round(z: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer with a straight-through gradient: ``z + sg(round(z) - z)`` (value
    ``round(z)``, gradient the identity)."""
    return z + (torch.round(z) - z).detach()


def fsq_codes_to_indices(codes: torch.Tensor, levels: Levels) -> torch.Tensor:
    """Grid codes ``[..., d]`` (``q / (L // 2)``) -> indices ``[...]`` int64 in ``[0, prod L)``, mixed radix
    with dimension 0 least significant."""
    lv = _levels_like(levels, codes)
    _check_width(codes, lv, "codes")
    digits = torch.round(codes.double() * (lv // 2)).long() + lv // 2
    radix = torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), dim=0)
    return (digits * radix).sum(dim=-1)


def fsq_indices_to_codes(indices: torch.Tensor, levels: Levels) -> torch.Tensor:
    """Indices ``[...]`` int in ``[0, prod L)`` -> grid codes ``[..., d]`` float32 in ``[-1, 1]``; the inverse of
    :func:`fsq_codes_to_indices`."""
    lv = _levels_like(levels, indices)
    radix = torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), dim=0)
    digits = torch.div(indices.long().unsqueeze(-1), radix, rounding_mode="floor") % lv
    return ((digits - lv // 2).double() / (lv // 2)).float()


def fsq_grid(levels: Levels) -> torch.Tensor:
    """The implicit codebook: all ``K = prod L`` codes, row k the code of index k: ``[K, d]`` float32."""
    counts = [int(level) for level in levels]  # Python ints: also under a meta-device context
    return fsq_indices_to_codes(torch.arange(math.prod(counts)), counts)


def fsq_quantize(z: torch.Tensor, levels: Levels) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [..., d] -> (codes [..., d], indices [...] int64)``: ``codes = round(bound(z)) / (L // 2)`` with the
    straight-through gradient of ``bound(z) / (L // 2)`` (docs/design.md §13)."""
    lv = _levels_like(levels, z)
    codes = fsq_round(fsq_bound(z, lv)) / (lv // 2).to(z.dtype)
    return codes, fsq_codes_to_indices(codes.detach(), lv)


class FSQCodebook(Codebook):
    """The fixed FSQ grid as a :class:`Codebook`: ``weight`` ``[K, d]`` is a buffer holding :func:`fsq_grid`
    (so the state-dict key stays ``codebook.weight``), :meth:`nearest` bounds and rounds, :meth:`lookup` is
    the codebook's.  Nothing here is trained."""

    learned = False

    def __init__(self, levels: Sequence[int]):
        torch.nn.Module.__init__(self)  # not Codebook.__init__: no parameter to create
        self.levels = tuple(int(level) for level in levels)
        if not self.levels or min(self.levels) < 2:
            raise ValueError(f"FSQ levels must be one or more integers >= 2, got {list(self.levels)}")
        self.register_buffer("weight", fsq_grid(self.levels))
        self.register_buffer("level_tensor", torch.tensor(self.levels), persistent=False)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``z [N, d]`` -> ``(codes [N, d], indices [N])`` with the straight-through gradient
        (:func:`fsq_quantize`), computed in float32 for half-precision ``z``."""
        compute_dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
        codes, indices = fsq_quantize(z.to(compute_dtype), self.level_tensor)
        return codes.to(z.dtype), indices

    def straight_through(self, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """``z_q`` itself: its gradient already passes through the bounding (:func:`fsq_quantize`)."""
        return z_q

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the grid code of each row of ``z [N, d]`` -> ``[N]`` int64: the code of ``round(bound(z))``
        (the nearest grid point to ``bound(z)``, not to the raw ``z``)."""
        return self.quantize(z)[1]

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Refuse a saved ``weight`` that is not this grid (weights trained with other levels)."""
        loaded = state_dict.get(prefix + "weight")
        if loaded is not None and loaded.shape == self.weight.shape and loaded.device.type != "meta":
            grid = fsq_grid(self.levels)
            if not torch.allclose(loaded.detach().float().cpu(), grid, atol=1e-2, rtol=0.0):
                raise ValueError(
                    f"{prefix}weight is not the FSQ grid of fsq_levels={list(self.levels)}: the weights were saved "
                    "with other levels; fix fsq_levels in config.json to the levels the model was trained with"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
