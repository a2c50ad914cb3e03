"""Tiny random-weight diffusers VQ-Diffusion pipelines, saved in the diffusers layout, for tests."""

from __future__ import annotations

from pathlib import Path

from vqdiffusion.testing import RandomPipelineSpec, random_diffusers_pipeline

TinySpec = RandomPipelineSpec


def save_diffusers_pipeline(path: Path, spec: RandomPipelineSpec | None = None):
    """Build a random diffusers pipeline, save it to ``path`` (diffusers layout) and return it."""
    pipe = random_diffusers_pipeline(spec or RandomPipelineSpec())
    pipe.save_pretrained(str(path))
    return pipe
