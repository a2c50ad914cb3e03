"""Random draws with an explicit generator, or one generator per batch row (docs/design.md §6.2)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def check_generators(generator: object, count: int) -> None:
    """ValueError unless ``generator`` is None, one ``torch.Generator``, or a list (or tuple) of exactly
    ``count`` of them, one per image; a list holding None would draw that image from the global RNG, so two
    identical calls would differ."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list | tuple):
        raise ValueError(
            "generator must be a torch.Generator, a list of them (one per image) or None, got "
            f"{type(generator).__name__}"
        )
    bad = [i for i, g in enumerate(generator) if not isinstance(g, torch.Generator)]
    if bad:
        got = generator[bad[0]]
        raise ValueError(
            f"generator[{bad[0]}] is {got!r}, not a torch.Generator: a list needs one generator per image "
            "(torch.Generator().manual_seed(seed) each), or pass one generator or None for the whole call"
        )
    if len(generator) != count:
        raise ValueError(
            f"got {len(generator)} generators for {count} image(s): pass one per image ({count}), or one "
            "torch.Generator for the whole call"
        )


def rand_uniform(
    shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Uniform [0, 1) noise on ``device``, float64 unless asked; a list of generators gives row b of the batch
    from generator b.  Each generator draws on its own device (a CPU generator drives a CUDA pipeline).

    The draws are float64 because float32 uniforms have a resolution of 2^-24: a Gumbel -log(-log U) built
    on them never exceeds about 16.6 and is coarse near its top, and an inverse-CDF draw cannot resolve a
    class of probability below about 1e-7 (Zheng et al. 2024, "Masked diffusion models are secretly
    time-agnostic masked models and exploit inaccurate categorical sampling").
    """
    if generator is None or isinstance(generator, torch.Generator):
        return _rand_on(tuple(shape), generator, device, dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
    return torch.cat([_rand_on((1, *shape[1:]), g, device, dtype) for g in generator])


def _rand_on(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype):
    """Uniforms drawn on the generator's own device, then moved to ``device``: a CPU generator gives the same
    numbers whatever device the pipeline runs on (as in diffusers), and torch refuses a generator of another
    device."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where, dtype=dtype).to(device)


def sample_categorical(log_probs: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Sample one class per position from ``log_probs`` [B, C, N] (dim 1 = classes) -> [B, N] long.

    Inverse CDF with one float64 uniform per position: with p_c = exp(log p_c - max) (unnormalised inputs are
    fine), F_c = sum_{j <= c} p_j accumulated in float64 and v = (1 - U) F_C in (0, F_C], the draw is the first
    class whose cumulative mass reaches v.  Classes of zero mass (log p = -inf) are never drawn.  The float64
    uniform and sums resolve probabilities far below float32's 2^-24 (see :func:`rand_uniform`); one uniform per
    position instead of one per class (Gumbel-max) keeps it cheap.

    The search runs in two levels of about sqrt(C) classes (docs/design.md §6.2): float64 block masses and
    their cumulative sum pick the block holding v, and only that block's classes are accumulated, so no
    [B, C, N] float64 tensor is built.  Any memory layout of ``log_probs`` works (e.g. the denoiser's
    transposed view).
    """
    B, C, N = log_probs.shape
    p = (log_probs - log_probs.amax(dim=1, keepdim=True)).exp_()  # [B, C, N] in (0, 1], input layout
    width = math.isqrt(C - 1) + 1 if C > 1 else 1  # classes per block: ceil(sqrt(C)) or just above
    full = C // width
    masses = [_block_masses(p[:, : full * width].unflatten(1, (full, width)))] if full else []
    if full * width < C:  # a shorter last block
        masses.append(p[:, full * width :].sum(1, keepdim=True, dtype=torch.float64))
    cum_block = torch.cat(masses, dim=1).cumsum_(1) if len(masses) > 1 else masses[0].cumsum(1)  # [B, nb, N]
    num_blocks = cum_block.shape[1]
    v = (1.0 - rand_uniform((B, N), generator, log_probs.device)) * cum_block[:, -1]  # [B, N] in (0, F_C]
    block = (cum_block < v[:, None]).sum(1).clamp_(max=num_blocks - 1)  # first block whose mass reaches v
    before = cum_block.gather(1, (block - 1).clamp_(min=0)[:, None]).squeeze(1).masked_fill_(block == 0, 0.0)
    index = block[:, None] * width + torch.arange(width, device=p.device)[:, None]  # [B, width, N]
    inside = index < C  # the last block may be shorter
    values = p.gather(1, index.clamp_(max=C - 1)).double().masked_fill_(~inside, 0.0)
    cum_inner = values.cumsum_(1)  # [B, width, N] float64, the block's own cumulative mass
    # v - before > 0 exactly (v > before); the min keeps a rounding difference between the two summation
    # orders from stepping past the block's last class of positive mass.
    rest = torch.minimum(v - before, cum_inner[:, -1])
    offset = (cum_inner < rest[:, None]).sum(1)
    return (block * width + offset).clamp_(max=C - 1)


def _block_masses(p_blocks: torch.Tensor) -> torch.Tensor:
    """sum over dim 2 of [B, nb, width, N] in float64 -> [B, nb, N], a few positions at a time so that the
    float64 copy stays small (about 8 MB) instead of one [B, C, N] float64 tensor."""
    B, nb, width, N = p_blocks.shape
    step = max(1, 2**20 // max(1, B * nb * width))
    if step >= N:
        return p_blocks.sum(2, dtype=torch.float64)
    return torch.cat([part.sum(2, dtype=torch.float64) for part in p_blocks.split(step, dim=3)], dim=2)
