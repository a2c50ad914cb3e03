"""diffusers ``Transformer2DModel`` (discrete "vector embeds" variant, VQ-Diffusion) <-> our ``Denoiser``."""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError
from ..models.denoiser import Denoiser, DenoiserConfig
from .common import convert_state_dict, invert_key_map

# Config values of the VQ-Diffusion variant that we require (anything else is a different architecture).
_REQUIRED = {
    "norm_type": "ada_norm",
    "patch_size": None,
    "in_channels": None,
    "only_cross_attention": False,
    "double_self_attention": False,
    "upcast_attention": False,
    "norm_elementwise_affine": True,
}
_ACTIVATIONS = {"geglu-approximate": "gelu2", "gelu": "gelu"}


def denoiser_config_from_diffusers(config: dict[str, Any]) -> DenoiserConfig:
    """A diffusers ``transformer/config.json`` -> :class:`DenoiserConfig` (ConfigError if unsupported)."""
    if config.get("num_vector_embeds") is None:
        raise ConfigError(
            "transformer config: num_vector_embeds is missing; only the discrete VQ-Diffusion "
            "variant of Transformer2DModel is supported"
        )
    for key, expected in _REQUIRED.items():
        if key in config and config[key] != expected:
            raise ConfigError(f"transformer config: {key}={config[key]!r} is not supported (need {expected!r})")
    activation = config.get("activation_fn", "geglu")
    if activation not in _ACTIVATIONS:
        raise ConfigError(
            f"transformer config: activation_fn={activation!r} is not supported (supported: {sorted(_ACTIVATIONS)})"
        )
    side = int(config.get("sample_size") or 0)
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    return DenoiserConfig(
        num_classes=int(config["num_vector_embeds"]) - 1,
        height=side,
        width=side,
        num_layers=int(config.get("num_layers", 1)),
        dim=heads * head_dim,
        num_heads=heads,
        cond_dim=config.get("cross_attention_dim"),
        num_timesteps=int(config["num_embeds_ada_norm"]),
        mlp_ratio=4.0,
        activation=_ACTIVATIONS[activation],
        attention_bias=bool(config.get("attention_bias", False)),
        norm_eps=float(config.get("norm_eps", 1e-5)),
    )


def denoiser_config_to_diffusers(config: DenoiserConfig) -> dict[str, Any]:
    """:class:`DenoiserConfig` -> ``Transformer2DModel(**kwargs)`` arguments."""
    if config.height != config.width:
        raise ConfigError(
            f"diffusers' Transformer2DModel needs a square token grid, got {config.height}x{config.width}"
        )
    if config.mlp_ratio != 4.0:
        raise ConfigError(f"diffusers' feed-forward is 4x wide; mlp_ratio={config.mlp_ratio} cannot be exported")
    if config.cond_dim is None:
        raise ConfigError(
            "diffusers' VQ-Diffusion transformer has cross-attention; an unconditional denoiser "
            "(cond_dim=None) cannot be exported"
        )
    inverse = {v: k for k, v in _ACTIVATIONS.items()}
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.dim // config.num_heads,
        "num_layers": config.num_layers,
        "num_vector_embeds": config.num_classes + 1,
        "sample_size": config.height,
        "cross_attention_dim": config.cond_dim,
        "activation_fn": inverse[config.activation],
        "attention_bias": config.attention_bias,
        "norm_type": "ada_norm",
        "num_embeds_ada_norm": config.num_timesteps,
        "norm_eps": config.norm_eps,
    }


def diffusers_to_denoiser_key_map(config: DenoiserConfig) -> dict[str, str]:
    """Explicit diffusers key -> our key map for ``config``."""
    key_map = {
        "latent_image_embedding.emb.weight": "token_embedding.weight",
        "latent_image_embedding.height_emb.weight": "row_embedding.weight",
        "latent_image_embedding.width_emb.weight": "col_embedding.weight",
        "norm_out.weight": "norm_out.weight",
        "norm_out.bias": "norm_out.bias",
        "out.weight": "head.weight",
        "out.bias": "head.bias",
    }
    linear = ("weight", "bias")
    for i in range(config.num_layers):
        src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
        parts = [("norm1", "norm_self", "attn1", "self_attn")]
        if config.cond_dim is not None:
            parts.append(("norm2", "norm_cross", "attn2", "cross_attn"))
        for norm_src, norm_dst, attn_src, attn_dst in parts:
            key_map[f"{src}.{norm_src}.emb.weight"] = f"{dst}.{norm_dst}.timestep_embedding.weight"
            for p in linear:
                key_map[f"{src}.{norm_src}.linear.{p}"] = f"{dst}.{norm_dst}.modulation.{p}"
                key_map[f"{src}.{attn_src}.to_out.0.{p}"] = f"{dst}.{attn_dst}.to_out.{p}"
            for proj in ("to_q", "to_k", "to_v"):
                key_map[f"{src}.{attn_src}.{proj}.weight"] = f"{dst}.{attn_dst}.{proj}.weight"
                if config.attention_bias:
                    key_map[f"{src}.{attn_src}.{proj}.bias"] = f"{dst}.{attn_dst}.{proj}.bias"
        for p in linear:
            key_map[f"{src}.norm3.{p}"] = f"{dst}.norm_mlp.{p}"
            key_map[f"{src}.ff.net.0.proj.{p}"] = f"{dst}.mlp.0.{p}"
            key_map[f"{src}.ff.net.2.{p}"] = f"{dst}.mlp.2.{p}"
    return key_map


def _shapes(config: DenoiserConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in Denoiser(config).state_dict().items()}


def denoiser_state_dict_from_diffusers(
    state: dict[str, torch.Tensor], config: DenoiserConfig
) -> dict[str, torch.Tensor]:
    """Rename a diffusers transformer state dict to ours (strict, shape-checked)."""
    return convert_state_dict(
        state, diffusers_to_denoiser_key_map(config), _shapes(config), source_name="diffusers transformer"
    )


def denoiser_state_dict_to_diffusers(state: dict[str, torch.Tensor], config: DenoiserConfig) -> dict[str, torch.Tensor]:
    """Rename our denoiser state dict to diffusers' ``Transformer2DModel`` keys (strict, shape-checked)."""
    key_map = diffusers_to_denoiser_key_map(config)
    ours = _shapes(config)
    target = {src: ours[dst] for src, dst in key_map.items()}
    return convert_state_dict(state, invert_key_map(key_map), target, source_name="vqdiffusion denoiser")
