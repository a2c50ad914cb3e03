"""The VQ-Diffusion denoiser: a transformer over tokens predicting log p(x0 | x_t, y) (paper sec. 3.3).

Layout (docs/design.md §1.3): token embedding (K + 1 rows, the last is [MASK]) plus a row + column position
embedding, then ``num_layers`` blocks of

    x = x + SelfAttn(AdaLN_t(x))          full attention over the N = h * w tokens
    x = x + CrossAttn(AdaLN_t(x), cond)   skipped when the config is unconditional
    x = x + MLP(LayerNorm(x))

and a final LayerNorm + Linear head giving logits over the K real tokens (never [MASK]). AdaLN_t is a
non-affine LayerNorm followed by ``x * (1 + scale) + shift`` with (scale, shift) predicted from an
embedding of the step t. The parameter set is the one of diffusers' discrete ``Transformer2DModel``,
one tensor for one tensor (see :mod:`vqdiffusion.formats.diffusers_denoiser`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.adjustments import guided_logits
from .conditions import ConditionKind
from .denoiser_config import (  # re-exported: the config's old home
    ACTIVATIONS,
    DENOISER_PRESETS,
    MLP_TYPES,
    DenoiserConfig,
    denoiser_part_counts,
)

__all__ = [
    "ACTIVATIONS",
    "DENOISER_PRESETS",
    "MLP_TYPES",
    "ConditionCache",
    "Denoiser",
    "DenoiserConfig",
    "cat_condition_caches",
    "denoiser_part_counts",
]

def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


# What each block reads of a condition batch, computed once per sampling run: for a text condition the
# cross-attention (keys, values), each [B, heads, L, head_dim]; for class labels the MLP norm's label AdaLN
# (scale, shift), each [B, 1, D]; empty for an unconditional denoiser.  In the module's dtype.
ConditionCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class AdaLayerNorm(nn.Module):
    """Non-affine LayerNorm modulated by the step: norm(x) * (1 + scale_t) + shift_t.

    (scale_t, shift_t) = Linear(SiLU(Embedding(t))) split in two halves, scale first.
    """

    def __init__(self, dim: int, num_timesteps: int, eps: float) -> None:
        super().__init__()
        self.timestep_embedding = nn.Embedding(num_timesteps, dim)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def scale_shift(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] long -> (scale, shift), each [B, 1, D]."""
        scale_shift = self.modulation(F.silu(self.timestep_embedding(t)))  # [B, 2D]
        scale, shift = scale_shift.unsqueeze(1).chunk(2, dim=-1)
        return scale, shift

    def modulate(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """norm(x) * (1 + scale) + shift with a precomputed (scale, shift) from :meth:`scale_shift`."""
        return torch.addcmul(shift, self.norm(x), 1 + scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], t [B] long -> [B, N, D]."""
        return self.modulate(x, *self.scale_shift(t))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, heads * d] -> [B, heads, L, d] (a view)."""
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention (self or cross) with separate q, k, v and output projections."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, L, Dc] -> (k, v), each [B, heads, L, head_dim]."""
        return _split_heads(self.to_k(context), self.heads), _split_heads(self.to_v(context), self.heads)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, groups: int = 1
    ) -> torch.Tensor:
        """x [B, N, D]; ``kv`` from :meth:`key_value` (cross-attention) or None (self-attention over x).

        With ``groups`` G > 1 (cross-attention only) ``kv`` holds G * B rows that all attend from the same x:
        the queries are projected once on the B rows and shared, and the output has G * B rows, group-major.
        """
        batch, length, dim = x.shape
        q = _split_heads(self.to_q(x), self.heads)
        k, v = self.key_value(x) if kv is None else kv
        if groups > 1:
            q = q.repeat(groups, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v)  # [G * B, heads, N, head_dim]
        return self.to_out(out.transpose(1, 2).reshape(groups * batch, length, dim))


# CPU inference: rows of the MLP computed at once (see Block._mlp), and the most elements of their hidden
# activation (24 MB in float32, under glibc's largest mmap threshold, so the buffer is reused, not faulted in).
MLP_CHUNK_ROWS = 1024
MLP_CHUNK_ELEMENTS = 6 * 2**20


class GELU2(nn.Module):
    """x * sigmoid(1.702 x): the authors' GELU2, diffusers' "geglu-approximate".

    It is silu(a x) / a with a = 1.702, which lets inference fold both scales into the matrix products around
    it (:meth:`Block._mlp`) and run one in-place silu.
    """

    scale: ClassVar[float] = 1.702

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(self.scale * x)
        # Inference outside Block._mlp (the conv MLP): one temporary instead of three.
        return torch.mul(x, self.scale).sigmoid_().mul_(x)


class ConvMLP(nn.Module):
    """The authors' ``conv_mlp``: 3x3 conv -> activation -> 3x3 conv over the h x w token grid.

    [B, N, D] -> [B, N, D] with N = h * w row-major; ``in_conv``/``out_conv`` keep the grid size (padding 1).
    """

    def __init__(self, dim: int, hidden: int, height: int, width: int, activation: nn.Module) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.in_conv = nn.Conv2d(dim, hidden, 3, padding=1)
        self.act = activation
        self.out_conv = nn.Conv2d(hidden, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        grid = x.transpose(1, 2).reshape(batch, dim, self.height, self.width)
        out = self.out_conv(self.act(self.in_conv(grid)))
        return out.flatten(2).transpose(1, 2)


class Block(nn.Module):
    """AdaLN -> self-attention, AdaLN -> cross-attention (if conditional), LayerNorm -> MLP; all residual."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        dim, eps, bias = config.dim, config.norm_eps, config.attention_bias
        self.norm_self = AdaLayerNorm(dim, config.num_timesteps, eps)
        self.self_attn = Attention(dim, config.num_heads, bias=bias)
        self.norm_cross: AdaLayerNorm | None = None
        self.cross_attn: Attention | None = None
        if config.cond_dim is not None:
            self.norm_cross = AdaLayerNorm(dim, config.num_timesteps, eps)
            self.cross_attn = Attention(dim, config.num_heads, config.cond_dim, bias=bias)
        # Class-conditional models modulate the MLP norm by the label (an AdaLN over the label table).
        self.norm_mlp: nn.LayerNorm | AdaLayerNorm
        if config.num_class_labels is not None:
            self.norm_mlp = AdaLayerNorm(dim, config.num_class_labels, eps)
        else:
            self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        activation = GELU2() if config.activation == "gelu2" else nn.GELU()
        self.mlp: nn.Module
        if config.mlp_type == "conv":
            self.mlp = ConvMLP(dim, config.mlp_hidden, config.height, config.width, activation)
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, config.mlp_hidden), activation, nn.Linear(config.mlp_hidden, dim))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond_cache: tuple[torch.Tensor, torch.Tensor] | None,
        groups: int = 1,
    ) -> torch.Tensor:
        """x [B, N, D], t [groups * B] long, cond_cache (k, v) each [groups * B, heads, L, head_dim] or None;
        for a class-conditional block, (scale, shift) of the MLP norm, each [groups * B, 1, D].

        Returns [groups * B, N, D]. With ``groups > 1`` (guidance: the same x_t and t for every condition
        group) the self-attention, the cross-attention's norm and its queries run once on the B rows; the
        groups part at the cross-attention's keys and values.
        """
        # Residuals add into the fresh branch output (add_ on a Linear's output is autograd-safe).
        steps = t[: x.shape[0]]  # t is [G * B], the B steps repeated per group
        x = self.self_attn(self.norm_self(x, steps)).add_(x)
        copies = x if groups == 1 else x.repeat(groups, 1, 1)  # [G * B, N, D]
        if self.cross_attn is not None:
            x = self.cross_attn(self.norm_cross(x, steps), cond_cache, groups).add_(copies)
        else:
            x = copies
        if isinstance(self.norm_mlp, AdaLayerNorm):
            return self._mlp(self.norm_mlp.modulate(x, *cond_cache)).add_(x)
        return self._mlp(self.norm_mlp(x)).add_(x)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP on [B, N, D].  Inference runs the linear MLP as explicit matrix products: with GELU2,
        W2 GELU2(W1 h + b1) + b2 = (1/a) W2 silu(a (W1 h + b1)) + b2 (a = 1.702), the scales riding on the
        products' alpha and beta and one in-place silu instead of three passes over the [rows, hidden]
        activation.  On CPU it goes in equal chunks of at most :data:`MLP_CHUNK_ROWS` rows (fewer if the
        activation would exceed :data:`MLP_CHUNK_ELEMENTS`), so that the activation is a reused allocation
        instead of a fresh one of tens of MB whose page faults cost more than the activation itself, while
        each matrix product stays large enough to run at full speed; the second linear writes straight into
        the output rows.  Every row is computed by the same operations."""
        if not isinstance(self.mlp, nn.Sequential) or (torch.is_grad_enabled() and h.requires_grad):
            return self.mlp(h)
        first, activation, second = self.mlp
        flat = h.reshape(-1, h.shape[-1])
        rows = flat.shape[0]
        if h.device.type == "cpu":
            rows = max(1, min(MLP_CHUNK_ROWS, MLP_CHUNK_ELEMENTS // first.out_features))
            chunks = -(-flat.shape[0] // rows)
            rows = -(-flat.shape[0] // max(1, chunks))  # equal chunks: 2048 rows -> 2 x 1024, not 1024 + 1024 + 0
        gelu2 = isinstance(activation, GELU2)
        a = GELU2.scale if gelu2 else 1.0  # GELU2(h) = silu(a h) / a; exact GELU keeps a = 1
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], rows):
            part, rows_out = flat[start : start + rows], out[start : start + rows]
            if first.bias is None:
                inner = torch.mm(part, first.weight.t()).mul_(a) if gelu2 else torch.mm(part, first.weight.t())
            else:
                inner = torch.addmm(first.bias, part, first.weight.t(), beta=a, alpha=a)  # a (W1 h + b1)
            inner = F.silu(inner, inplace=True) if gelu2 else activation(inner)
            if second.bias is None:
                torch.mm(inner, second.weight.t(), out=rows_out)
                if gelu2:
                    rows_out.mul_(1.0 / a)
            else:
                torch.addmm(second.bias, inner, second.weight.t(), alpha=1.0 / a, out=rows_out)
        return out.view(h.shape)


def cat_condition_caches(*parts: ConditionCache) -> ConditionCache:
    """Concatenate condition caches along the batch (e.g. [null; cond] for classifier-free guidance).

    All parts must come from the same denoiser and have the same condition length L. The simpler route is
    ``denoiser.precompute_condition(torch.cat([null_cond, cond]))``; this helper is for condition caches already built.
    """
    if not parts:
        raise ValueError("cat_condition_caches needs at least one ConditionCache")
    if len({len(p) for p in parts}) != 1:
        raise ValueError(f"condition caches have different numbers of blocks: {[len(p) for p in parts]}")
    per_block = zip(*parts, strict=True)  # for each block: its (k, v) in every part
    return tuple((torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])) for kvs in per_block)


class Denoiser(nn.Module):
    """(x_t [B, N] long, t [B] long, cond [B, L, cond_dim]) -> log p(x0 | x_t, cond) [B, K, N] float32."""

    # The model kind (docs/design.md §12): trained on the timestep chain of its schedule (t is an input).
    time_agnostic: ClassVar[bool] = False

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.num_classes + 1, config.dim)
        rows, cols = config.position_table_shape
        self.row_embedding = nn.Embedding(rows, config.dim)
        self.col_embedding = nn.Embedding(cols, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.num_classes)

    def position_embedding(self) -> torch.Tensor:
        """[N, D]: row embedding + column embedding, row-major over the h x w grid (i = row * w + col).

        With a larger ``position_grid`` (R x C), position i takes row i // C and column i % C of that grid.
        """
        rows, cols = self.row_embedding.weight, self.col_embedding.weight  # [R, D], [C, D]
        table = (rows.unsqueeze(1) + cols.unsqueeze(0)).view(-1, self.config.dim)
        return table if self.config.position_grid is None else table[: self.config.num_tokens]

    def precompute_condition(self, cond: torch.Tensor) -> ConditionCache:
        """What every block reads of the condition, computed once per sampling run (:data:`ConditionCache`).

        Args:
            cond: [B, L, cond_dim] float (cast to the module's dtype), or [B] long labels for a
                class-conditional model.
        Returns:
            One pair per block: cross-attention (k, v), each [B, heads, L, head_dim], or the label AdaLN
            (scale, shift), each [B, 1, D]; ``()`` for an unconditional model
            (``cond`` must then be None). For guidance, call it once on ``torch.cat([null_cond, cond])``
            (or join existing ones with :func:`cat_condition_caches`) and pass the un-duplicated x_t [B, N] to
            :meth:`forward`, which returns the [null; cond] rows, [2B, K, N].
        """
        self._check_cond(cond, None)
        return self._condition_cache(cond)

    def _condition_cache(self, cond: torch.Tensor | None) -> ConditionCache:
        if cond is None:
            return ()
        if self.config.num_class_labels is not None:  # labels -> each block's MLP-norm (scale, shift)
            labels = cond.to(self.token_embedding.weight.device).long()
            return tuple(block.norm_mlp.scale_shift(labels) for block in self.blocks)
        cond = cond.to(self.token_embedding.weight.dtype)
        return tuple(block.cross_attn.key_value(cond) for block in self.blocks)

    def _check_cond(self, cond: torch.Tensor | None, batch: int | None) -> None:
        cfg = self.config
        if cfg.num_class_labels is not None:
            want = f"[{'B' if batch is None else batch}] integer labels in [0, {cfg.num_class_labels})"
            if not isinstance(cond, torch.Tensor) or cond.is_floating_point() or cond.dtype == torch.bool:
                raise ValueError(f"this class-conditional denoiser needs cond = {want}, got {_describe(cond)}")
            if cond.ndim != 1 or (batch is not None and cond.shape[0] != batch):
                raise ValueError(f"cond must be {want}, got shape {tuple(cond.shape)}")
            if cond.numel() and bool(((cond < 0) | (cond >= cfg.num_class_labels)).any()):
                raise ValueError(f"cond must be {want}, got values in [{int(cond.min())}, {int(cond.max())}]")
            return
        if cfg.cond_dim is None:
            if cond is not None:
                raise ValueError("this denoiser is unconditional (cond_dim=None); pass cond=None")
            return
        want = f"[{'B' if batch is None else batch}, L, {cfg.cond_dim}]"
        if cond is None:
            raise ValueError(f"this denoiser needs a condition {want} (or cond_cache); got None")
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point():
            raise ValueError(f"cond must be a floating-point tensor {want}, got {_describe(cond)}")
        if cond.ndim != 3 or cond.shape[2] != cfg.cond_dim or (batch is not None and cond.shape[0] != batch):
            raise ValueError(f"cond must be {want}, got {tuple(cond.shape)}")

    def _cond_groups(self, cond_cache: ConditionCache, batch: int) -> int:
        """Check ``cond_cache`` against x_t's batch B; return G, the number of condition rows per x_t row."""
        cfg = self.config
        expected = cfg.num_layers if cfg.condition_kind != ConditionKind.NONE else 0
        if len(cond_cache) != expected:
            raise ValueError(f"cond_cache has {len(cond_cache)} entries, expected {expected} (one per block)")
        if not expected:
            return 1
        shape = tuple(cond_cache[0][0].shape)
        if cfg.num_class_labels is not None:
            if len(shape) != 3 or shape[1:] != (1, cfg.dim) or shape[0] % batch:
                raise ValueError(
                    f"cond_cache entries must be [G * {batch}, 1, {cfg.dim}] for x_t of batch {batch}, got {shape}; "
                    "build them with precompute_condition"
                )
            return shape[0] // batch
        if len(shape) != 4 or (shape[1], shape[3]) != (cfg.num_heads, cfg.head_dim) or shape[0] % batch:
            raise ValueError(
                f"cond_cache keys must be [G * {batch}, {cfg.num_heads}, L, {cfg.head_dim}] for x_t of batch "
                f"{batch}, got {shape}; build them with precompute_condition"
            )
        return shape[0] // batch

    def _steps(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """t as an int, 0-d or [B] integer tensor -> [B] long on ``device``."""
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise ValueError(f"t must be an int or a [{batch}] integer tensor, got {_describe(t)}")
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.ndim > 1:
            raise ValueError(f"t must be an int or a [{batch}] integer tensor, got {_describe(t)}")
        if t.ndim == 1 and t.shape[0] != batch:
            raise ValueError(f"t must have one step per sample: expected [{batch}], got {tuple(t.shape)}")
        return t.long().expand(batch)

    def forward(
        self,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        cond_cache: ConditionCache | None = None,
        validate: bool = True,
        return_logits: bool = False,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Predict log p(x0 | x_t, cond) over the K real tokens (never [MASK]): log_softmax(head(z)) with z
        from :meth:`features`.

        Args:
            x_t: [B, N] long (or int32) tokens in [0, K]; K is [MASK].
            t: [B] integer steps in [0, T), one per sample; an int or 0-d tensor applies to the whole batch.
            cond: [B, L, cond_dim] condition ([B] long labels for a class-conditional model); None when
                ``cond_cache`` is given or the model is unconditional.
            cond_cache: keys/values from :meth:`precompute_condition` (instead of ``cond``). They may hold
                G * B conditions (e.g. [null; text] for guidance): x_t and t are then shared by the G
                groups, the first self-attention runs once, and the output has G * B rows, group-major.
            validate: check token and step ranges (one host sync; the sampling loop passes False).
                Shapes and dtypes are always checked.
            return_logits: return unnormalised logits instead of log-probabilities.
            guidance_scale: classifier-free guidance s with ``cond_cache`` holding the two groups [null; cond]:
                returns the B guided rows log_softmax(l_u + s (l_c - l_u)) (Improved VQ-Diffusion sec. 3.1;
                logits: l_u + s (l_c - l_u)). The head is affine, so this is head(z_u + s (z_c - z_u)): the
                combination runs on [B, N, D] in float32 and the head on B rows (docs/design.md §6).
        Returns:
            [G * B, K, N] float32 log-probabilities (G = 1 unless ``cond_cache`` says otherwise); log_softmax
            over K is computed in float32 whatever the module dtype. It is a transposed view of a
            contiguous [G * B, N, K] tensor, so it is *not* contiguous; call ``.contiguous()`` if needed.
        """
        z = self.features(x_t, t, cond, cond_cache=cond_cache, validate=validate)
        if guidance_scale is not None:
            if z.shape[0] != 2 * x_t.shape[0]:
                raise ValueError(
                    f"guidance_scale needs cond_cache with the two groups [null; cond] ({2 * x_t.shape[0]} rows for "
                    f"x_t of batch {x_t.shape[0]}), got {z.shape[0]} rows"
                )
            z_u, z_c = z.float().chunk(2)
            z = guided_logits(z_u, z_c, float(guidance_scale)).to(z.dtype)  # z_u + s (z_c - z_u), [B, N, D]
        logits = self.head(z).float()  # [G * B, N, K] ([B, N, K] guided); no-op cast in float32
        out = logits if return_logits else torch.log_softmax(logits, dim=-1)
        return out.transpose(1, 2)

    def features(
        self,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        cond_cache: ConditionCache | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """The input z of the affine head, [G * B, N, D] in the module's dtype (the final LayerNorm's output);
        arguments and checks as :meth:`forward`, whose logits are head(z) = z W^T + b.
        """
        cfg = self.config
        if not isinstance(x_t, torch.Tensor) or x_t.dtype not in (torch.long, torch.int32):
            raise ValueError(f"x_t must be a [B, {cfg.num_tokens}] long tensor, got {_describe(x_t)}")
        if x_t.ndim != 2 or x_t.shape[1] != cfg.num_tokens or x_t.shape[0] == 0:
            grid = f"N = {cfg.height} x {cfg.width} tokens"
            raise ValueError(f"x_t must be [B, {cfg.num_tokens}] ({grid}), got {tuple(x_t.shape)}")
        batch = x_t.shape[0]
        t = self._steps(t, batch, x_t.device)
        groups = 1
        if cond_cache is None:
            self._check_cond(cond, batch)
            cond_cache = self._condition_cache(cond)
        elif cond is not None:
            raise ValueError("pass either cond or cond_cache, not both")
        else:
            groups = self._cond_groups(cond_cache, batch)
        if validate:
            self._check_ranges(x_t, t)
        if groups > 1:
            t = t.repeat(groups)  # [G * B]; the first self-attention reads t[:B]

        hidden = self.token_embedding(x_t)  # [B, N, D]; fresh tensor, so the in-place add is safe
        hidden += self.position_embedding()  # broadcast over the batch, no per-sample copy
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, t, cond_cache[i] if cond_cache else None, groups if i == 0 else 1)
        return self.norm_out(hidden)

    def _check_ranges(self, x_t: torch.Tensor, t: torch.Tensor) -> None:
        """Token and step ranges, with a single host sync on the good path."""
        cfg = self.config
        bad_x = (x_t < 0).any() | (x_t > cfg.num_classes).any()
        bad_t = (t < 0).any() | (t >= cfg.num_timesteps).any()
        bad_x, bad_t = torch.stack([bad_x, bad_t]).tolist()
        if bad_x:
            raise ValueError(
                f"x_t values must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = [MASK]), "
                f"got min {int(x_t.min())} max {int(x_t.max())}"
            )
        if bad_t:
            raise ValueError(
                f"t must lie in [0, {cfg.num_timesteps - 1}] (T = {cfg.num_timesteps}), "
                f"got min {int(t.min())} max {int(t.max())}"
            )

    def num_parameters(self) -> int:
        """Total number of parameters (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())
