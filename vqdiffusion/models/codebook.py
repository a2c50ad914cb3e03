"""The tokenizer's codebook: K code vectors with nearest-neighbour search and lookup (docs/design.md §1.1).

:class:`Codebook` is the learned VQ codebook; :class:`~vqdiffusion.models.fsq.FSQCodebook` (docs/design.md §13)
is the fixed grid of finite scalar quantization.  Both keep their vectors in ``weight`` ``[K, D]``, so the
state-dict key is ``codebook.weight`` whichever quantizer a VQ-VAE uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Codebook"]

# Number of distance-matrix entries (rows x K) computed at once when looking up nearest codes; bounds the
# temporary memory of `Codebook.nearest` to about 64 MiB in float32 whatever the batch size.
_DISTANCE_CHUNK_ELEMENTS = 1 << 24


class Codebook(nn.Module):
    """K code vectors of width D (``weight``: ``[K, D]``) with nearest-neighbour search and lookup.

    The vectors are a plain parameter here (trained by the codebook loss); an EMA-updated codebook can
    subclass this and keep ``weight`` as a buffer, so the state-dict key stays ``codebook.weight``.
    """

    #: Whether the codes are learned, so that training adds the codebook and commitment terms.
    learned: bool = True

    def __init__(self, num_embeddings: int, embed_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embed_dim))
        nn.init.uniform_(self.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the closest code for each row of ``z`` ``[N, D]`` -> ``[N]`` int64.

        ``||z - e_k||^2 = ||z||^2 - 2 z.e_k + ||e_k||^2``; the first term is the same for every k, so the
        argmin is taken over ``||e_k||^2 - 2 z.e_k``, one ``[rows, K]`` matmul per chunk of rows (never a
        ``[N, K, D]`` broadcast).  Half-precision inputs are compared in float32; ties go to the lowest k.
        """
        compute_dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
        codes = self.weight.detach().to(compute_dtype)
        code_sq = codes.square().sum(dim=1)  # [K]
        rows = max(1, _DISTANCE_CHUNK_ELEMENTS // codes.shape[0])
        out = []
        for chunk in z.to(compute_dtype).split(rows):
            # code_sq - 2 * chunk @ codes.T, fused
            scores = torch.addmm(code_sq.unsqueeze(0), chunk, codes.t(), beta=1.0, alpha=-2.0)
            out.append(scores.argmin(dim=1))
        if not out:
            return torch.empty(0, dtype=torch.long, device=z.device)
        return torch.cat(out)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code vectors for integer ``tokens`` of any shape ``[...]`` -> ``[..., D]``."""
        return F.embedding(tokens, self.weight)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``z [N, D]`` -> ``(z_q [N, D], tokens [N] int64)``: the nearest codes themselves (no gradient
        to ``z``; see :meth:`straight_through`)."""
        tokens = self.nearest(z)
        # tokens come from argmin, so they are valid: no range check (a host sync)
        return self.lookup(tokens), tokens

    def straight_through(self, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """The decoder's input in training, with the value of ``z_q``: ``z + sg(z_q - z)``, so the reconstruction
        gradient reaches the encoder unchanged."""
        return z + (z_q - z).detach()
