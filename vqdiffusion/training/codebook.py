"""The EMA codebook of tokenizer training (van den Oord et al. 2017, appendix; VQ-VAE-2): statistics that move
each code to the running mean of the encoder outputs assigned to it, with dead-code restarts."""

from __future__ import annotations

import torch

from ..models.vqvae import Codebook
from .codebook_init import distinct_rows, kmeans, l2_normalize

CODEBOOK_INITS = ("data", "random", "kmeans")
CODE_RESTARTS = ("uniform", "distance")


class EMACodebook:
    """Exponential-moving-average statistics that drive a :class:`Codebook`'s ``weight`` (updated in place).

    Per update with encoder outputs ``z [N, D]`` assigned to codes ``tokens [N]``:

        n_k = #{i: tokens_i = k},  s_k = sum_{i: tokens_i = k} z_i
        N_k <- decay * N_k + (1 - decay) * n_k          (cluster_size)
        S_k <- decay * S_k + (1 - decay) * s_k          (embed_sum)
        e_k = S_k / N~_k,  N~_k = (N_k + eps) / (sum_j N_j + K * eps) * sum_j N_j   (Laplace smoothing)

    Smoothing keeps ``N~_k > 0`` for codes that stopped being used while preserving the total count.  The
    statistics start at ``N_k = 1, S_k = e_k`` so the first updates do not blow up unused codes.  A code
    whose last assignment is ``dead_code_threshold`` or more steps old is re-initialised to a random row of
    ``z`` (``N_k = 1, S_k = e_k = z_i``).  The random rows are drawn every update (whether or not a code is
    dead), so updates have no host synchronisation and a fixed generator gives a fixed sequence.

    With ``restart="distance"`` the rows are drawn instead, only when some code is dead, with probability
    proportional to their squared distance from the nearest live code (:func:`distinct_rows`).

    With ``l2`` (cosine lookup) the inputs ``z`` are expected to be unit vectors and every code is kept at
    unit norm, ``e_k = S_k / ||S_k||`` (the spherical mean; the smoothing cancels).

    The codebook's ``weight`` is set to ``requires_grad=False``: exclude it from the optimizer.
    """

    def __init__(
        self,
        codebook: Codebook,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: int = 0,
        *,
        l2: bool = False,
        restart: str = "uniform",
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMACodebook decay must be in (0, 1), got {decay}")
        if eps <= 0 or dead_code_threshold < 0:
            raise ValueError(f"need eps > 0 and dead_code_threshold >= 0, got {eps}, {dead_code_threshold}")
        if restart not in CODE_RESTARTS:
            raise ValueError(f"EMACodebook restart must be one of {list(CODE_RESTARTS)}, got {restart!r}")
        self.codebook = codebook
        self.decay, self.eps, self.dead_code_threshold = float(decay), float(eps), int(dead_code_threshold)
        self.l2, self.restart = bool(l2), restart
        codebook.weight.requires_grad_(False)
        if self.l2:
            with torch.no_grad():
                codebook.weight.copy_(l2_normalize(codebook.weight))
        weight = codebook.weight.detach()
        self.cluster_size = torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device)
        self.embed_sum = weight.float().clone()
        self.last_used = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)

    @property
    def num_embeddings(self) -> int:
        return self.cluster_size.shape[0]

    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Set every code to a random row of ``z [N, D]`` (with replacement) and reset the statistics."""
        index = torch.randint(z.shape[0], (self.num_embeddings,), generator=generator, device="cpu")
        codes = z.detach().float()[index.to(z.device)]
        self.embed_sum.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.last_used.zero_()
        self.codebook.weight.copy_(codes)

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, generator: torch.Generator | None = None, iters: int = 10) -> None:
        """Set the codes to the k-means centres of ``z [N, D]`` (spherical with ``l2``; see
        :func:`~vqdiffusion.training.codebook_init.kmeans`) and reset the statistics."""
        codes = kmeans(z.detach().float(), self.num_embeddings, iters=iters, generator=generator, spherical=self.l2)
        self.embed_sum.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.last_used.zero_()
        self.codebook.weight.copy_(codes)

    @torch.no_grad()
    def update(
        self, z: torch.Tensor, tokens: torch.Tensor, step: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One EMA step with ``z [N, D]`` and their codes ``tokens [N]`` at training step ``step``.

        Returns the ``[K]`` bool mask of codes restarted by this update.
        """
        if z.ndim != 2 or tokens.shape != z.shape[:1]:
            raise ValueError(f"expected z [N, D] and tokens [N], got {tuple(z.shape)} and {tuple(tokens.shape)}")
        k = self.num_embeddings
        z = z.detach().float()
        counts = torch.bincount(tokens, minlength=k).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, tokens, z)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + k * self.eps) * total
        weight = self.embed_sum / smoothed.unsqueeze(1)
        if self.l2:
            weight = l2_normalize(weight)
        self.last_used = torch.where(counts > 0, torch.full_like(self.last_used, step), self.last_used)
        dead = torch.zeros(k, dtype=torch.bool, device=z.device)
        if self.dead_code_threshold > 0 and self.restart == "distance":
            dead = (step - self.last_used) >= self.dead_code_threshold
            if bool(dead.any()):
                dead = self._restart_distinct(z, weight, dead, step, generator)
        elif self.dead_code_threshold > 0:
            dead = (step - self.last_used) >= self.dead_code_threshold
            index = torch.randint(z.shape[0], (k,), generator=generator, device="cpu").to(z.device)
            fresh = z[index]
            weight = torch.where(dead.unsqueeze(1), fresh, weight)
            self.embed_sum = torch.where(dead.unsqueeze(1), fresh, self.embed_sum)
            self.cluster_size = torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size)
            self.last_used = torch.where(dead, torch.full_like(self.last_used, step), self.last_used)
        self.codebook.weight.copy_(weight)
        return dead

    def _restart_distinct(
        self, z: torch.Tensor, weight: torch.Tensor, dead: torch.Tensor, step: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Restart the ``dead`` codes in place in ``weight`` from rows of ``z`` far from the live codes;
        returns the mask of codes actually restarted (a dead code with no distinct row left stays dead)."""
        dead_ids = dead.nonzero().squeeze(1)
        rows = distinct_rows(z, weight[~dead], dead_ids.numel(), generator).to(z.device)
        ok = rows >= 0
        dead_ids, fresh = dead_ids[ok], z[rows[ok]]
        weight[dead_ids] = fresh
        self.embed_sum[dead_ids] = fresh
        self.cluster_size[dead_ids] = 1.0
        self.last_used[dead_ids] = step
        restarted = torch.zeros_like(dead)
        restarted[dead_ids] = True
        return restarted

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"cluster_size": self.cluster_size, "embed_sum": self.embed_sum, "last_used": self.last_used}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, own in self.state_dict().items():
            if key not in state or state[key].shape != own.shape:
                raise ValueError(f"EMACodebook state: {key} missing or of the wrong shape")
            own.copy_(state[key])
