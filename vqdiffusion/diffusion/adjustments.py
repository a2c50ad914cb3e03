"""Adjustments of log p(x0 | x_t) before a draw: classifier-free guidance, temperature and truncation
(Improved VQ-Diffusion sec. 3.1; VQ-Diffusion sec. 4.3; docs/design.md §6)."""

from __future__ import annotations

import math

import torch


def log_softmax_classes(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over dim 1 (classes) of [B, C, N], in whichever layout ``x`` has.

    On the denoiser's classes-contiguous layout (a transposed [B, N, C] tensor) it runs along the contiguous
    dim, with no transposing copy; the result keeps that layout.
    """
    if x.ndim == 3 and x.stride(1) == 1 and x.shape[1] > 1:
        return torch.log_softmax(x.transpose(1, 2), dim=-1).transpose(1, 2)
    return torch.log_softmax(x, dim=1)


def guided_logits(log_p_uncond: torch.Tensor, log_p_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance before normalising: lu + s (lc - lu), [B, K, N] in the inputs' layout (its
    softmax over dim 1 is that of :func:`guided_log_probs`; aMUSEd's pipeline draws from it as is)."""
    return log_p_uncond + scale * (log_p_cond - log_p_uncond)


def guided_log_probs(log_p_uncond: torch.Tensor, log_p_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Improved VQ-Diffusion sec. 3.1): log_softmax(lu + s (lc - lu)) over dim 1."""
    return log_softmax_classes(guided_logits(log_p_uncond, log_p_cond, scale))


# Truncation measures probability mass in integer quanta of 2^-30, so that every sum is exact and the kept
# set does not depend on the order of summation (a sort-based rule and the bisection agree exactly).
MASS_QUANTUM_BITS = 30


def truncation_quanta(log_p_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p, p, q): log_softmax over dim 1 and p = exp(log p) in float32, q = floor(p * 2^30) as int32,
    all [B, K, N].

    q is the probability mass that :func:`truncate_log_probs` adds up: integer, so sums are exact in any
    order; each entry is within 2^-30 of p (a total within K * 2^-30), and the total stays below 2^31.
    """
    log_p = log_softmax_classes(log_p_x0.float())
    p = log_p.exp()
    return log_p, p, (p * float(2**MASS_QUANTUM_BITS)).to(torch.int32)


TRUNCATION_METHODS = ("histogram", "sort")


def truncate_log_probs(log_p_x0: torch.Tensor, rate: float, *, method: str | None = None) -> torch.Tensor:
    """Truncation (paper sec. 4.3): per position keep the most likely classes, renormalised.

    With p = softmax(log p) and M(c) = 2^-30 sum_{j: p_j > p_c} q_j the mass of the classes strictly more
    likely than c (q: :func:`truncation_quanta`), class c is kept iff M(c) < rate; the top class is always kept
    and classes tied in p are kept or dropped together.  This is the sort-based rule of the references
    (sorted descending, class j kept when the mass before it is below ``rate``), with ties resolved
    upwards.  ``rate >= 1`` returns the input unchanged.

    Below 1 the kept set is {c : p_c >= theta} for the smallest threshold theta with H(theta) =
    sum_{p_j > theta} q_j < R (R = ceil(rate 2^30)); H falls as theta grows.  theta is found as a float32
    bit pattern (for p >= 0 the patterns order like the values; p <= 1 needs 30 bits), 10 bits at a time:
    a histogram of q over the next 10 bits of the classes that share the bits found so far (plus one bucket
    for the classes above them) gives H at every candidate at once (:func:`_threshold_digit`).  Three rounds
    of a few passes over [B, K, N], whatever the distribution; no sort.  ``method="sort"`` finds the same
    theta by sorting (:func:`_threshold_by_sort`): a GPU sorts faster than it builds the histograms' scattered
    sums, a CPU the other way round, so the default (None) is ``"sort"`` on CUDA and ``"histogram"`` elsewhere.

    Args:
        log_p_x0: [B, K, N] log-probabilities (renormalised over dim 1 first).
        rate: truncation rate r in (0, 1].
        method: ``"histogram"``, ``"sort"`` or None (by device); the kept sets are identical.
    Returns:
        [B, K, N] float32 log-probabilities with dropped classes at -inf, renormalised over the kept ones.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"truncation rate must be in (0, 1], got {rate}")
    if method is None:
        method = "sort" if log_p_x0.device.type == "cuda" else "histogram"
    if method not in TRUNCATION_METHODS:
        raise ValueError(f"truncation method must be one of {list(TRUNCATION_METHODS)}, got {method!r}")
    if rate >= 1.0:
        return log_p_x0
    log_p, p, q = truncation_quanta(log_p_x0)
    limit = math.ceil(rate * 2**MASS_QUANTUM_BITS)
    if method == "sort":
        keep = p >= _threshold_by_sort(p, q, limit)
    else:
        bits = p.view(torch.int32)  # p in [0, 1]: patterns 0 .. 0x3F800000 < 2^30, ordered like the values
        prefix = torch.zeros((p.shape[0], 1, p.shape[2]), dtype=torch.int32, device=p.device)  # [B, 1, N]
        for shift in (20, 10, 0):
            prefix = (prefix << 10) + _threshold_digit(bits, q, prefix, shift, limit)
        keep = bits >= prefix  # prefix is now theta's full bit pattern
    kept_mass = torch.where(keep, p, torch.zeros((), device=p.device)).sum(dim=1, keepdim=True)
    return torch.where(keep, log_p - kept_mass.log(), torch.full((), -math.inf, device=p.device))


def _threshold_by_sort(p: torch.Tensor, q: torch.Tensor, limit: int) -> torch.Tensor:
    """theta of :func:`truncate_log_probs` by sorting, [B, 1, N] float32.

    Sorted descending, S_i = sum_{k < i} q_(k) (exact in int64) is non-decreasing and S_0 = 0 < R; with i* the
    last i where S_i < R, theta = p_(i*).  Classes tied with p_(i*) have the mass strictly above them at most
    S_(i*) < R and are kept; a class below theta has a first tied position j > i* with S_j >= R.
    """
    p_sorted, order = p.sort(dim=1, descending=True)
    q_sorted = q.gather(1, order).to(torch.int64)
    before = q_sorted.cumsum(1) - q_sorted
    last = (before < limit).sum(1, keepdim=True) - 1  # [B, 1, N], >= 0
    return p_sorted.gather(1, last)


def _threshold_digit(bits: torch.Tensor, q: torch.Tensor, prefix: torch.Tensor, shift: int, limit: int) -> torch.Tensor:
    """The next 10-bit digit d of the threshold of :func:`truncate_log_probs`, [B, 1, N] int32.

    Known: theta >> (shift + 10) == ``prefix``.  Bucket every class by v = (bits >> shift) - (prefix << 10)
    clamped to [-1, 1024] (-1: below the prefix, 1024: above it) and add up q per bucket; the mass above
    bucket d is H(top of candidate d), non-increasing in d, so d = the number of d' in 0..1023 with
    mass above d' >= R (H below the prefix is >= R by the previous digit).
    """
    B, K, N = bits.shape
    width = 1026  # buckets v + 1 = 0 .. 1025 per position
    # One flat histogram [B, N, width]: position (b, n) owns entries (b N + n) width + 0 .. width - 1.
    index_dtype = torch.int32 if B * N * width < 2**31 else torch.int64  # int32 indices: cheaper to build
    start = torch.arange(B * N, device=bits.device, dtype=index_dtype).view(B, 1, N) * width
    low = (prefix << 10).to(index_dtype) - 1  # v = -1
    index = ((bits >> shift).to(index_dtype) + (start - low)).clamp_(start, start + (width - 1))
    # index and q flattened in the same order (memory order for the denoiser's classes-contiguous layout)
    flat = (lambda x: x.transpose(1, 2).reshape(-1)) if q.stride(1) == 1 else (lambda x: x.reshape(-1))
    hist = torch.zeros(B * N * width, dtype=torch.int32, device=bits.device).index_add_(0, flat(index), flat(q))
    upto = hist.view(B, N, width).cumsum(2, dtype=torch.int32)  # exact: the total is below 2^31
    # mass above bucket v + 1 = total - upto[v + 1] >= R  <=>  upto[v + 1] <= total - R
    below = (upto[:, :, 1 : width - 1] <= upto[:, :, width - 1 :] - limit).sum(2, dtype=torch.int32)
    return below.view(B, 1, N)


def temper_log_probs(log_p_x0: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature on p(x0 | x_t): log_softmax(log p / tau) over dim 1; ``tau == 1`` returns the input."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if temperature == 1.0:
        return log_p_x0
    return log_softmax_classes(log_p_x0 / temperature)
