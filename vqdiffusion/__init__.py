"""vqdiffusion: VQ-Diffusion and Improved VQ-Diffusion for text-to-image synthesis.

Layers: :mod:`vqdiffusion.diffusion` (the discrete diffusion math), :mod:`vqdiffusion.models` (networks),
:mod:`vqdiffusion.sampling` / :mod:`vqdiffusion.pipeline` / :mod:`vqdiffusion.cli` (drivers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MaskReplaceSchedule", "SamplingOptions", "VQDiffusionPipeline", "__version__"]

if TYPE_CHECKING:
    from .diffusion import MaskReplaceSchedule
    from .pipeline import VQDiffusionPipeline
    from .sampling import SamplingOptions

_LAZY = {
    "MaskReplaceSchedule": ".diffusion",
    "SamplingOptions": ".sampling",
    "VQDiffusionPipeline": ".pipeline",
}


def __getattr__(name: str) -> Any:  # lazy imports keep `import vqdiffusion` (and the CLI start) fast
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'vqdiffusion' has no attribute {name!r}")
