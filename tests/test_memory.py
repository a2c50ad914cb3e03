"""The sampling memory estimate (:mod:`vqdiffusion.models.memory`) against the peak of the tensors that a real
forward pass keeps alive, measured by watching every operator's outputs (a ``TorchDispatchMode``): the
estimate must stay an upper bound, and not a wild one, as the networks change."""

from __future__ import annotations

import weakref

import pytest
import torch
from support.weights import tiny_label_components
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vqdiffusion.models.denoiser import Denoiser, DenoiserConfig
from vqdiffusion.models.memory import (
    FLOAT_BYTES,
    decoder_activation_elements,
    denoiser_activation_elements,
    sampling_memory_per_image,
)
from vqdiffusion.pipeline import VQDiffusionPipeline


class PeakMemory(TorchDispatchMode):
    """The largest number of bytes held at once by the storages that operators create inside the block (a
    storage counts from the op that makes it until the last tensor made with it is gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, pointer: int) -> None:
        self.live -= self.sizes.pop(pointer, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                pointer, size = storage.data_ptr(), storage.nbytes()
                if size and pointer not in self.sizes:
                    self.sizes[pointer] = size
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._free, pointer)
        return out


def _peak(run) -> int:
    with torch.inference_mode(), PeakMemory() as meter:
        run()
    return meter.peak


@pytest.mark.parametrize(
    "shape",
    [
        {"height": 4, "width": 4, "dim": 32, "num_heads": 2, "num_classes": 16, "cond_dim": None},
        {"height": 16, "width": 16, "dim": 64, "num_heads": 4, "num_classes": 64, "cond_dim": None},
        {"height": 8, "width": 8, "dim": 128, "num_heads": 8, "num_classes": 512, "cond_dim": None},
        {"height": 8, "width": 8, "dim": 64, "num_heads": 4, "num_classes": 32, "cond_dim": 32},
    ],
)
def test_denoiser_estimate_bounds_the_measured_peak(shape) -> None:
    config = DenoiserConfig(num_layers=2, num_timesteps=10, **shape)
    denoiser = Denoiser(config).eval()
    context = 7 if config.cond_dim else 1
    cond = torch.randn(1, context, config.cond_dim) if config.cond_dim else None
    x = torch.full((1, config.height * config.width), config.num_classes)
    measured = _peak(lambda: denoiser(x, 5, cond))
    estimate = FLOAT_BYTES * denoiser_activation_elements(config, context)
    assert measured <= estimate <= 10 * measured, (measured, estimate)


def test_decoder_and_whole_estimate_bound_the_measured_peak() -> None:
    pipe = VQDiffusionPipeline.from_components(tiny_label_components("class"))
    cfg = pipe.denoiser.config
    tokens = torch.zeros((1, cfg.height, cfg.width), dtype=torch.long)
    measured = _peak(lambda: pipe.decode(tokens))
    estimate = FLOAT_BYTES * decoder_activation_elements(pipe.vqvae.config, (cfg.height, cfg.width))
    assert measured <= estimate <= 10 * measured, (measured, estimate)
    # one whole call of one image (guided: two denoiser passes per step), against the working estimate
    run = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "pt", "progress": False}
    measured = _peak(lambda: pipe([1], generator=torch.Generator().manual_seed(0), **run))
    working, result = sampling_memory_per_image(pipe.denoiser.config, pipe.vqvae.config, 1, "pt", guidance=True)
    assert (working, result) == pipe.memory_per_image("pt", guidance=True)
    assert measured <= working + result <= 10 * measured, (measured, working, result)
