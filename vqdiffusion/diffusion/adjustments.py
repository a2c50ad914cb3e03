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
    softmax over dim 1 is that of :func:`guided_log_probs`; aMUSEd's pipeline draws from it as is).  Being
    linear, it also combines the input of an affine head (the denoiser's z, [B, N, D]; docs/design.md §6.3)."""
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

# Elements of log p per truncation chunk on CPU (16 MB in float32: one ITHQ image, [4096, 1024]).
TRUNCATION_CHUNK_ELEMENTS = 2**22


def truncate_log_probs(log_p_x0: torch.Tensor, rate: float, *, method: str | None = None) -> torch.Tensor:
    """Truncation (paper sec. 4.3): per position keep the most likely classes, renormalised.

    With p = softmax(log p) and M(c) = 2^-30 sum_{j: p_j > p_c} q_j the mass of the classes strictly more
    likely than c (q: :func:`truncation_quanta`), class c is kept iff M(c) < rate; the top class is always kept
    and classes tied in p are kept or dropped together.  This is the sort-based rule of the references
    (sorted descending, class j kept when the mass before it is below ``rate``), with ties resolved
    upwards.  ``rate >= 1`` returns the input unchanged.

    Below 1 the kept set is {c : p_c >= theta} for the smallest threshold theta with H(theta) =
    sum_{p_j > theta} q_j < R (R = ceil(rate 2^30)); H falls as theta grows.  theta is found as a float32
    bit pattern (for p >= 0 the patterns order like the values; p <= 1 needs 30 bits), 10 bits at a time
    (:func:`_threshold_by_histogram`): a histogram of q over the next 10 bits gives H at every candidate at
    once, and each round after the first reads only the classes that share the bits found so far.  No sort.
    ``method="sort"`` finds the same theta by sorting (:func:`_threshold_by_sort`): a GPU sorts faster than it
    builds the histograms' scattered sums, a CPU the other way round, so the default (None) is ``"sort"`` on
    CUDA and ``"histogram"`` elsewhere.

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
    limit = math.ceil(rate * 2**MASS_QUANTUM_BITS)
    batch, classes, length = log_p_x0.shape
    rows = max(1, TRUNCATION_CHUNK_ELEMENTS // (classes * length))
    if log_p_x0.device.type != "cpu" or batch <= rows:
        return _truncate(log_p_x0, limit, method)
    # CPU: a few images at a time, so that the temporaries are reused allocations of at most
    # TRUNCATION_CHUNK_ELEMENTS instead of fresh ones whose page faults cost as much as the passes over them.
    out = torch.empty_like(log_p_x0, dtype=torch.float32)  # the input's layout (the denoiser's: classes inner)
    for i in range(0, batch, rows):
        out[i : i + rows] = _truncate(log_p_x0[i : i + rows], limit, method)
    return out


def _truncate(log_p_x0: torch.Tensor, limit: int, method: str) -> torch.Tensor:
    """:func:`truncate_log_probs` below rate 1 on one chunk of the batch; ``limit`` = R = ceil(rate 2^30)."""
    log_p, p, q = truncation_quanta(log_p_x0)
    bits = p.view(torch.int32)  # p in [0, 1]: patterns 0 .. 0x3F800000 < 2^30, ordered like the values
    if method == "sort":
        theta = _threshold_by_sort(p, q, limit).view(torch.int32)
    else:
        theta = _threshold_by_histogram(bits, q, limit)
    # Vectorised arithmetic instead of torch.where, whose CPU kernel branches per element.
    keep = (bits >= theta).to(p.dtype)  # [B, K, N], 1 kept / 0 dropped
    kept_mass = (p * keep).sum(dim=1, keepdim=True)  # [B, 1, N]
    bound = keep.sub_(0.5).mul_(math.inf)  # +inf kept / -inf dropped
    return torch.minimum(log_p - kept_mass.log(), bound)


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


DIGIT_BITS = 10  # bits of theta found per histogram round: 3 rounds cover the 30 bits of p <= 1


def _threshold_by_histogram(bits: torch.Tensor, q: torch.Tensor, limit: int) -> torch.Tensor:
    """theta of :func:`truncate_log_probs` as a float32 bit pattern, [B, 1, N] int32, in three rounds.

    Round r knows theta's bits above ``shift`` + 10 (the prefix P) and the mass A of the classes above P (A < R).
    Among the candidates (classes whose bits above shift + 10 equal P) it adds up q per 10-bit digit v; the
    mass above digit d is A + sum_{v > d} hist[v], non-increasing in d, and the digit is the first d where it
    is below R (the count of d with mass >= R; d = 1023 always qualifies, as that mass is A).  The next round's
    candidates are those with v = d, and A grows by the mass above d.  The first round reads all B K N classes
    (in whatever layout they come); the later ones only the candidates, gathered once.
    """
    B, K, N = bits.shape
    rows = B * N  # one histogram per position (b, n), row b N + n
    index_dtype = torch.int32 if rows * 2**DIGIT_BITS < 2**31 else torch.int64  # int32 indices: cheaper
    base = torch.arange(rows, device=bits.device, dtype=index_dtype) << DIGIT_BITS  # [rows], each row's start
    # Work in memory order: [B, N, K] for the denoiser's classes-contiguous layout (a view), else [B, K, N].
    classes_inner = bits.stride(1) == 1
    shape = (B, N, 1) if classes_inner else (B, 1, N)  # one value per position, broadcast over the classes
    bits_v, q_v = (bits.transpose(1, 2), q.transpose(1, 2)) if classes_inner else (bits.contiguous(), q.contiguous())
    index = (bits_v >> 2 * DIGIT_BITS).to(index_dtype).add_(base.view(shape))  # row start + the top digit
    d, above = _next_digit(index.view(-1), q_v.reshape(-1), None, rows, limit)  # (p <= 1: digit <= 1016)
    theta = d
    position = (index == (base + d).view(shape)).view(-1).nonzero().squeeze(1)  # the candidates, flat [M]
    row = position // K if classes_inner else position // (K * N) * N + position % N  # b N + n
    cand_bits, cand_q = bits_v.reshape(-1).index_select(0, position), q_v.reshape(-1).index_select(0, position)
    for shift in (DIGIT_BITS, 0):
        digit = ((cand_bits >> shift) & (2**DIGIT_BITS - 1)).to(index_dtype)
        d, above = _next_digit(digit + base[row], cand_q, above, rows, limit)
        theta = (theta << DIGIT_BITS) | d
        if shift:
            same = digit == d[row]
            row, cand_bits, cand_q = row[same], cand_bits[same], cand_q[same]
    return theta.to(torch.int32).view(B, 1, N)


def _next_digit(
    index: torch.Tensor, q: torch.Tensor, above: torch.Tensor | None, rows: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of :func:`_threshold_by_histogram`: (digit d, mass above P's digit d), each [rows].

    ``index`` [M] is row * 1024 + v for each candidate, ``q`` [M] its mass, ``above`` [rows] the mass above
    the prefix (None: 0).  Sums are exact in int32 (the total is below 2^31).
    """
    width = 2**DIGIT_BITS
    hist = torch.zeros(rows * width, dtype=torch.int32, device=q.device).index_add_(0, index, q).view(rows, width)
    upto = hist.cumsum(1, dtype=torch.int32)  # [rows, width]
    total = upto[:, -1:]
    if above is not None:
        total = total + above.unsqueeze(1)  # mass above digit v = total - upto[v]
    digit = (upto <= total - limit).sum(1, dtype=torch.int32)  # the first v whose mass above is below R
    mass_above = (total - upto.gather(1, digit.long().unsqueeze(1))).squeeze(1)
    return digit.to(index.dtype), mass_above


def temper_log_probs(log_p_x0: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature on p(x0 | x_t): log_softmax(log p / tau) over dim 1; ``tau == 1`` returns the input."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if temperature == 1.0:
        return log_p_x0
    return log_softmax_classes(log_p_x0 / temperature)
