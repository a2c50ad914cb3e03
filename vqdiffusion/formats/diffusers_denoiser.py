"""diffusers ``Transformer2DModel`` (discrete "vector embeds" variant, VQ-Diffusion) <-> our ``Denoiser``.

The VQ-Diffusion variant is the one built with ``num_vector_embeds=K+1``, ``norm_type="ada_norm"``,
``num_embeds_ada_norm=T`` and ``sample_size=h`` (diffusers only knows square token grids). Its parameters
and ours correspond one to one; only the names differ (:func:`diffusers_to_denoiser_key_map`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError
from ..models.denoiser import Denoiser, DenoiserConfig
from .keymap import convert_state_dict, invert_key_map

StateDict = dict[str, torch.Tensor]

# diffusers activation_fn <-> ours. Both feed-forwards are Linear -> activation -> Linear ("net.0.proj",
# "net.2"); diffusers' plain "geglu" is a gated unit with a twice-wide projection and is not supported.
_ACTIVATION_FROM_DIFFUSERS = {"geglu-approximate": "gelu2", "gelu": "gelu"}
_ACTIVATION_TO_DIFFUSERS = {ours: theirs for theirs, ours in _ACTIVATION_FROM_DIFFUSERS.items()}

# Fields whose value selects a different architecture than ours; each must be absent or equal to this.
_FIXED_FIELDS = {
    "in_channels": None,  # continuous (latent image) input
    "patch_size": None,  # patched input (DiT / PixArt)
    "norm_type": "ada_norm",
    "only_cross_attention": False,
    "double_self_attention": False,
    "norm_elementwise_affine": True,
    "attention_type": "default",
    "caption_channels": None,
}

# diffusers' AdaLayerNorm and its final LayerNorm always use eps 1e-5; only the MLP norm reads norm_eps.
_DIFFUSERS_EPS = 1e-5

# diffusers' defaults for fields a config.json may omit (Transformer2DModel.__init__).
_DEFAULTS = {
    "num_attention_heads": 16,
    "attention_head_dim": 88,
    "num_layers": 1,
    "cross_attention_dim": None,
    "attention_bias": False,
    "activation_fn": "geglu",
    "norm_eps": 1e-5,
}


def _where(config: dict[str, Any]) -> str:
    return f"diffusers transformer config ({config.get('_class_name', 'Transformer2DModel')})"


def denoiser_config_from_diffusers(config: dict[str, Any]) -> DenoiserConfig:
    """A diffusers ``transformer/config.json`` dict -> :class:`DenoiserConfig`.

    Raises:
        ConfigError: the config is not the discrete VQ-Diffusion variant (e.g. continuous or patched
            inputs, another norm type or activation) or misses a field it needs.
    """
    where = _where(config)
    if config.get("num_vector_embeds") is None:
        raise ConfigError(
            f"{where}: num_vector_embeds is missing; only the discrete (VQ token) variant of "
            "Transformer2DModel is supported, not continuous or patched inputs"
        )
    for key, expected in _FIXED_FIELDS.items():
        if config.get(key, expected) != expected:
            raise ConfigError(f"{where}: {key}={config[key]!r} is not supported (need {expected!r})")
    for key in ("sample_size", "num_embeds_ada_norm"):
        if config.get(key) is None:
            raise ConfigError(f"{where}: {key} is required for the VQ-Diffusion transformer")
    values = {**_DEFAULTS, **config}
    activation = values["activation_fn"]
    if activation not in _ACTIVATION_FROM_DIFFUSERS:
        supported = sorted(_ACTIVATION_FROM_DIFFUSERS)
        raise ConfigError(f"{where}: activation_fn={activation!r} is not supported; use one of {supported}")
    if values["norm_eps"] != _DIFFUSERS_EPS:
        raise ConfigError(
            f"{where}: norm_eps={values['norm_eps']} is not supported (diffusers applies it to only one "
            f"of the three norms of a block); use {_DIFFUSERS_EPS}"
        )
    heads, head_dim = int(values["num_attention_heads"]), int(values["attention_head_dim"])
    cond_dim = values["cross_attention_dim"]
    return DenoiserConfig(
        num_classes=int(values["num_vector_embeds"]) - 1,
        height=int(values["sample_size"]),
        width=int(values["sample_size"]),
        num_layers=int(values["num_layers"]),
        dim=heads * head_dim,
        num_heads=heads,
        cond_dim=None if cond_dim is None else int(cond_dim),
        num_timesteps=int(values["num_embeds_ada_norm"]),
        mlp_ratio=4.0,
        activation=_ACTIVATION_FROM_DIFFUSERS[activation],
        attention_bias=bool(values["attention_bias"]),
        norm_eps=_DIFFUSERS_EPS,
    )


def denoiser_config_to_diffusers(config: DenoiserConfig) -> dict[str, Any]:
    """:class:`DenoiserConfig` -> keyword arguments of ``diffusers.Transformer2DModel``.

    Raises:
        ConfigError: the config has no diffusers equivalent (non-square grid, MLP ratio other than 4,
            norm_eps other than 1e-5).
    """
    if config.height != config.width:
        raise ConfigError(
            f"diffusers' Transformer2DModel needs a square token grid (sample_size = h = w), got "
            f"{config.height}x{config.width}; this denoiser cannot be exported"
        )
    if config.mlp_ratio != 4.0:
        raise ConfigError(f"diffusers' MLP is 4x wide; mlp_ratio={config.mlp_ratio} cannot be exported")
    if config.norm_eps != _DIFFUSERS_EPS:
        raise ConfigError(f"diffusers' norms use eps 1e-5; norm_eps={config.norm_eps} cannot be exported")
    if config.num_class_labels is not None:
        raise ConfigError(
            "diffusers' Transformer2DModel has no class-conditional (class AdaLN) variant; this class-conditional "
            "denoiser cannot be exported to the diffusers layout (keep it in ours)"
        )
    if config.mlp_type != "linear":
        raise ConfigError(f"diffusers' feed-forward is linear; mlp_type={config.mlp_type!r} cannot be exported")
    if config.position_grid is not None:
        raise ConfigError(
            f"diffusers' position embedding covers exactly the token grid; position_grid="
            f"{list(config.position_grid)} cannot be exported"
        )
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "num_layers": config.num_layers,
        "num_vector_embeds": config.num_classes + 1,
        "sample_size": config.height,
        "cross_attention_dim": config.cond_dim,
        "activation_fn": _ACTIVATION_TO_DIFFUSERS[config.activation],
        "attention_bias": config.attention_bias,
        "norm_type": "ada_norm",
        "num_embeds_ada_norm": config.num_timesteps,
        "norm_elementwise_affine": True,
        "norm_eps": config.norm_eps,
    }


def diffusers_to_denoiser_key_map(config: DenoiserConfig) -> dict[str, str]:
    """Explicit diffusers key -> our key map for ``config`` (the model has no buffers)."""
    key_map = {
        "latent_image_embedding.emb.weight": "token_embedding.weight",
        "latent_image_embedding.height_emb.weight": "row_embedding.weight",
        "latent_image_embedding.width_emb.weight": "col_embedding.weight",
        "norm_out.weight": "norm_out.weight",
        "norm_out.bias": "norm_out.bias",
        "out.weight": "head.weight",
        "out.bias": "head.bias",
    }
    # (diffusers norm, our norm, diffusers attention, our attention) per sub-layer.
    attention_parts = [("norm1", "norm_self", "attn1", "self_attn")]
    if config.cond_dim is not None:
        attention_parts.append(("norm2", "norm_cross", "attn2", "cross_attn"))
    qkv_params = ("weight", "bias") if config.attention_bias else ("weight",)
    for i in range(config.num_layers):
        theirs, ours = f"transformer_blocks.{i}", f"blocks.{i}"
        for norm_theirs, norm_ours, attn_theirs, attn_ours in attention_parts:
            key_map[f"{theirs}.{norm_theirs}.emb.weight"] = f"{ours}.{norm_ours}.timestep_embedding.weight"
            for param in ("weight", "bias"):
                key_map[f"{theirs}.{norm_theirs}.linear.{param}"] = f"{ours}.{norm_ours}.modulation.{param}"
                key_map[f"{theirs}.{attn_theirs}.to_out.0.{param}"] = f"{ours}.{attn_ours}.to_out.{param}"
            for proj in ("to_q", "to_k", "to_v"):
                for param in qkv_params:
                    key_map[f"{theirs}.{attn_theirs}.{proj}.{param}"] = f"{ours}.{attn_ours}.{proj}.{param}"
        for param in ("weight", "bias"):
            key_map[f"{theirs}.norm3.{param}"] = f"{ours}.norm_mlp.{param}"
            key_map[f"{theirs}.ff.net.0.proj.{param}"] = f"{ours}.mlp.0.{param}"
            key_map[f"{theirs}.ff.net.2.{param}"] = f"{ours}.mlp.2.{param}"
    return key_map


def _our_shapes(config: DenoiserConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {key: tensor.shape for key, tensor in Denoiser(config).state_dict().items()}


def denoiser_state_dict_from_diffusers(state: StateDict, config: DenoiserConfig) -> StateDict:
    """Rename a diffusers transformer state dict to ours (strict: every key used once, shapes checked)."""
    key_map = diffusers_to_denoiser_key_map(config)
    return convert_state_dict(state, key_map, _our_shapes(config), source_name="diffusers transformer")


def denoiser_state_dict_to_diffusers(state: StateDict, config: DenoiserConfig) -> StateDict:
    """Rename our denoiser state dict to diffusers' ``Transformer2DModel`` keys (strict, shapes checked)."""
    key_map = diffusers_to_denoiser_key_map(config)
    ours = _our_shapes(config)
    target_shapes = {theirs: ours[our_key] for theirs, our_key in key_map.items()}
    inverse = invert_key_map(key_map)
    return convert_state_dict(state, inverse, target_shapes, source_name="vqdiffusion denoiser")
