"""Exponential moving average of model parameters (the exported weights of a training run)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's floating-point parameters.

    ``shadow <- d_n * shadow + (1 - d_n) * param`` on the n-th :meth:`update` (n = 0, 1, ...), with
    ``d_n = min(decay, (1 + n) / (10 + n))`` when ``warmup`` (the usual EMA warm-up: early averages are not
    dominated by the random initial weights; with decay 0.998 and no warm-up, 30% of the average after 600
    updates is still the initialisation) and ``d_n = decay`` otherwise.  The shadow tensors live on the
    parameters' devices and dtypes; ``num_updates`` is n, which a resumed run must restore.
    :meth:`state_dict` maps parameter names to shadow tensors (a parameter-only model state dict);
    :meth:`copy_to` writes them into a model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.is_floating_point()}

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = {name: p for name, p in model.named_parameters() if name in self.shadow}
        if len(params) != len(self.shadow):
            missing = sorted(set(self.shadow) - set(params))
            raise ValueError(f"EMA: the model lacks parameters {missing[:3]} (of {len(missing)} missing)")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averages one step towards ``model``'s current parameters."""
        weight = 1.0 - self.current_decay()
        for name, param in self._params(model).items():
            self.shadow[name].lerp_(param.detach(), weight)
        self.num_updates += 1

    def current_decay(self) -> float:
        """d_n of the next update."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averages."""
        for name, param in self._params(model).items():
            param.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, tensor in state.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name}: shape {tuple(tensor.shape)} vs {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        return self
