"""Truncation's kept sets against a sort-and-scan reference in exact integer arithmetic (ties, boundaries,
flat, peaked and tie-heavy inputs), and against diffusers' sort-based ``truncate``."""

from __future__ import annotations

import math

import pytest
import torch

from vqdiffusion.diffusion import truncate_log_probs

QUANTUM = 2**30  # the documented unit of mass of truncate_log_probs


def quanta(log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented inputs of the rule: p = softmax in float32, q = floor(p * 2^30).  On a classes-contiguous
    tensor the softmax runs along that contiguous dim (torch's last-dim kernel, whose float32 rounding differs
    from the strided one by an ulp)."""
    if log_p.stride(1) == 1:
        p = torch.log_softmax(log_p.float().transpose(1, 2), dim=-1).transpose(1, 2).exp()
    else:
        p = torch.log_softmax(log_p.float(), dim=1).exp()
    return p, (p.double() * QUANTUM).floor().long()


def sorted_keep(log_p: torch.Tensor, rate: float) -> torch.Tensor:
    """Sort each position's classes by p (descending), scan them adding the integer quanta in Python and keep
    class j while the mass before it is below rate; then keep every class tied with the last kept one."""
    p, q = quanta(log_p)
    limit = math.ceil(rate * QUANTUM)  # M < rate  <=>  integer M < ceil(rate * 2^30)
    B, K, N = p.shape
    keep = torch.zeros((B, K, N), dtype=torch.bool)
    for b in range(B):
        for n in range(N):
            order = sorted(range(K), key=lambda c: -float(p[b, c, n]))
            mass, last = 0, None
            for c in order:
                if mass >= limit:
                    break
                last = float(p[b, c, n])
                mass += int(q[b, c, n])
            keep[b, :, n] = p[b, :, n] >= last
    return keep


def inputs(kind: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(shape, generator=gen)
    if kind == "flat":  # random weights: thousands of near-equal classes
        return torch.randn(shape, generator=gen) * 0.05
    if kind == "peaked":
        return torch.randn(shape, generator=gen) * 6.0
    if kind == "ties":  # few distinct values: large groups of exactly equal probabilities
        return torch.randint(0, 3, shape, generator=gen).float()
    if kind == "uniform":
        return torch.zeros(shape)
    if kind == "one-hot-ish":  # one class, the rest at log p = -70 or below float32's exp range
        x = torch.full(shape, -120.0)
        x[:, 0] = 0.0
        x[:, 1] = -70.0
        return x
    raise AssertionError(kind)


KINDS = ["random", "flat", "peaked", "ties", "uniform", "one-hot-ish"]
RATES = [1e-9, 0.05, 0.3, 0.5, 0.86, 0.99, 1 - 2**-30, 1 - 1e-12]


@pytest.mark.parametrize("method", ["histogram", "sort"])
@pytest.mark.parametrize("layout", ["contiguous", "classes_last"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rate", RATES)
def test_kept_sets_equal_the_sort_reference(kind: str, rate: float, layout: str, method: str) -> None:
    log_p = inputs(kind, (2, 37, 5), seed=len(kind) + int(rate * 1000))
    if layout == "classes_last":  # the denoiser's output: a transposed view of [B, N, K]
        log_p = log_p.transpose(1, 2).contiguous().transpose(1, 2)
    out = truncate_log_probs(log_p, rate, method=method)
    keep = sorted_keep(log_p, rate)
    assert torch.equal(torch.isfinite(out), keep)
    assert keep[:, :, :].any(1).all()  # the top class is always kept
    # renormalised over the kept classes (float64 from the documented p)
    p = quanta(log_p)[0].double() * keep
    torch.testing.assert_close(out.double().exp(), p / p.sum(1, keepdim=True), rtol=0, atol=1e-6)


def test_rate_exactly_at_a_cumulative_mass_boundary() -> None:
    """rate equal to the mass of the classes above c drops c (strict <); one quantum more keeps it."""
    gen = torch.Generator().manual_seed(3)
    log_p = torch.randn(1, 50, 1, generator=gen)
    p, q = quanta(log_p)
    order = torch.argsort(p[0, :, 0], descending=True)
    for j in (1, 2, 10, 49):
        above = int(q[0, order[:j], 0].sum())  # mass of the j most likely classes, exactly
        at = truncate_log_probs(log_p, above / QUANTUM)
        past = truncate_log_probs(log_p, (above + 1) / QUANTUM)
        assert int(torch.isfinite(at).sum()) == j and int(torch.isfinite(past).sum()) == j + 1
        assert torch.equal(torch.isfinite(at), sorted_keep(log_p, above / QUANTUM))


@pytest.mark.parametrize("method", ["histogram", "sort"])
def test_ties_are_kept_or_dropped_together(method: str) -> None:
    # p = (2, 1, 1, 1, 1, 0.5) / 6.5 up to rounding; the four tied classes straddle r = 0.4
    log_p = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 0.5]).log()[None, :, None]
    for rate, kept in [(0.3, 1), (0.31, 5), (0.4, 5), (0.93, 6)]:
        out = truncate_log_probs(log_p, rate, method=method)
        assert int(torch.isfinite(out).sum()) == kept, rate
        assert torch.equal(torch.isfinite(out), sorted_keep(log_p, rate))


def test_large_vocabulary_against_the_reference_and_diffusers() -> None:
    """K = 4096 (the ITHQ vocabulary), a few positions: every kept set equal to the reference's; diffusers'
    float32 cumsum agrees too away from mass boundaries (random inputs)."""
    log_p = torch.log_softmax(inputs("random", (1, 4096, 3), seed=9) * 0.5, dim=1)
    for rate in (0.2, 0.86):
        out = truncate_log_probs(log_p, rate)
        p, q = quanta(log_p)
        order = torch.argsort(p, dim=1, descending=True)
        mass_before = q.gather(1, order).cumsum(1) - q.gather(1, order)  # int64: exact
        limit = math.ceil(rate * QUANTUM)
        last = torch.where(mass_before < limit, p.gather(1, order), math.inf).amin(1, keepdim=True)
        assert torch.equal(torch.isfinite(out), p >= last)
        diffusers = pytest.importorskip("diffusers")
        theirs = diffusers.VQDiffusionPipeline.truncate(None, log_p, rate)  # does not use self
        assert torch.equal(torch.isfinite(theirs), torch.isfinite(out))


def test_unnormalised_and_half_precision_inputs() -> None:
    log_p = inputs("random", (2, 20, 4), seed=4)
    shifted = log_p + torch.randn(2, 1, 4) * 10  # softmax is shift-invariant per position
    torch.testing.assert_close(truncate_log_probs(shifted, 0.7), truncate_log_probs(log_p, 0.7))
    half = truncate_log_probs(log_p.bfloat16(), 0.7)
    assert half.dtype == torch.float32
    assert torch.equal(torch.isfinite(half), sorted_keep(log_p.bfloat16().float(), 0.7))


def test_the_two_methods_keep_the_same_classes_at_the_ithq_shape() -> None:
    """K = 4096, peaked and flat positions side by side: histogram and sort give the same output exactly."""
    log_p = torch.cat([inputs("flat", (1, 4096, 8), seed=1), inputs("peaked", (1, 4096, 8), seed=2)], dim=2)
    for rate in (0.5, 0.86):
        assert torch.equal(
            truncate_log_probs(log_p, rate, method="histogram"), truncate_log_probs(log_p, rate, method="sort")
        )
    with pytest.raises(ValueError, match="truncation method"):
        truncate_log_probs(log_p, 0.5, method="bisect")


@pytest.mark.parametrize("layout", ["contiguous", "classes_last"])
def test_cpu_chunks_of_the_batch_give_the_same_output(monkeypatch, layout: str) -> None:
    """On CPU a large batch is truncated a few images at a time; with chunks of 2 images (7 images: 2 + 2 + 2 +
    1) the output equals the reference's kept sets, keeps the input's layout and equals the one-chunk run."""
    from vqdiffusion.diffusion import adjustments

    log_p = torch.cat([inputs(kind, (1, 37, 5), seed=i) for i, kind in enumerate(KINDS + ["random"])])  # [7, 37, 5]
    if layout == "classes_last":
        log_p = log_p.transpose(1, 2).contiguous().transpose(1, 2)
    whole = truncate_log_probs(log_p, 0.86)
    monkeypatch.setattr(adjustments, "TRUNCATION_CHUNK_ELEMENTS", 2 * 37 * 5)
    chunked = truncate_log_probs(log_p, 0.86)
    assert torch.equal(chunked, whole) and chunked.stride() == log_p.stride()
    assert torch.equal(torch.isfinite(chunked), sorted_keep(log_p, 0.86))
