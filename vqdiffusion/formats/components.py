"""The parts of a text-to-image model as the folder readers and writers exchange them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..diffusion import MaskReplaceSchedule
from ..io import check_finite, load_weights, read_weights_header
from ..models.conditions import CLIPTextCondition, LearnedNullCondition
from ..models.denoiser import Denoiser
from ..models.vqvae import VQVAE
from ..sampling import SamplingOptions

__all__ = ["PipelineComponents", "load_null_condition"]


@dataclasses.dataclass(frozen=True)
class PipelineComponents:
    """Everything a model folder holds (see :class:`vqdiffusion.pipeline.VQDiffusionPipeline`, which checks
    that the parts fit together).

    ``text_encoder``/``null_condition``: a text model's CLIP condition and its learned null text (None: the
    empty prompt is the null input).  ``null_class_label``: a class-conditional model's null label (the
    last label row), or None.  ``defaults``: the model's default sampling settings (None: the library's).
    """

    vqvae: VQVAE
    denoiser: Denoiser
    schedule: MaskReplaceSchedule
    text_encoder: CLIPTextCondition | None = None
    null_condition: LearnedNullCondition | None = None
    defaults: SamplingOptions | None = None
    null_class_label: int | None = None

    @property
    def condition_kind(self) -> str:
        """The condition kind the denoiser is built for: "text", "class" or "none"."""
        return self.denoiser.config.condition_kind


def load_null_condition(path: Path, key: str) -> LearnedNullCondition:
    """A weights file holding exactly one [L, D] tensor named ``key``."""
    header = read_weights_header(path)
    if set(header) != {key} or header[key].ndim != 2 or not header[key].is_floating_point():
        found = {name: (tuple(t.shape), str(t.dtype)) for name, t in header.items()}
        raise ValueError(f"{path}: expected one floating point [L, D] tensor {key!r}, found {found}")
    weights = load_weights(path)
    check_finite(weights, str(path))
    return LearnedNullCondition(weights[key].clone())
