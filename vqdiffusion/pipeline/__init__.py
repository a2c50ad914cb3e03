"""The pipeline (docs/design.md §7): :class:`VQDiffusionPipeline` loads a model folder and generates
(:mod:`.core`) and edits (:mod:`.editing`) images.  Reads our own layout (JSON configs + safetensors,
:mod:`vqdiffusion.formats.ours`) and diffusers' VQ-Diffusion layout (:mod:`vqdiffusion.formats.diffusers`),
writes ours; aMUSEd folders load as :class:`AmusedPipeline` (:mod:`.amused`, a time-agnostic masked model).
The names that lived here before the split are re-exported.
"""

from __future__ import annotations

from ..formats.paths import BUILTIN_MODELS, BUILTIN_PREFIX, DEFAULT_MODEL, resolve_model_path
from ..image_outputs import MAX_GRID_PIXELS, OutputType, check_grid_size, grid_shape, make_grid, to_output_type
from .amused import AmusedPipeline
from .core import PipelineDefaults, VQDiffusionPipeline
from .output import PipelineOutput

__all__ = [
    "AmusedPipeline",
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "DEFAULT_MODEL",
    "MAX_GRID_PIXELS",
    "OutputType",
    "PipelineDefaults",
    "PipelineOutput",
    "VQDiffusionPipeline",
    "check_grid_size",
    "grid_shape",
    "make_grid",
    "resolve_model_path",
    "to_output_type",
]
