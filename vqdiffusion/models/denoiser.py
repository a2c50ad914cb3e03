"""The VQ-Diffusion denoiser: a transformer over tokens predicting log p(x0 | x_t, y) (paper sec. 3.3)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigBase, ConfigError

ACTIVATIONS = ("gelu2", "gelu")


@dataclasses.dataclass(frozen=True)
class DenoiserConfig(ConfigBase):
    """Sizes of the denoiser.  K real tokens; the embedding has K + 1 rows, the last is [MASK]."""

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

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("num_classes", "height", "width", "num_layers", "dim", "num_heads", "num_timesteps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {field} must be a positive integer, got {value!r}")
        if self.cond_dim is not None and (not isinstance(self.cond_dim, int) or self.cond_dim < 1):
            raise ConfigError(f"{name}: cond_dim must be a positive integer or None, got {self.cond_dim!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"{name}: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{name}: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.mlp_ratio > 0 or not self.norm_eps > 0:
            raise ConfigError(f"{name}: mlp_ratio and norm_eps must be > 0")

    @property
    def mask_id(self) -> int:
        return self.num_classes

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @classmethod
    def preset(cls, name: str, **overrides) -> DenoiserConfig:
        if name not in DENOISER_PRESETS:
            raise ValueError(f"unknown denoiser preset {name!r}; choose one of {sorted(DENOISER_PRESETS)}")
        return dataclasses.replace(DENOISER_PRESETS[name], **overrides)


DENOISER_PRESETS = {
    "tiny": DenoiserConfig(num_classes=16, height=4, width=4, num_layers=2, dim=32, num_heads=2, cond_dim=16),
    "small": DenoiserConfig(num_classes=1024, height=16, width=16, num_layers=8, dim=512, num_heads=8, cond_dim=512),
    "ithq": DenoiserConfig(num_classes=4096, height=32, width=32, num_layers=36, dim=1408, num_heads=16, cond_dim=512),
}

# Cross-attention keys and values of the condition, one (k, v) pair per block, each [B, heads, L, head_dim].
CondKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class AdaLayerNorm(nn.Module):
    """Non-affine LayerNorm modulated by the timestep: norm(x) * (1 + scale_t) + shift_t."""

    def __init__(self, dim: int, num_timesteps: int, eps: float) -> None:
        super().__init__()
        self.timestep_embedding = nn.Embedding(num_timesteps, dim)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], t [B] long -> [B, N, D]."""
        scale, shift = self.modulation(F.silu(self.timestep_embedding(t)))[:, None].chunk(2, dim=-1)
        return torch.addcmul(shift, self.norm(x), 1 + scale)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H * d] -> [B, H, L, d]."""
    B, L, _ = x.shape
    return x.view(B, L, heads, -1).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention (self or cross) with separate q, k, v and output projections."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, L, Dc] -> (k, v), each [B, heads, L, head_dim]."""
        return _split_heads(self.to_k(context), self.heads), _split_heads(self.to_v(context), self.heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, N, D]; kv from :meth:`key_value` (cross-attention) or None (self-attention)."""
        B, N, D = x.shape
        q = _split_heads(self.to_q(x), self.heads)
        k, v = kv if kv is not None else self.key_value(x)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, d]
        return self.to_out(out.transpose(1, 2).reshape(B, N, D))


class GELU2(nn.Module):
    """x * sigmoid(1.702 x), the authors' GELU2 (diffusers' "geglu-approximate")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        return torch.sigmoid(1.702 * x).mul_(x)  # inference: one temporary less (~10% of the MLP on CPU)


class Block(nn.Module):
    """AdaLN -> self-attention, AdaLN -> cross-attention, LayerNorm -> MLP; all residual."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.norm_self = AdaLayerNorm(dim, config.num_timesteps, eps)
        self.self_attn = Attention(dim, config.num_heads, bias=config.attention_bias)
        if config.cond_dim is not None:
            self.norm_cross = AdaLayerNorm(dim, config.num_timesteps, eps)
            self.cross_attn = Attention(dim, config.num_heads, config.cond_dim, bias=config.attention_bias)
        else:
            self.norm_cross = self.cross_attn = None
        hidden = int(dim * config.mlp_ratio)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            GELU2() if config.activation == "gelu2" else nn.GELU(),
            nn.Linear(hidden, dim),
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond_kv: tuple[torch.Tensor, torch.Tensor] | None,
        groups: int = 1,
    ) -> torch.Tensor:
        """x [B, N, D] -> [groups * B, N, D].  With ``groups > 1`` (guidance: one copy of x_t per condition)
        the self-attention runs once on B rows, and the copies are made before the cross-attention."""
        x = x + self.self_attn(self.norm_self(x, t[: x.shape[0]]))
        if groups > 1:
            x = x.repeat(groups, 1, 1)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x, t), cond_kv)
        return x + self.mlp(self.norm_mlp(x))


class Denoiser(nn.Module):
    """(x_t [B, N] long, t [B] long, cond [B, L, Dc]) -> log p(x0 | x_t, cond) [B, K, N] float32."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.num_classes + 1, config.dim)
        self.row_embedding = nn.Embedding(config.height, config.dim)
        self.col_embedding = nn.Embedding(config.width, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.num_classes)

    def position_embedding(self) -> torch.Tensor:
        """[N, D]: row embedding + column embedding, row-major over the h x w grid."""
        rows, cols = self.row_embedding.weight, self.col_embedding.weight
        return (rows[:, None, :] + cols[None, :, :]).reshape(-1, self.config.dim)

    def precompute_cond_kv(self, cond: torch.Tensor) -> CondKV:
        """The condition's cross-attention keys/values for every block; compute once per sampling run."""
        if self.config.cond_dim is None:
            return ()
        self._check_cond(cond, cond.shape[0])
        cond = cond.to(self.head.weight.dtype)
        return tuple(block.cross_attn.key_value(cond) for block in self.blocks)

    def _check_cond(self, cond: torch.Tensor | None, batch: int) -> None:
        cfg = self.config
        if cfg.cond_dim is None:
            if cond is not None:
                raise ValueError("this denoiser is unconditional (cond_dim=None); pass cond=None")
            return
        if cond is None:
            raise ValueError(f"this denoiser needs a condition [B, L, {cfg.cond_dim}]; got None")
        if cond.ndim != 3 or cond.shape[0] != batch or cond.shape[2] != cfg.cond_dim:
            raise ValueError(f"cond must be [{batch}, L, {cfg.cond_dim}], got {tuple(cond.shape)}")

    def forward(
        self,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        cond_kv: CondKV | None = None,
        validate: bool = True,
        return_logits: bool = False,
    ) -> torch.Tensor:
        """Predict log p(x0 | x_t, cond) over the K real tokens (never [MASK]).

        Args:
            x_t: [B, N] long tokens in [0, K] (K = [MASK]).
            t: [B] long step indices in [0, T) (an int or 0-d tensor applies to the whole batch).
            cond: [B, L, cond_dim] condition sequence, or None when ``cond_kv`` is given / unconditional.
            cond_kv: keys/values from :meth:`precompute_cond_kv` (replaces ``cond``).  It may be computed for
                ``G * B`` conditions (e.g. [null; text] for guidance): x_t is then shared by the G groups, the
                first block's self-attention runs once, and the output has ``G * B`` rows.
            validate: check token and step ranges (a host sync; the sampling loop turns it off).
            return_logits: return unnormalised logits instead of log-probabilities.
        Returns:
            [G * B, K, N] float32 (a transposed view of a [G * B, N, K] tensor); G = 1 unless ``cond_kv`` has
            a multiple of B rows.
        """
        cfg = self.config
        if x_t.ndim != 2 or x_t.shape[1] != cfg.num_tokens or x_t.dtype not in (torch.long, torch.int32):
            raise ValueError(f"x_t must be a [B, {cfg.num_tokens}] integer tensor, got {tuple(x_t.shape)} {x_t.dtype}")
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.dtype.is_floating_point or t.ndim > 1 or (t.ndim == 1 and t.shape[0] != B):
            raise ValueError(f"t must be an int or a [{B}] integer tensor, got {tuple(t.shape)} {t.dtype}")
        t = t.long().expand(B) if t.ndim == 0 else t.long()
        if cond_kv is None:
            self._check_cond(cond, B)
            cond_kv = self.precompute_cond_kv(cond) if cond is not None else ()
        elif len(cond_kv) != (cfg.num_layers if cfg.cond_dim is not None else 0):
            raise ValueError(f"cond_kv has {len(cond_kv)} entries, expected one per block ({cfg.num_layers})")
        groups = cond_kv[0][0].shape[0] // B if cond_kv else 1
        if cond_kv and cond_kv[0][0].shape[0] != groups * B:
            raise ValueError(f"cond_kv is for a batch of {cond_kv[0][0].shape[0]}, not a multiple of x_t's {B}")
        t = t.repeat(groups) if groups > 1 else t
        if validate:
            if bool((x_t < 0).any()) or bool((x_t > cfg.num_classes).any()):
                raise ValueError(f"x_t values must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = [MASK])")
            if bool((t < 0).any()) or bool((t >= cfg.num_timesteps).any()):
                raise ValueError(f"t must lie in [0, {cfg.num_timesteps - 1}]")

        h = self.token_embedding(x_t) + self.position_embedding()  # [B, N, D]
        for i, block in enumerate(self.blocks):
            h = block(h, t, cond_kv[i] if cond_kv else None, groups if i == 0 else 1)
        logits = self.head(self.norm_out(h)).float()  # [B, N, K]
        out = logits if return_logits else torch.log_softmax(logits, dim=-1)
        return out.transpose(1, 2)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
