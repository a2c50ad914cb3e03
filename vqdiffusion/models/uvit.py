"""aMUSEd's masked-token transformer (a U-ViT): x_t -> log p(x0 | x_t, text), with no step input.

The model kind is *time-agnostic*: it predicts the clean token at every position from the partly masked
grid alone (MaskGIT/MUSE), so no timestep enters the network.  Layout (the parameter set of diffusers'
``UVit2DModel``, one tensor for one tensor; see :mod:`vqdiffusion.formats.amused` for the key map):

* conditions: the CLIP hidden states [B, L, Dc] -> Linear -> RMSNorm (the *context*, width ``hidden_size``);
  the pooled text embedding [B, Dp] and the five micro-conditions [B, 5] (each embedded sinusoidally,
  ``micro_cond_encode_dim`` wide) -> concatenated -> Linear -> SiLU -> Linear (the *global condition*
  [B, hidden_size], which drives every AdaLN / modulation);
* tokens [B, h, w] (ids in ``[0, vocab_size)``, the mask is ``mask_token_id``) -> Embedding -> RMSNorm ->
  Linear to ``block_out_channels``;
* a down stage: optional RMSNorm + 2x2 stride-2 conv, then ``num_res_blocks`` x (ConvNeXt block modulated
  by the global condition, then two cross-attentions to the context);
* RMSNorm -> Linear to ``hidden_size``; ``num_hidden_layers`` transformer layers
  (AdaRMS -> self-attention, AdaRMS -> cross-attention, AdaLN -> GEGLU MLP; all residual);
  RMSNorm -> Linear back;
* an up stage (as the down stage, with an optional RMSNorm + 2x2 stride-2 transposed conv at its end);
* the head: Linear -> RMSNorm -> Linear to the ``codebook_size`` logits.

Our convention (as :class:`vqdiffusion.models.denoiser.Denoiser`): x_t is [B, N] long in ``[0, K]`` with
K = ``codebook_size`` standing for [MASK] (mapped to ``mask_token_id`` inside), N = h * w row-major, and the
output is [B, K, N] float32 log-probabilities, a transposed view of a contiguous [B, N, K] tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .uvit_config import (  # re-exported: the config's old home
    DEFAULT_AESTHETIC_SCORE,
    MICRO_CONDITIONS,
    MicroConditions,
    UVitConfig,
    uvit_part_counts,
)

__all__ = [
    "DEFAULT_AESTHETIC_SCORE",
    "MICRO_CONDITIONS",
    "AmusedCondition",
    "MicroConditions",
    "UVit",
    "UVitConditionCache",
    "UVitConfig",
    "default_micro_conditions",
    "sinusoidal_embedding",
    "uvit_part_counts",
]

RES_FFN_FACTOR = 4  # the ConvNeXt blocks' MLP width, times the channels
ATTENTION_NORM_EPS = 1e-6  # the stage attention blocks' RMSNorm epsilon (fixed, whatever layer_norm_eps is)
GRN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------------------
def default_micro_conditions(
    width: int, height: int, *, crop: tuple[int, int] = (0, 0), aesthetic_score: float = DEFAULT_AESTHETIC_SCORE
) -> torch.Tensor:
    """aMUSEd's micro-conditions [5] float32: (image width, image height, crop top, crop left, aesthetic score).

    The defaults are the pipeline's: the generated image's size, no crop, aesthetic score 6
    (:class:`MicroConditions` with ``orig_size`` gives another original size).
    """
    values = MicroConditions(aesthetic_score=aesthetic_score, crop_coords=crop).values(width, height)
    return torch.tensor(values, dtype=torch.float32)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[M] values -> [M, dim] float32 (cos half first, then sin), frequencies ``max_period ** (-i / (dim / 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


@dataclasses.dataclass(frozen=True)
class AmusedCondition:
    """What the network reads of a prompt: CLIP's penultimate hidden states [B, L, Dc], its pooled projection
    [B, Dp] and the micro-conditions [B, 5] (see :func:`default_micro_conditions`)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor
    micro_conds: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.hidden_states.shape[0])

    @staticmethod
    def cat(parts: Sequence[AmusedCondition]) -> AmusedCondition:
        """Concatenate along the batch (e.g. [null; text] for classifier-free guidance)."""
        if not parts:
            raise ValueError("AmusedCondition.cat needs at least one condition")
        return AmusedCondition(
            torch.cat([p.hidden_states for p in parts]),
            torch.cat([p.pooled for p in parts]),
            torch.cat([p.micro_conds for p in parts]),
        )


@dataclasses.dataclass(frozen=True)
class UVitConditionCache:
    """What every block reads of a condition batch, computed once per sampling run (:meth:`UVit.precompute_condition`).

    ``emb``: the global condition [B, hidden_size]; ``context``: the projected text [B, L, hidden_size];
    ``kv``: the (keys, values) [B, heads, L, head_dim] of every cross-attention, in module order.
    """

    emb: torch.Tensor
    context: torch.Tensor
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def batch_size(self) -> int:
        return int(self.emb.shape[0])


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last dim (in float32), times an optional scale ``weight``."""

    def __init__(self, dim: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return out.to(x.dtype)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            out = out.to(self.weight.dtype)
        return out * self.weight


class Modulated(nn.Module):
    """A norm followed by ``x * (1 + scale) + shift``, (scale, shift) = Linear(SiLU(emb)), scale first."""

    def __init__(self, norm: nn.Module, dim: int, cond_dim: int, bias: bool) -> None:
        super().__init__()
        self.modulation = nn.Linear(cond_dim, 2 * dim, bias=bias)
        self.norm = norm

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], emb [B, Dh] -> [B, N, D]."""
        scale, shift = self.modulation(F.silu(emb).to(x.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return torch.addcmul(shift, self.norm(x), 1 + scale)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention; ``to_out`` and the q, k, v projections all carry a bias or none."""

    def __init__(self, dim: int, heads: int, context_dim: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, L, Dc] -> (k, v), each [B, heads, L, head_dim]."""
        return _split_heads(self.to_k(context), self.heads), _split_heads(self.to_v(context), self.heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, N, D]; ``kv`` from :meth:`key_value` (cross-attention) or None (self-attention)."""
        batch, length, dim = x.shape
        q = _split_heads(self.to_q(x), self.heads)
        k, v = self.key_value(x) if kv is None else kv
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, dim))


class TransformerLayer(nn.Module):
    """AdaRMS -> self-attention, AdaRMS -> cross-attention, AdaLN -> GEGLU MLP; all residual."""

    def __init__(self, config: UVitConfig) -> None:
        super().__init__()
        dim, eps, bias, affine = (
            config.hidden_size,
            config.layer_norm_eps,
            config.use_bias,
            config.ln_elementwise_affine,
        )
        heads = config.num_attention_heads
        self.norm_self = Modulated(RMSNorm(dim, eps, affine), dim, dim, bias)
        self.self_attn = Attention(dim, heads, dim, bias)
        self.norm_cross = Modulated(RMSNorm(dim, eps, affine), dim, dim, bias)
        self.cross_attn = Attention(dim, heads, dim, bias)
        layer_norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=bias and affine)
        self.norm_mlp = Modulated(layer_norm, dim, dim, bias)
        self.mlp_in = nn.Linear(dim, 2 * config.intermediate_size, bias=bias)
        self.mlp_out = nn.Linear(config.intermediate_size, dim, bias=bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, N, D], emb [B, D], kv the cross-attention's (k, v) -> [B, N, D]."""
        x = self.self_attn(self.norm_self(x, emb)).add_(x)
        x = self.cross_attn(self.norm_cross(x, emb), kv).add_(x)
        value, gate = self.mlp_in(self.norm_mlp(x, emb)).chunk(2, dim=-1)
        return self.mlp_out(value * F.gelu(gate)).add_(x)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on channels-last [B, H, W, C]: x + gamma * x * n(x) + beta, n = ||x||_HW / mean_C."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
        ratio = norms / (norms.mean(dim=-1, keepdim=True) + GRN_EPS)
        return self.gamma * (x * ratio) + self.beta + x


class ConvNextBlock(nn.Module):
    """Depthwise 3x3 conv -> RMSNorm -> Linear -> GELU -> GRN -> Linear, residual, then modulated by the
    global condition: ``x * (1 + scale) + shift``.  [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, cond_dim: int, eps: float, affine: bool, bias: bool) -> None:
        super().__init__()
        wide = channels * RES_FFN_FACTOR
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=bias)
        self.norm = RMSNorm(channels, eps, affine)
        self.mlp_in = nn.Linear(channels, wide, bias=bias)
        self.grn = GlobalResponseNorm(wide)
        self.mlp_out = nn.Linear(wide, channels, bias=bias)
        self.modulation = nn.Linear(cond_dim, 2 * channels, bias=bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.depthwise(x).permute(0, 2, 3, 1))
        h = self.mlp_out(self.grn(F.gelu(self.mlp_in(h)))).permute(0, 3, 1, 2)
        scale, shift = self.modulation(F.silu(emb)).chunk(2, dim=1)
        return (h + x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class StageAttention(nn.Module):
    """Two residual cross-attentions of the grid's tokens to the context (RMSNorm before each).  When the
    stage is narrower than the context, the context first goes through SiLU -> Linear (``context_proj``)."""

    def __init__(self, channels: int, heads: int, context_dim: int, bias: bool) -> None:
        super().__init__()
        self.context_proj = nn.Linear(context_dim, channels, bias=bias) if context_dim != channels else None
        self.norm_a = RMSNorm(channels, ATTENTION_NORM_EPS)
        self.attn_a = Attention(channels, heads, channels, bias)
        self.norm_b = RMSNorm(channels, ATTENTION_NORM_EPS)
        self.attn_b = Attention(channels, heads, channels, bias)

    def key_values(self, context: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The (k, v) of both attentions for a context [B, L, hidden_size]."""
        if self.context_proj is not None:
            context = self.context_proj(F.silu(context))
        return self.attn_a.key_value(context), self.attn_b.key_value(context)

    def forward(self, x: torch.Tensor, kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C]."""
        x = self.attn_a(self.norm_a(x), kv[0]).add_(x)
        return self.attn_b(self.norm_b(x), kv[1]).add_(x)


class Resample(nn.Module):
    """RMSNorm over channels, then a 2x2 stride-2 conv (down; the grid is first zero-padded by one row and
    column at the bottom/right) or transposed conv (up).  [B, C, H, W] -> half or double the side."""

    def __init__(self, channels: int, up: bool, eps: float, affine: bool, bias: bool) -> None:
        super().__init__()
        self.up = up
        self.norm = RMSNorm(channels, eps, affine)
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.conv = conv(channels, channels, kernel_size=2, stride=2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv(x if self.up else F.pad(x, (0, 1, 0, 1)))


class Stage(nn.Module):
    """Optional downsample, ``num_res_blocks`` x (ConvNeXt block, stage attention), optional upsample."""

    def __init__(self, config: UVitConfig, *, down: bool, up: bool) -> None:
        super().__init__()
        ch, eps, affine, bias = (
            config.block_out_channels,
            config.layer_norm_eps,
            config.ln_elementwise_affine,
            config.use_bias,
        )
        self.down = Resample(ch, False, eps, affine, bias) if down else None
        self.res_blocks = nn.ModuleList(
            ConvNextBlock(ch, config.hidden_size, eps, affine, bias) for _ in range(config.num_res_blocks)
        )
        self.attn_blocks = nn.ModuleList(
            StageAttention(ch, config.block_num_heads, config.hidden_size, bias) for _ in range(config.num_res_blocks)
        )
        self.up = Resample(ch, True, eps, affine, bias) if up else None

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, kv: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], ...]]
    ) -> torch.Tensor:
        """x [B, C, H, W] -> [B, C, H', W']; ``kv``: each attention block's pairs."""
        if self.down is not None:
            x = self.down(x)
        for res, attn, pairs in zip(self.res_blocks, self.attn_blocks, kv, strict=True):
            x = res(x, emb)
            batch, channels, height, width = x.shape
            tokens = attn(x.flatten(2).transpose(1, 2), pairs)
            x = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        if self.up is not None:
            x = self.up(x)
        return x


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------
class UVit(nn.Module):
    """(x_t [B, N] long in [0, K], condition) -> log p(x0 | x_t, condition) [B, K, N] float32; no step input."""

    # The model kind (docs/design.md §12): a masked model that predicts x0 from x_t without t.
    time_agnostic: ClassVar[bool] = True

    def __init__(self, config: UVitConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        eps, affine, bias = cfg.layer_norm_eps, cfg.ln_elementwise_affine, cfg.use_bias
        hidden, ch = cfg.hidden_size, cfg.block_out_channels
        self.context_proj = nn.Linear(cfg.encoder_hidden_size, hidden, bias=bias)
        self.context_norm = RMSNorm(hidden, eps, affine)
        self.cond_in = nn.Linear(cfg.cond_embed_dim + cfg.micro_cond_embed_dim, hidden, bias=bias)
        self.cond_out = nn.Linear(hidden, hidden, bias=bias)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.in_channels)
        self.embed_norm = RMSNorm(cfg.in_channels, eps, affine)
        self.embed_proj = nn.Linear(cfg.in_channels, ch, bias=bias)
        self.down = Stage(cfg, down=cfg.downsample, up=False)
        self.in_norm = RMSNorm(ch, eps, affine)
        self.in_proj = nn.Linear(ch, hidden, bias=bias)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.out_norm = RMSNorm(hidden, eps, affine)
        self.out_proj = nn.Linear(hidden, ch, bias=bias)
        self.up = Stage(cfg, down=False, up=cfg.upsample)
        self.head_proj = nn.Linear(ch, cfg.in_channels, bias=bias)
        self.head_norm = RMSNorm(cfg.in_channels, eps, affine)
        self.head = nn.Linear(cfg.in_channels, cfg.codebook_size, bias=bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    # -- conditions -----------------------------------------------------------------------------------
    def _check_condition(self, cond: AmusedCondition) -> None:
        cfg = self.config
        if not isinstance(cond, AmusedCondition):
            raise ValueError(f"cond must be an AmusedCondition, got {type(cond).__name__}")
        batch = cond.batch_size
        wants = (
            ("hidden_states", cond.hidden_states, (batch, None, cfg.encoder_hidden_size)),
            ("pooled", cond.pooled, (batch, cfg.cond_embed_dim)),
            ("micro_conds", cond.micro_conds, (batch, len(MICRO_CONDITIONS))),
        )
        for name, tensor, shape in wants:
            ok = isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.ndim == len(shape)
            ok = ok and all(want is None or got == want for got, want in zip(tensor.shape, shape, strict=True))
            if not ok:
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor)
                want = "[" + ", ".join("L" if s is None else str(s) for s in shape) + "]"
                raise ValueError(f"cond.{name} must be a float tensor {want}, got {got}")

    def condition_embedding(self, pooled: torch.Tensor, micro_conds: torch.Tensor) -> torch.Tensor:
        """The global condition: pooled [B, Dp] and micro-conditions [B, 5] -> [B, hidden_size]."""
        micro = sinusoidal_embedding(micro_conds.flatten(), self.config.micro_cond_encode_dim)
        joined = torch.cat([pooled, micro.reshape(pooled.shape[0], -1).to(pooled.dtype)], dim=1).to(self.dtype)
        return self.cond_out(F.silu(self.cond_in(joined)))

    def precompute_condition(self, cond: AmusedCondition) -> UVitConditionCache:
        """What every block reads of ``cond`` (B rows), computed once per sampling run."""
        self._check_condition(cond)
        hidden = cond.hidden_states.to(device=self.device, dtype=self.dtype)
        context = self.context_norm(self.context_proj(hidden))
        emb = self.condition_embedding(cond.pooled.to(self.device), cond.micro_conds.to(self.device))
        emb = emb.to(context.dtype)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for stage in (self.down, self.up):
            for attn in stage.attn_blocks:
                kv.extend(attn.key_values(context))
        kv.extend(layer.cross_attn.key_value(context) for layer in self.layers)
        return UVitConditionCache(emb=emb, context=context, kv=tuple(kv))

    # -- forward --------------------------------------------------------------------------------------
    def logits_from_ids(self, ids: torch.Tensor, cache: UVitConditionCache) -> torch.Tensor:
        """aMUSEd's vocabulary in and out: ids [B, h, w] in [0, vocab_size) (the mask is ``mask_token_id``)
        -> logits [G * B, h, w, K] (channels last, in the module's dtype).

        ``cache`` may hold G * B conditions (e.g. [null; text]): the token embedding runs once on the B grids
        and is shared by the G groups (group-major rows).
        """
        batch, height, width = ids.shape
        if cache.batch_size % batch:
            raise ValueError(f"the condition has {cache.batch_size} rows, not a multiple of the batch {batch}")
        groups = cache.batch_size // batch
        x = self.embed_proj(self.embed_norm(self.token_embedding(ids)))  # [B, h, w, C]
        if groups > 1:
            x = x.repeat(groups, 1, 1, 1)
        x = x.permute(0, 3, 1, 2)
        n_down = 2 * len(self.down.attn_blocks)
        n_up = 2 * len(self.up.attn_blocks)
        stage_pairs = [cache.kv[i : i + 2] for i in range(0, n_down + n_up, 2)]
        x = self.down(x, cache.emb, stage_pairs[: len(self.down.attn_blocks)])
        rows, channels, h, w = x.shape
        tokens = self.in_proj(self.in_norm(x.flatten(2).transpose(1, 2)))
        for layer, kv in zip(self.layers, cache.kv[n_down + n_up :], strict=True):
            tokens = layer(tokens, cache.emb, kv)
        tokens = self.out_proj(self.out_norm(tokens))
        x = tokens.transpose(1, 2).reshape(rows, channels, h, w)
        x = self.up(x, cache.emb, stage_pairs[len(self.down.attn_blocks) :])
        return self.head(self.head_norm(self.head_proj(x.permute(0, 2, 3, 1))))

    def forward(
        self,
        x_t: torch.Tensor,
        cond: AmusedCondition | None = None,
        *,
        cond_cache: UVitConditionCache | None = None,
        height: int | None = None,
        width: int | None = None,
        validate: bool = True,
        return_logits: bool = False,
    ) -> torch.Tensor:
        """Predict log p(x0 | x_t, cond) over the K codes (never [MASK]).

        Args:
            x_t: [B, N] long tokens in [0, K] with K = [MASK], N = height * width row-major (default: the
                trained ``sample_size`` square).
            cond: the text and micro-conditions; or ``cond_cache`` from :meth:`precompute_condition`, which may
                hold G * B rows (guidance): the output then has G * B rows, group-major.
            validate: check the token range (one host sync).
            return_logits: unnormalised logits instead of log-probabilities.
        Returns:
            [G * B, K, N] float32, a transposed view of a contiguous [G * B, N, K] tensor.
        """
        cfg = self.config
        height = cfg.sample_size if height is None else height
        width = cfg.sample_size if width is None else width
        if not isinstance(x_t, torch.Tensor) or x_t.dtype not in (torch.long, torch.int32):
            raise ValueError(f"x_t must be a [B, {height * width}] long tensor, got {type(x_t).__name__}")
        if x_t.ndim != 2 or x_t.shape[1] != height * width or x_t.shape[0] == 0:
            raise ValueError(f"x_t must be [B, {height * width}] (N = {height} x {width}), got {tuple(x_t.shape)}")
        if (cond is None) == (cond_cache is None):
            raise ValueError("pass exactly one of cond and cond_cache")
        if cond_cache is None:
            if cond.batch_size != x_t.shape[0]:
                raise ValueError(f"cond has {cond.batch_size} rows but x_t has {x_t.shape[0]}")
            cond_cache = self.precompute_condition(cond)
        if validate and bool(((x_t < 0) | (x_t > cfg.num_classes)).any()):
            raise ValueError(
                f"x_t values must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = [MASK]), "
                f"got min {int(x_t.min())} max {int(x_t.max())}"
            )
        ids = x_t.long().masked_fill(x_t == cfg.mask_id, cfg.mask_embedding_id).view(-1, height, width)
        logits = self.logits_from_ids(ids, cond_cache).float().flatten(1, 2)  # [G * B, N, K]
        out = logits if return_logits else torch.log_softmax(logits, dim=-1)
        return out.transpose(1, 2)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
