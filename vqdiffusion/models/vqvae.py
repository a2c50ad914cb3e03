"""Image tokenizer: a convolutional VQ autoencoder (VQ-VAE / VQGAN family; docs/design.md §1.1).

The layout is the taming-transformers encoder/decoder that VQ-Diffusion's tokenizers and diffusers'
``VQModel`` share, so their weights load through an explicit key map (see
``vqdiffusion.formats.diffusers_vqvae``):

* encoder: 3x3 stem conv, one *level* per entry of ``block_out_channels`` (``layers_per_block`` residual
  blocks, each optionally followed by single-head self-attention, then a stride-2 downsample on every level
  but the last), a middle block (residual, optional attention, residual), GroupNorm + SiLU + 3x3 conv to
  ``latent_channels``;
* ``quant_proj``: 1x1 conv to the codebook width ``embed_dim``; ``codebook``: K vectors of that width (learned,
  or with ``quantizer="fsq"`` the fixed grid of finite scalar quantization, docs/design.md §13);
* ``post_quant_proj``: 1x1 conv back to ``latent_channels``;
* decoder: the mirror image, with ``layers_per_block + 1`` residual blocks per level and nearest-neighbour
  x2 upsampling followed by a 3x3 conv.

Levels are indexed by resolution in both halves: level 0 works at full image resolution, level ``L - 1`` at
``1 / 2**(L-1)`` of it.  The decoder runs its levels from ``L - 1`` down to 0.

Shapes: images ``[B, C_in, H, W]`` in ``[-1, 1]``; latents ``[B, embed_dim, h, w]`` with ``h = H / f``,
``w = W / f`` and ``f = 2**(L-1)``; tokens ``[B, h, w]`` int64 in ``[0, K)``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..io import load_module, save_safetensors
from .codebook import Codebook
from .fsq import FSQCodebook
from .vqvae_config import ENCODER_PADDINGS, QUANTIZERS, VQVAEConfig

__all__ = [
    "CONFIG_FILE",
    "ENCODER_PADDINGS",
    "OVERFLOW_WARNING",
    "WEIGHTS_FILE",
    "VQVAE",
    "Codebook",
    "FSQCodebook",
    "QUANTIZERS",
    "VQVAEConfig",
    "VQVAEOutput",
    "load_vqvae",
    "save_vqvae",
]

# The VQ-VAE folder (a pipeline's ``vqvae/``, the tokenizer trainer's export): config + weights.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

OVERFLOW_WARNING = (
    "the VQ decoder overflowed float16 (an activation above 65504): the images hold NaN or inf pixels; run the "
    "decoder in float32 (keep the VQ-VAE config's force_upcast true, the default, or call pipe.vqvae.float())"
)


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, 1x1 conv on the skip if the
    channel count changes.  ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.in_norm = nn.GroupNorm(groups, in_channels, eps=eps)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.out_norm = nn.GroupNorm(groups, out_channels, eps=eps)
        self.out_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        h = self.out_conv(F.silu(self.out_norm(h)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection.

    GroupNorm, then per-position linear query/key/value of width C, softmax(q k^T / sqrt(C)) v, a linear
    output projection, plus the input.  ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (layer(h).unsqueeze(1) for layer in (self.query, self.key, self.value))  # [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = self.proj(h).transpose(1, 2).reshape(b, c, height, width)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: pad one row/column at the bottom/right (zeros, or a copy of the edge with
    ``pad_mode="replicate"``), then a 3x3 stride-2 conv (no padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.pad_mode = "constant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode=self.pad_mode))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention, then an optional
    resampling layer (``Downsample`` in the encoder, ``Upsample`` in the decoder)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        attention: bool,
        resample: nn.Module | None,
        groups: int,
        eps: float,
    ):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, groups, eps) for i in range(num_blocks)
        )
        self.attn_blocks = nn.ModuleList(
            SpatialSelfAttention(out_channels, groups, eps) for _ in range(num_blocks if attention else 0)
        )
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res_blocks):
            x = block(x)
            if len(self.attn_blocks):
                x = self.attn_blocks[i](x)
        if self.resample is not None:
            x = self.resample(x)
        return x


class MidBlock(nn.Module):
    """Residual block, optional attention, residual block, all at the lowest resolution."""

    def __init__(self, channels: int, attention: bool, groups: int, eps: float):
        super().__init__()
        self.res_a = ResBlock(channels, channels, groups, eps)
        self.attn = SpatialSelfAttention(channels, groups, eps) if attention else None
        self.res_b = ResBlock(channels, channels, groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_a(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.res_b(x)


class Encoder(nn.Module):
    """``[B, in_channels, H, W] -> [B, latent_channels, H/f, W/f]``."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        ch = config.block_out_channels
        groups, eps = config.norm_num_groups, config.norm_eps
        self.stem = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(
                in_channels=ch[max(i - 1, 0)],
                out_channels=ch[i],
                num_blocks=config.layers_per_block,
                attention=config.encoder_attention[i],
                resample=Downsample(ch[i]) if i < config.num_levels - 1 else None,
                groups=groups,
                eps=eps,
            )
            for i in range(config.num_levels)
        )
        self.mid = MidBlock(ch[-1], config.mid_attention, groups, eps)
        self.out_norm = nn.GroupNorm(groups, ch[-1], eps=eps)
        self.out_conv = nn.Conv2d(ch[-1], config.latent_channels, 3, padding=1)
        if config.encoder_padding == "replicate":
            # a flat image then gives the same latent at every position, borders included
            for module in self.modules():
                if isinstance(module, nn.Conv2d) and module.padding != (0, 0):
                    module.padding_mode = "replicate"
                elif isinstance(module, Downsample):
                    module.pad_mode = "replicate"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for level in self.levels:
            x = level(x)
        x = self.mid(x)
        return self.out_conv(F.silu(self.out_norm(x)))


class Decoder(nn.Module):
    """``[B, latent_channels, h, w] -> [B, out_channels, h*f, w*f]``; levels run from L-1 down to 0."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        ch = config.block_out_channels
        last = config.num_levels - 1
        groups, eps = config.norm_num_groups, config.norm_eps
        self.stem = nn.Conv2d(config.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], config.mid_attention, groups, eps)
        self.levels = nn.ModuleList(
            Level(
                in_channels=ch[min(i + 1, last)],
                out_channels=ch[i],
                num_blocks=config.layers_per_block + 1,
                attention=config.decoder_attention[i],
                resample=Upsample(ch[i]) if i > 0 else None,
                groups=groups,
                eps=eps,
            )
            for i in range(config.num_levels)
        )
        self.out_norm = nn.GroupNorm(groups, ch[0], eps=eps)
        self.out_conv = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.stem(x))
        for level in reversed(self.levels):
            x = level(x)
        return self.out_conv(F.silu(self.out_norm(x)))


@dataclasses.dataclass
class VQVAEOutput:
    """Result of :meth:`VQVAE.forward`.

    Attributes:
        reconstruction: ``[B, out_channels, H, W]`` decoder output (not clamped).
        tokens: ``[B, h, w]`` int64 code indices.
        commitment_loss: ``[B]`` per-example mean of ``(z - sg(z_q))^2``; gradients reach the encoder.
        codebook_loss: ``[B]`` per-example mean of ``(sg(z) - z_q)^2``; gradients reach the codebook.
            (The VQ-VAE objective is ``recon + codebook_loss + beta * commitment_loss``; an EMA codebook
            drops ``codebook_loss``; FSQ has neither and both are zero.)
    """

    reconstruction: torch.Tensor
    tokens: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor


class VQVAE(nn.Module):
    """Convolutional VQ autoencoder: images <-> grids of codebook tokens (see the module docstring)."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        if not isinstance(config, VQVAEConfig):
            raise TypeError(f"VQVAE expects a VQVAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.quant_proj = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.codebook = (
            FSQCodebook(config.fsq_levels)
            if config.quantizer == "fsq"
            else Codebook(config.num_embeddings, config.embed_dim)
        )
        self.post_quant_proj = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    # -- precision ---------------------------------------------------------------------------------------

    def dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype this VQ-VAE runs in when a pipeline runs in ``dtype``: float32 for float16 while
        ``config.force_upcast`` (float16 overflows above 65504; docs/design.md §11.2), else ``dtype``."""
        return torch.float32 if dtype == torch.float16 and self.config.force_upcast else dtype

    # -- input checks ------------------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(
                f"images must be [B, {cfg.in_channels}, H, W], got {images.ndim} dims with shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
        if images.shape[1] != cfg.in_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels (shape {tuple(images.shape)}), the model expects "
                f"{cfg.in_channels}"
            )
        f = cfg.downsample_factor
        height, width = images.shape[-2:]
        if height == 0 or width == 0 or height % f or width % f:
            raise ValueError(
                f"image size {height}x{width} is not a positive multiple of the downsampling factor {f}; "
                f"resize or crop to a multiple of {f}"
            )

    def _check_latents(self, z: torch.Tensor, width: int, what: str) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != width:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{what} must be [B, {width}, h, w], got {shape}")
        if not z.is_floating_point():
            raise ValueError(f"{what} must be floating point, got dtype {z.dtype}")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        k = self.config.num_embeddings
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [B, h, w], got shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor (torch.long), got dtype {tokens.dtype}")
        if tokens.numel() and bool(((tokens < 0) | (tokens >= k)).any()):
            raise ValueError(
                f"tokens must lie in [0, {k}), got values in [{int(tokens.min())}, {int(tokens.max())}]"
                + (f"; {k} is the [MASK] id, which cannot be decoded" if int(tokens.max()) == k else "")
            )

    # -- encoding ----------------------------------------------------------------------------------------

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latents before quantisation: ``[B, C_in, H, W] -> [B, embed_dim, H/f, W/f]``."""
        self._check_images(images)
        return self.quant_proj(self.encoder(images))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise: ``z [B, D, h, w] -> (z_q [B, D, h, w], tokens [B, h, w] int64)``.

        VQ: the nearest codes, ``z_q`` the code vectors themselves (no gradient to ``z``; see
        :meth:`straight_through`).  FSQ (docs/design.md §13): ``z_q = round(bound(z)) / (L // 2)`` with the
        straight-through gradient of the bounding, the same values as the codebook rows of ``tokens``.
        """
        self._check_latents(z, self.config.embed_dim, "latents")
        b, d, height, width = z.shape
        z_q, tokens = self.codebook.quantize(z.permute(0, 2, 3, 1).reshape(-1, d))
        return z_q.view(b, height, width, d).permute(0, 3, 1, 2).contiguous(), tokens.view(b, height, width)

    def straight_through(self, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """The decoder input in training, with the value of ``z_q``: VQ ``z + sg(z_q - z)`` (the reconstruction
        gradient reaches the encoder unchanged); FSQ ``z_q`` itself (its gradient already goes through the
        bounding)."""
        return self.codebook.straight_through(z, z_q)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Tokenize images: ``[B, C_in, H, W]`` in ``[-1, 1]`` -> ``[B, H/f, W/f]`` int64 in ``[0, K)``."""
        return self.quantize(self.encode_latents(images))[1]

    # -- decoding ----------------------------------------------------------------------------------------

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code vectors of a token grid: ``[B, h, w]`` int -> ``[B, embed_dim, h, w]``."""
        self._check_tokens(tokens)
        return self.codebook.lookup(tokens.long()).permute(0, 3, 1, 2).contiguous()

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Decoder on (quantised) latents: ``[B, embed_dim, h, w] -> [B, C_out, h*f, w*f]``, not clamped."""
        self._check_latents(z_q, self.config.embed_dim, "quantised latents")
        return self.decoder(self.post_quant_proj(z_q))

    def decode_tokens(self, tokens: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Images from tokens: ``[B, h, w]`` int in ``[0, K)`` -> ``[B, C_out, h*f, w*f]``.

        With ``clamp`` (default) the output is clamped to ``[-1, 1]``.  A float16 decoder whose output holds
        NaN or inf (an activation overflowed float16) gives a RuntimeWarning naming the fix.
        """
        images = self.decode_latents(self.lookup(tokens))
        if images.dtype == torch.float16 and not bool(torch.isfinite(images).all()):
            warnings.warn(OVERFLOW_WARNING, RuntimeWarning, stacklevel=2)
        return images.clamp(-1.0, 1.0) if clamp else images

    # -- training ----------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """Encode, quantise with the straight-through estimator (:meth:`straight_through`), decode.

        Returns per-example commitment and codebook terms (:class:`VQVAEOutput`); both are zero for FSQ,
        which has no learned codebook.
        """
        z = self.encode_latents(images)
        z_q, tokens = self.quantize(z)
        dims = tuple(range(1, z.ndim))
        if self.codebook.learned:
            commitment = (z - z_q.detach()).float().square().mean(dim=dims)
            codebook = (z.detach() - z_q).float().square().mean(dim=dims)
        else:  # FSQ: a fixed grid
            commitment = codebook = z.new_zeros(z.shape[0], dtype=torch.float32)
        return VQVAEOutput(
            reconstruction=self.decode_latents(self.straight_through(z, z_q)),
            tokens=tokens,
            commitment_loss=commitment,
            codebook_loss=codebook,
        )


# ---------------------------------------------------------------------------------------------------------
# The VQ-VAE folder: config.json + model.safetensors
# ---------------------------------------------------------------------------------------------------------
def save_vqvae(model: VQVAE, directory: str | os.PathLike, *, weights_dtype: torch.dtype | None = None) -> Path:
    """Write ``directory/model.safetensors`` and then ``directory/config.json`` (each atomically); returns
    the folder.  ``weights_dtype`` stores the floating point weights in that dtype (e.g. float16)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if weights_dtype is not None:
        state = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors(state, directory / WEIGHTS_FILE)
    model.config.save_json(directory / CONFIG_FILE)
    return directory


def load_vqvae(directory: str | os.PathLike) -> VQVAE:
    """Load a VQ-VAE folder (``config.json`` + ``model.safetensors``, see :func:`save_vqvae`), or a folder with
    such a ``vqvae/`` subfolder (a pipeline or a tokenizer training run).

    Raises FileNotFoundError for a missing folder or file, ConfigError for a malformed config and ValueError
    for weights that are corrupt or do not match the config; each names the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"VQ-VAE folder not found: {directory}")
    if not (directory / CONFIG_FILE).is_file() and (directory / "vqvae" / CONFIG_FILE).is_file():
        directory = directory / "vqvae"
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a VQ-VAE folder: {CONFIG_FILE} is missing (expected {CONFIG_FILE} + {WEIGHTS_FILE}, "
            "or a vqvae/ subfolder holding them)"
        )
    try:
        config = VQVAEConfig.load_json(config_path)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if str(config_path) in message else f"{config_path}: {message}") from None
    counts = vqvae_part_counts(config)
    return load_module(lambda: VQVAE(config), directory / WEIGHTS_FILE, str(directory), counts=counts)


def vqvae_part_counts(config: VQVAEConfig) -> dict[str, int]:
    """The config fields that repeat modules, with their counts (see :func:`vqdiffusion.io.load_module`)."""
    return {
        "len(block_out_channels)": len(config.block_out_channels),
        "layers_per_block": config.layers_per_block * len(config.block_out_channels),
    }
