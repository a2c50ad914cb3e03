"""Batch order: the batch of step ``s`` is a pure function of ``(seed, s)``, so resuming needs no loader state."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["StepBatchSampler"]


class StepBatchSampler(Sampler[list[int]]):
    """Index batches for training steps ``start_step .. end_step - 1``, a pure function of the seed and step.

    The item stream is the concatenation of per-epoch permutations (epoch ``e`` uses
    ``numpy.random.default_rng([seed, e])``); step ``s`` takes stream positions ``s*B .. s*B + B - 1``, so
    a batch may straddle two epochs and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, end_step: int):
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need num_items >= 1 and batch_size >= 1, got {num_items}, {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return self._cache[epoch]

    def batch(self, step: int) -> list[int]:
        """Dataset indices of the batch of ``step``."""
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.num_items)
            out.append(int(self.permutation(epoch)[offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)
