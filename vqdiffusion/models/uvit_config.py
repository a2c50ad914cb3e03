"""The aMUSEd transformer's configuration (:class:`UVitConfig`): sizes, their checks, and the repeated parts."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import ConfigBase, ConfigError, check_positive_integers, is_int, is_number, setting

__all__ = ["DEFAULT_AESTHETIC_SCORE", "MICRO_CONDITIONS", "MicroConditions", "UVitConfig", "uvit_part_counts"]

# The micro-conditions in the order the network reads them (diffusers' order: width before height).
MICRO_CONDITIONS = ("orig_width", "orig_height", "crop_top", "crop_left", "aesthetic_score")
DEFAULT_AESTHETIC_SCORE = 6.0


def _finite(value: object) -> bool:
    return is_number(value) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class MicroConditions:
    """The micro-conditions of one call (aMUSEd, Patil et al. 2024; docs/design.md §12): what the network is told
    of the training image to imitate.  The defaults are aMUSEd's pipeline's; ``orig_size`` None is the generated
    image's size.  :meth:`values` gives the five numbers in the network's order (:data:`MICRO_CONDITIONS`)."""

    aesthetic_score: float = setting(DEFAULT_AESTHETIC_SCORE, "aesthetic score to condition on (LAION scale)")
    crop_coords: tuple[float, float] = setting(
        (0, 0), "(top, left) crop coordinates to condition on, >= 0", label="Crop coordinates"
    )
    orig_size: tuple[float, float] | None = setting(
        None,
        "(width, height) of the original image to condition on, > 0 (default: the generated size)",
        label="Original size",
    )

    def __post_init__(self) -> None:
        if not _finite(self.aesthetic_score):
            raise ValueError(
                f"aesthetic_score must be a finite number (aMUSEd's default is 6), got {self.aesthetic_score!r}"
            )
        for name, low, text in (("crop_coords", 0, ">= 0, (top, left)"), ("orig_size", None, "> 0, (width, height)")):
            value = getattr(self, name)
            if value is None and name == "orig_size":
                continue
            ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(_finite(v) for v in value)
            if not ok or not all(v >= 0 if low == 0 else v > 0 for v in value):
                raise ValueError(f"{name} must be two finite numbers {text}, got {value!r}")
            object.__setattr__(self, name, tuple(value))

    def values(self, width: int, height: int) -> tuple[float, float, float, float, float]:
        """(orig width, orig height, crop top, crop left, aesthetic score) for an image of ``width`` x ``height``."""
        orig_w, orig_h = self.orig_size if self.orig_size is not None else (width, height)
        return (orig_w, orig_h, self.crop_coords[0], self.crop_coords[1], self.aesthetic_score)

    def to_dict(self, width: int, height: int) -> dict[str, Any]:
        """The resolved settings as JSON values (``orig_size`` filled in), e.g. for a sample-set manifest."""
        orig_w, orig_h, top, left, score = self.values(width, height)
        return {"aesthetic_score": score, "crop_coords": [top, left], "orig_size": [orig_w, orig_h]}


@dataclasses.dataclass(frozen=True)
class UVitConfig(ConfigBase):
    """Sizes of the aMUSEd transformer (the ``UVit2DModel`` config fields it needs; dropouts are not kept).

    ``vocab_size`` rows of token embedding, of which the first ``codebook_size`` = K are VQ codes and
    ``mask_token_id`` (in ``[K, vocab_size)``; None = ``vocab_size - 1``) is [MASK].  ``hidden_size`` is the
    transformer width, ``block_out_channels`` the width of the convolutional stages, ``in_channels`` the
    width of the token embedding and of the head.  ``cond_embed_dim`` is the pooled text width and
    ``micro_cond_embed_dim`` = 5 * ``micro_cond_encode_dim`` the micro-conditions' width.
    ``sample_size``: the token grid side the model was trained on (h = w; 16 for amused-256).
    ``use_bias``: every Linear / conv carries a bias; ``ln_elementwise_affine``: every norm a scale.
    """

    hidden_size: int = 1024
    use_bias: bool = False
    cond_embed_dim: int = 768
    micro_cond_encode_dim: int = 256
    micro_cond_embed_dim: int = 1280
    encoder_hidden_size: int = 768
    vocab_size: int = 8256
    codebook_size: int = 8192
    in_channels: int = 768
    block_out_channels: int = 768
    num_res_blocks: int = 3
    downsample: bool = False
    upsample: bool = False
    block_num_heads: int = 12
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6
    ln_elementwise_affine: bool = True
    sample_size: int = 16
    mask_token_id: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        fields = (
            "hidden_size",
            "cond_embed_dim",
            "micro_cond_encode_dim",
            "micro_cond_embed_dim",
            "encoder_hidden_size",
            "vocab_size",
            "codebook_size",
            "in_channels",
            "block_out_channels",
            "block_num_heads",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "sample_size",
        )
        check_positive_integers(name, **{field: getattr(self, field) for field in fields})
        if not is_int(self.num_res_blocks) or self.num_res_blocks < 0:
            raise ConfigError(f"{name}: num_res_blocks must be an integer >= 0, got {self.num_res_blocks!r}")
        for field in ("use_bias", "downsample", "upsample", "ln_elementwise_affine"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"{name}: {field} must be true or false, got {getattr(self, field)!r}")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)):
            raise ConfigError(f"{name}: layer_norm_eps must be a number > 0, got {self.layer_norm_eps!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"{name}: layer_norm_eps must be > 0 (1e-6 for aMUSEd), got {self.layer_norm_eps!r}")
        if self.micro_cond_encode_dim % 2:
            raise ConfigError(
                f"{name}: micro_cond_encode_dim={self.micro_cond_encode_dim} must be even (sin and cos halves)"
            )
        if self.micro_cond_embed_dim != len(MICRO_CONDITIONS) * self.micro_cond_encode_dim:
            raise ConfigError(
                f"{name}: micro_cond_embed_dim={self.micro_cond_embed_dim} must be {len(MICRO_CONDITIONS)} x "
                f"micro_cond_encode_dim = {len(MICRO_CONDITIONS) * self.micro_cond_encode_dim}"
            )
        for width, heads in (("hidden_size", "num_attention_heads"), ("block_out_channels", "block_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ConfigError(
                    f"{name}: {width}={getattr(self, width)} is not divisible by {heads}={getattr(self, heads)}"
                )
        if self.codebook_size >= self.vocab_size:
            raise ConfigError(
                f"{name}: vocab_size={self.vocab_size} must exceed codebook_size={self.codebook_size} "
                "(the embedding holds the codes and the mask token)"
            )
        mask = self.mask_token_id
        if mask is not None and (not is_int(mask) or not self.codebook_size <= mask < self.vocab_size):
            raise ConfigError(
                f"{name}: mask_token_id must lie in [codebook_size, vocab_size) = [{self.codebook_size}, "
                f"{self.vocab_size}), got {mask!r}"
            )
        if self.downsample != self.upsample:
            raise ConfigError(
                f"{name}: downsample={self.downsample} but upsample={self.upsample}; the logits must cover the "
                "token grid, so both are true (amused-512) or both false (amused-256)"
            )
        if self.downsample and self.sample_size % 2:
            raise ConfigError(f"{name}: downsample needs an even sample_size, got {self.sample_size}")

    @property
    def num_classes(self) -> int:
        """K, the number of VQ codes (logits per position)."""
        return self.codebook_size

    @property
    def mask_id(self) -> int:
        """Our [MASK] index (= K), as in :class:`~vqdiffusion.models.denoiser.DenoiserConfig`."""
        return self.codebook_size

    @property
    def mask_embedding_id(self) -> int:
        """The embedding row of [MASK] (aMUSEd's ``mask_token_id``)."""
        return self.vocab_size - 1 if self.mask_token_id is None else self.mask_token_id

    @property
    def height(self) -> int:
        return self.sample_size

    @property
    def width(self) -> int:
        return self.sample_size

    @property
    def num_tokens(self) -> int:
        """N = h * w at the trained grid size."""
        return self.sample_size * self.sample_size


def uvit_part_counts(config: UVitConfig) -> dict[str, int]:
    """The config fields that repeat modules, with their counts (see :func:`vqdiffusion.io.load_module`)."""
    return {"num_hidden_layers": config.num_hidden_layers, "num_res_blocks": config.num_res_blocks}
