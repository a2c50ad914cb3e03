"""The VQ-VAE's configuration (docs/design.md §1.1): levels, widths, codebook size, padding, presets."""

from __future__ import annotations

import dataclasses
import math

from ..config import ConfigBase, ConfigError, check_integers, check_norm_eps, check_size_limit, is_int

ENCODER_PADDINGS = ("zeros", "replicate")
QUANTIZERS = ("vq", "fsq")


@dataclasses.dataclass(frozen=True)
class VQVAEConfig(ConfigBase):
    """Shape of a :class:`VQVAE`.

    Attributes:
        block_out_channels: channels of each resolution level, level 0 (full resolution) first.
        latent_channels: channels of the encoder output / decoder input (taming's ``z_channels``).
        embed_dim: width of a codebook vector (diffusers' ``vq_embed_dim``).
        num_embeddings: codebook size K; tokens take values in ``[0, K)``.
        encoder_attention: per level, whether each encoder residual block is followed by self-attention.
        decoder_attention: per level (same indexing as ``block_out_channels``), the same for the decoder.
        in_channels, out_channels: image channels.
        layers_per_block: residual blocks per encoder level; decoder levels have one more.
        mid_attention: whether the middle blocks of encoder and decoder have self-attention.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        norm_eps: GroupNorm epsilon (1e-6 in taming and diffusers).
        sample_size: nominal image side the model was trained at; any multiple of ``downsample_factor`` is
            accepted at run time.
        encoder_padding: how the encoder's convolutions pad: ``"zeros"`` (taming, diffusers, the authors) or
            ``"replicate"`` (a copy of the edge).  Zero padding makes the encoder see a frame around every
            image, so a flat background gets different codes along the borders (a black 64 x 64 image maps to
            17-44 distinct codes with zero padding); with ``"replicate"`` a flat image gives one latent, and so
            one code, everywhere.  The decoder always pads with zeros: decoding, and so generation, is the
            same computation as diffusers' ``VQModel``.
        force_upcast: run in float32 when the pipeline runs in float16 (:meth:`VQVAE.dtype_for`; diffusers'
            ``VQModel`` has a field of the same name and meaning).  float16 ends at 65504, and a decoder's
            activations can exceed it: the images would be NaN.  ``false`` runs the VQ-VAE in float16 too
            (half its memory); :meth:`VQVAE.decode_tokens` warns when that overflows.  bfloat16, whose range is
            float32's, is never upcast.
    """

    block_out_channels: tuple[int, ...]
    latent_channels: int
    embed_dim: int
    num_embeddings: int
    encoder_attention: tuple[bool, ...]
    decoder_attention: tuple[bool, ...]
    in_channels: int = 3
    out_channels: int = 3
    layers_per_block: int = 2
    mid_attention: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    sample_size: int = 256
    encoder_padding: str = "zeros"
    force_upcast: bool = True
    quantizer: str = "vq"
    fsq_levels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("block_out_channels", "encoder_attention", "decoder_attention", "fsq_levels"):
            if not isinstance(getattr(self, field), tuple):
                raise ConfigError(f"{name}: {field} must be a tuple, got {getattr(self, field)!r}")
        if len(self.block_out_channels) == 0:
            raise ConfigError(f"{name}: block_out_channels must name at least one level, got ()")
        ints = {
            "latent_channels": self.latent_channels,
            "embed_dim": self.embed_dim,
            "num_embeddings": self.num_embeddings,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
        }
        for i, channels in enumerate(self.block_out_channels):
            ints[f"block_out_channels[{i}]"] = channels
        check_integers(name, positive=ints)
        check_size_limit(name, **ints)
        check_norm_eps(name, self.norm_eps)
        if self.encoder_padding not in ENCODER_PADDINGS:
            raise ConfigError(
                f"{name}: encoder_padding must be one of {list(ENCODER_PADDINGS)}, got {self.encoder_padding!r}"
            )
        for field in ("mid_attention", "force_upcast"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"{name}: {field} must be true or false, got {getattr(self, field)!r}")
        levels = len(self.block_out_channels)
        for field in ("encoder_attention", "decoder_attention"):
            flags = getattr(self, field)
            if len(flags) != levels or not all(isinstance(f, bool) for f in flags):
                raise ConfigError(
                    f"{name}: {field} must hold one true/false flag per level ({levels} levels, from "
                    f"block_out_channels={list(self.block_out_channels)}), got {list(flags)}"
                )
        for i, channels in enumerate(self.block_out_channels):
            if channels % self.norm_num_groups:
                raise ConfigError(
                    f"{name}: block_out_channels[{i}]={channels} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        self._check_quantizer(name)
        if self.sample_size % self.downsample_factor:
            raise ConfigError(
                f"{name}: sample_size={self.sample_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (2**(levels-1) with {levels} levels)"
            )

    def _check_quantizer(self, name: str) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"{name}: quantizer must be one of {list(QUANTIZERS)}, got {self.quantizer!r}")
        levels = self.fsq_levels
        if self.quantizer == "vq":
            if levels:
                raise ConfigError(f"{name}: fsq_levels={list(levels)} is for quantizer='fsq'; leave it empty for 'vq'")
            return
        if not levels or not all(is_int(level) and level >= 2 for level in levels):
            raise ConfigError(
                f"{name}: quantizer='fsq' needs fsq_levels, one integer >= 2 per latent dimension (e.g. [8, 5, 5, 5]), "
                f"got {list(levels)}"
            )
        if self.embed_dim != len(levels):
            raise ConfigError(
                f"{name}: embed_dim={self.embed_dim} must equal len(fsq_levels)={len(levels)} for quantizer='fsq'"
            )
        if self.num_embeddings != math.prod(levels):
            raise ConfigError(
                f"{name}: num_embeddings={self.num_embeddings} must equal prod(fsq_levels)={math.prod(levels)} "
                f"(fsq_levels={list(levels)}) for quantizer='fsq'"
            )

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """f: image side / token grid side, ``2**(levels-1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def token_shape(self) -> tuple[int, int]:
        """Token grid ``(h, w)`` for a ``sample_size`` x ``sample_size`` image."""
        side = self.sample_size // self.downsample_factor
        return (side, side)

    @classmethod
    def preset(cls, name: str) -> VQVAEConfig:
        """A named configuration: ``"tiny"`` (tests) or ``"ithq"`` (the ITHQ tokenizer of docs/design.md §7)."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown VQVAEConfig preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**_PRESETS[name])


_PRESETS: dict[str, dict] = {
    "tiny": dict(
        block_out_channels=(32, 32),
        latent_channels=8,
        embed_dim=8,
        num_embeddings=16,
        encoder_attention=(False, True),
        decoder_attention=(False, True),
        layers_per_block=1,
        mid_attention=True,
        norm_num_groups=8,
        sample_size=16,
    ),
    # The ITHQ VQ-VAE (f = 8, K = 4096, 32 x 32 tokens for 256 x 256 images), as described by the
    # authors' `OUTPUT/pretrained_model/taming_dvae/config.yaml` (PatchVQGAN: ch 64, ch_mult 1-2-4-8,
    # num_res_blocks 2, attention at 32 x 32 in encoder and decoder, z_channels 256, embed_dim 128,
    # n_embed 4096; GroupNorm with 32 groups) and ported unchanged to diffusers' VQModel.
    "ithq": dict(
        block_out_channels=(64, 128, 256, 512),
        latent_channels=256,
        embed_dim=128,
        num_embeddings=4096,
        encoder_attention=(False, False, False, True),
        decoder_attention=(False, False, False, True),
        layers_per_block=2,
        mid_attention=True,
        norm_num_groups=32,
        sample_size=256,
    ),
}
