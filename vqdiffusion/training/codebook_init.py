"""Codebook math that keeps a VQ codebook lean and its codes distinct (pure functions over tensors).

* :func:`kmeans_plus_plus` and :func:`kmeans`: initialise the K codes from encoder outputs by k-means
  (k-means++ seeding, Arthur & Vassilvitskii 2007, then a few Lloyd iterations), so codes start where the
  data are and a dense region (e.g. a black background) gets few codes instead of hundreds.
* :func:`l2_normalize`: the cosine lookup of ViT-VQGAN ("improved VQGAN", Yu et al. 2021): latent and codes
  are l2-normalised and matched by cosine similarity.  If every code has unit norm, the Euclidean nearest code
  of a raw latent ``z`` is its cosine nearest (``||z - e||^2 = ||z||^2 - 2 z.e + 1``, and ``||z||^2`` is
  the same for every code), so a model trained this way needs no change at inference.
* :func:`distinct_rows`: choose restart points for dead codes with probability proportional to the squared
  distance from the nearest live code (and from the points already chosen), k-means++ style, so a restart
  never duplicates a live code.

Shapes: points ``x [N, D]``, codes / centres ``c [K, D]``.  Random draws take an explicit CPU
``torch.Generator`` so that a fixed generator state gives a fixed result on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "distinct_rows",
    "distortion",
    "kmeans",
    "kmeans_plus_plus",
    "l2_normalize",
    "lloyd_step",
    "squared_distances",
]

# Rows x centres of the distance matrix computed at once (about 64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24


def _check_points(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a floating point [N, D] tensor, got {shape}")


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` along ``dim`` (any shape; a zero vector stays zero)."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``d[i, k] = ||x_i - c_k||^2 = ||x_i||^2 - 2 x_i.c_k + ||c_k||^2`` (clamped at 0).

    ``x [N, D], c [K, D] -> [N, K]``.
    """
    _check_points(x)
    _check_points(c, "c")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"x [N, {x.shape[1]}] and c [K, {c.shape[1]}] must have the same width D")
    sq = torch.addmm(c.square().sum(1).unsqueeze(0), x, c.t(), beta=1.0, alpha=-2.0)
    return sq.add_(x.square().sum(1, keepdim=True)).clamp_min_(0.0)


def _nearest(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min_k ||x_i - c_k||^2 [N], argmin_k [N])``, in chunks of rows; ties go to the lowest k."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, c.shape[0]))
    dists, index = [], []
    for chunk in x.split(rows):
        d, i = squared_distances(chunk, c).min(dim=1)
        dists.append(d)
        index.append(i)
    if not dists:
        return x.new_zeros(0), torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat(dists), torch.cat(index)


def distortion(x: torch.Tensor, c: torch.Tensor) -> float:
    """k-means objective: ``mean_i min_k ||x_i - c_k||^2`` (a float)."""
    return float(_nearest(x, c)[0].double().mean())


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to ``weights [N]`` (>= 0, positive sum), on the CPU."""
    return int(torch.multinomial(weights.double().cpu(), 1, generator=generator))


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding: ``k`` rows of ``x [N, D]`` -> ``[k, D]``.

    The first centre is a uniform row; each next one is row i with probability
    ``D(x_i)^2 / sum_j D(x_j)^2``, ``D`` the distance to the nearest centre chosen so far.  When every row
    already coincides with a centre (fewer than ``k`` distinct rows) the remaining centres are uniform rows.
    """
    _check_points(x)
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n == 0:
        raise ValueError("k-means++ needs at least one point, got x of shape [0, D]")
    x = x.float()
    chosen = [_draw(torch.ones(n), generator)]
    closest = squared_distances(x, x[chosen[0]].unsqueeze(0)).squeeze(1)  # [N]
    for _ in range(k - 1):
        weights = closest if float(closest.sum()) > 0 else torch.ones_like(closest)
        i = _draw(weights, generator)
        chosen.append(i)
        closest = torch.minimum(closest, squared_distances(x, x[i].unsqueeze(0)).squeeze(1))
    return x[torch.tensor(chosen, device=x.device)].clone()


def lloyd_step(x: torch.Tensor, c: torch.Tensor, *, spherical: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lloyd iteration: assign each row of ``x [N, D]`` to its nearest centre of ``c [K, D]``, then move
    every centre to the mean of its rows (an empty centre stays put).  With ``spherical`` the means are
    l2-normalised (spherical k-means on unit vectors).  Returns ``(new centres [K, D], assignments [N])``."""
    _, assign = _nearest(x, c)
    counts = torch.bincount(assign, minlength=c.shape[0]).to(x.dtype)  # [K]
    sums = torch.zeros_like(c, dtype=x.dtype).index_add_(0, assign, x)
    means = sums / counts.clamp_min(1.0).unsqueeze(1)
    if spherical:
        means = l2_normalize(means)
    return torch.where((counts > 0).unsqueeze(1), means, c.to(x.dtype)), assign


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 10,
    generator: torch.Generator | None = None,
    spherical: bool = False,
) -> torch.Tensor:
    """k-means of ``x [N, D]``: k-means++ seeding, then ``iters`` Lloyd iterations -> centres ``[k, D]``.

    Minimises ``mean_i min_k ||x_i - c_k||^2`` locally; deterministic given ``generator``.  With
    ``spherical`` the rows and centres are unit vectors (cosine k-means).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    x = x.float()
    if spherical:
        x = l2_normalize(x)
    c = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        c, _ = lloyd_step(x, c, spherical=spherical)
    return c


def distinct_rows(
    z: torch.Tensor, live: torch.Tensor, count: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Restart points for ``count`` dead codes: rows of ``z [N, D]`` far from the ``live [L, D]`` codes.

    Greedy k-means++: row i is drawn with probability ``D(z_i)^2 / sum_j D(z_j)^2``, ``D`` the distance to
    the nearest live code or already chosen row, ``count`` times.  A row equal to a live code has
    probability 0, so restarts never duplicate a live code nor each other.  Returns ``[count]`` int64 row
    indices, ``-1`` where no row was left at positive distance (leave that code as it is).
    """
    _check_points(z, "z")
    if live.ndim != 2 or live.shape[1] != z.shape[1]:
        raise ValueError(f"live must be [L, {z.shape[1]}] codes, got {tuple(live.shape)}")
    out = torch.full((count,), -1, dtype=torch.long)
    if count == 0 or z.shape[0] == 0:
        return out
    z = z.float()
    if live.shape[0]:
        closest = _nearest(z, live.float())[0]
    else:
        closest = torch.full((z.shape[0],), float("inf"), device=z.device)
    for j in range(count):
        finite = torch.where(torch.isinf(closest), torch.ones_like(closest), closest)
        if float(finite.sum()) <= 0:
            break
        i = _draw(finite, generator)
        out[j] = i
        closest = torch.minimum(closest, squared_distances(z, z[i].unsqueeze(0)).squeeze(1))
    return out
