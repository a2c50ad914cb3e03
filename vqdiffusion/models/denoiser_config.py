"""The denoiser's configuration (docs/design.md §1.3): sizes, condition kind, and the named presets."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import ConfigBase, ConfigError, check_norm_eps, check_positive_integers, check_size_limit, is_int, shown
from .conditions import ConditionKind

ACTIVATIONS = ("gelu2", "gelu")
MLP_TYPES = ("linear", "conv")



@dataclasses.dataclass(frozen=True)
class DenoiserConfig(ConfigBase):
    """Sizes of the denoiser.

    ``num_classes`` = K real VQ tokens; the token embedding has K + 1 rows and index K is [MASK].
    ``height`` x ``width`` is the token grid (N = h * w, row-major). ``cond_dim`` is the width of the
    condition sequence fed to cross-attention, or None for an unconditional model (no cross-attention).
    ``num_timesteps`` = T rows of each AdaLN step embedding. ``activation``: "gelu2" = x * sigmoid(1.702 x)
    (the authors' GELU2, diffusers' "geglu-approximate") or "gelu" (exact). ``attention_bias`` puts a bias
    on the q, k, v projections (the output projection always has one). ``norm_eps`` is every LayerNorm's eps.

    Options for the authors' class-conditional and unconditional transformers (defaults: the text layout):

    * ``mlp_type``: "linear" (Linear -> act -> Linear) or "conv" (3x3 conv -> act -> 3x3 conv over the
      h x w grid, the authors' ``conv_mlp``).
    * ``num_class_labels``: class conditioning through the MLP norm (the authors' ``selfcondition``
      block): that norm becomes an AdaLN driven by a per-block embedding of the label instead of t, and
      the condition passed to :meth:`Denoiser.forward` is a [B] long tensor of labels in
      [0, num_class_labels). Needs ``cond_dim=None`` (no cross-attention).
    * ``position_grid``: (rows, cols) of the row/column position tables when they are larger than the
      token grid; position i then takes the i-th entry of that grid flattened row-major (what the
      authors' embedding does when ``spatial_size`` exceeds the token grid). None = (height, width).
    """

    num_classes: int
    height: int
    width: int
    num_layers: int
    dim: int
    num_heads: int
    cond_dim: int | None
    num_timesteps: int = 100
    mlp_ratio: float = 4.0
    activation: str = "gelu2"
    attention_bias: bool = True
    norm_eps: float = 1e-5
    mlp_type: str = "linear"
    num_class_labels: int | None = None
    position_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        sizes = ("num_classes", "height", "width", "num_layers", "dim", "num_heads", "num_timesteps")
        check_positive_integers(name, **{field: getattr(self, field) for field in sizes})
        check_size_limit(name, **{f: getattr(self, f) for f in ("num_classes", "height", "width", "num_layers", "dim")})
        check_size_limit(name, num_heads=self.num_heads, num_timesteps=self.num_timesteps)
        check_size_limit(name, num_tokens=self.height * self.width)
        cond_dim = self.cond_dim
        for field in ("cond_dim", "num_class_labels"):
            if is_int(getattr(self, field)):
                check_size_limit(name, **{field: getattr(self, field)})
        if cond_dim is not None and (not is_int(cond_dim) or cond_dim < 1):
            raise ConfigError(
                f"{name}: cond_dim must be a positive integer (condition width) or None (unconditional), "
                f"got {cond_dim!r}"
            )
        if self.dim % self.num_heads:
            raise ConfigError(
                f"{name}: dim={self.dim} is not divisible by num_heads={self.num_heads}; choose a dim "
                f"that is a multiple of it (e.g. {self.num_heads * max(1, self.dim // self.num_heads)})"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{name}: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        self._check_mlp_ratio(name)
        check_norm_eps(name, self.norm_eps)
        if not isinstance(self.attention_bias, bool):
            raise ConfigError(f"{name}: attention_bias must be true or false, got {self.attention_bias!r}")
        if self.mlp_type not in MLP_TYPES:
            raise ConfigError(f"{name}: mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
        labels = self.num_class_labels
        if labels is not None:
            if not is_int(labels) or labels < 1:
                raise ConfigError(f"{name}: num_class_labels must be a positive integer or None, got {labels!r}")
            if cond_dim is not None:
                raise ConfigError(
                    f"{name}: num_class_labels={labels} (class AdaLN) and cond_dim={cond_dim} (cross-attention) "
                    "exclude each other; set cond_dim=None for a class-conditional model"
                )
        grid = self.position_grid
        if grid is not None:
            if not isinstance(grid, tuple) or len(grid) != 2 or not all(is_int(g) and g >= 1 for g in grid):
                raise ConfigError(f"{name}: position_grid must be None or two positive integers, got {grid!r}")
            if grid[0] * grid[1] < self.num_tokens or grid[1] < self.width:
                raise ConfigError(
                    f"{name}: position_grid={list(grid)} has fewer than the {self.num_tokens} positions of the "
                    f"{self.height} x {self.width} token grid (or is narrower than it)"
                )

    @property
    def mask_id(self) -> int:
        """Index of the [MASK] token (= K)."""
        return self.num_classes

    def _check_mlp_ratio(self, name: str) -> None:
        """``mlp_ratio`` is a finite number giving an MLP hidden width in [1, MAX_CONFIG_SIZE]."""
        ratio = self.mlp_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or (isinstance(ratio, float) and not math.isfinite(ratio))
        ):
            raise ConfigError(f"{name}: mlp_ratio must be a finite number (4.0 is standard), got {shown(ratio)}")
        hidden = self.dim * ratio
        check_size_limit(name, **{"MLP hidden width dim * mlp_ratio": hidden})
        if int(hidden) < 1:
            raise ConfigError(
                f"{name}: mlp_ratio={ratio} gives an MLP hidden width of {int(hidden)}; use a ratio > 0 (4.0 is "
                "standard)"
            )

    @property
    def num_tokens(self) -> int:
        """N = height * width."""
        return self.height * self.width

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def position_table_shape(self) -> tuple[int, int]:
        """(rows, cols) of the row and column position tables."""
        return self.position_grid if self.position_grid is not None else (self.height, self.width)

    @property
    def condition_kind(self) -> ConditionKind:
        """The condition kind: "text" (cross-attention to a sequence), "class" (class AdaLN) or "none"."""
        if self.cond_dim is not None:
            return ConditionKind.TEXT
        return ConditionKind.CLASS if self.num_class_labels is not None else ConditionKind.NONE

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DenoiserConfig:
        """A named size from :data:`DENOISER_PRESETS` with fields replaced by ``overrides`` (validated)."""
        if name not in DENOISER_PRESETS:
            raise ValueError(f"unknown denoiser preset {name!r}; choose one of {sorted(DENOISER_PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{cls.__name__}.preset: unknown field(s) {unknown}")
        return dataclasses.replace(DENOISER_PRESETS[name], **overrides)


DENOISER_PRESETS: dict[str, DenoiserConfig] = {
    # For tests and smoke runs.
    "tiny": DenoiserConfig(num_classes=16, height=4, width=4, num_layers=2, dim=32, num_heads=2, cond_dim=16),
    # A small text-to-image model over a 16 x 16 grid of a 1024-entry codebook.
    "small": DenoiserConfig(
        num_classes=1024,
        height=16,
        width=16,
        num_layers=8,
        dim=512,
        num_heads=8,
        cond_dim=512,
    ),
    # The released ITHQ transformer (docs/design.md §7): about 1.36B parameters.
    "ithq": DenoiserConfig(
        num_classes=4096,
        height=32,
        width=32,
        num_layers=36,
        dim=1408,
        num_heads=16,
        cond_dim=512,
        num_timesteps=100,
        activation="gelu2",
    ),
}


def denoiser_part_counts(config: DenoiserConfig) -> dict[str, int]:
    """The config fields that repeat modules, with their counts (see :func:`vqdiffusion.io.load_module`)."""
    return {"num_layers": config.num_layers}
