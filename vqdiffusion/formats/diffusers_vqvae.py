"""Conversion between diffusers' ``VQModel`` and :class:`vqdiffusion.models.vqvae.VQVAE`.

Configs: ``vqvae_config_from_diffusers`` / ``vqvae_config_to_diffusers`` translate the ``VQModel`` init
arguments (its ``config.json``).  Weights: an explicit key map built from the config, applied by
:func:`vqdiffusion.formats.keymap.convert_state_dict`, so every key on either side is accounted for and every
shape checked.  The two layouts hold the same tensors with the same shapes (diffusers' attention
projections are ``nn.Linear`` like ours), so no tensor is reshaped; only names and the order of decoder
levels change (diffusers numbers its ``up_blocks`` from the lowest resolution, we number levels by
resolution, level 0 = full size).

diffusers is not imported here; the functions work on plain dicts and state dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..config import ConfigError
from ..models.vqvae import VQVAE, VQVAEConfig
from .keymap import convert_state_dict, invert_key_map

__all__ = [
    "diffusers_to_vqvae_key_map",
    "vqvae_config_from_diffusers",
    "vqvae_config_to_diffusers",
    "vqvae_state_dict_from_diffusers",
    "vqvae_state_dict_to_diffusers",
]

_DOWN_PLAIN, _DOWN_ATTN = "DownEncoderBlock2D", "AttnDownEncoderBlock2D"
_UP_PLAIN, _UP_ATTN = "UpDecoderBlock2D", "AttnUpDecoderBlock2D"

# VQModel.__init__ arguments and their defaults (diffusers 0.42), used when a config.json omits a key.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": (_DOWN_PLAIN,),
    "up_block_types": (_UP_PLAIN,),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 32,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "scaling_factor": 0.18215,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}
# Keys that do not change the weights nor what encode/decode compute from tokens: scaling_factor is only
# used by latent-diffusion pipelines, lookup_from_codebook only selects a code path of VQModel.decode,
# force_upcast is a dtype hint.
_IGNORED_DIFFUSERS_KEYS = ("scaling_factor", "lookup_from_codebook", "force_upcast")
# diffusers hard-codes the GroupNorm epsilon of the VQModel encoder and decoder.
logger = logging.getLogger(__name__)
_DIFFUSERS_NORM_EPS = 1e-6


def vqvae_config_from_diffusers(config: Mapping[str, Any], *, sample_size: int | None = None) -> VQVAEConfig:
    """Build a :class:`VQVAEConfig` from a diffusers ``VQModel`` config (``model.config`` or config.json).

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are skipped, missing keys take
    ``VQModel``'s defaults.  diffusers' ``sample_size`` is taken as the image side unless ``sample_size`` is
    given (the ported ITHQ checkpoint keeps diffusers' default of 32 although it works on 256 x 256 images).
    Raises :class:`ConfigError` for anything the :class:`VQVAE` cannot represent: ``norm_type="spatial"``
    (MoVQ), an activation other than SiLU, unknown block types, mismatched lengths, unknown keys.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"diffusers VQModel config must be a mapping, got {type(config).__name__}")
    given = {k: v for k, v in config.items() if not str(k).startswith("_")}
    unknown = sorted(set(given) - set(_DIFFUSERS_DEFAULTS))
    if unknown:
        raise ConfigError(f"diffusers VQModel config: unknown key(s) {unknown}")
    cfg = {**_DIFFUSERS_DEFAULTS, **given}

    if cfg["norm_type"] != "group":
        raise ConfigError(
            f"diffusers VQModel config: norm_type={cfg['norm_type']!r} is not supported (only 'group'; "
            "'spatial' is the MoVQ decoder, which VQVAE does not implement)"
        )
    if cfg["act_fn"] not in ("silu", "swish"):
        raise ConfigError(f"diffusers VQModel config: act_fn={cfg['act_fn']!r} is not supported (only 'silu')")
    channels = tuple(cfg["block_out_channels"])
    down = tuple(cfg["down_block_types"])
    up = tuple(cfg["up_block_types"])
    for key, types, allowed in (
        ("down_block_types", down, (_DOWN_PLAIN, _DOWN_ATTN)),
        ("up_block_types", up, (_UP_PLAIN, _UP_ATTN)),
    ):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ConfigError(f"diffusers VQModel config: {key} contains {bad}; supported are {list(allowed)}")
        if len(types) != len(channels):
            raise ConfigError(
                f"diffusers VQModel config: {key} has {len(types)} entries but block_out_channels has "
                f"{len(channels)} ({list(channels)})"
            )
    embed_dim = cfg["vq_embed_dim"] if cfg["vq_embed_dim"] is not None else cfg["latent_channels"]
    return VQVAEConfig(
        block_out_channels=channels,
        latent_channels=cfg["latent_channels"],
        embed_dim=embed_dim,
        num_embeddings=cfg["num_vq_embeddings"],
        encoder_attention=tuple(t == _DOWN_ATTN for t in down),
        # diffusers' up_blocks run from the lowest resolution; our flags are indexed by level.
        decoder_attention=tuple(t == _UP_ATTN for t in reversed(up)),
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        layers_per_block=cfg["layers_per_block"],
        mid_attention=bool(cfg["mid_block_add_attention"]),
        norm_num_groups=cfg["norm_num_groups"],
        norm_eps=_DIFFUSERS_NORM_EPS,
        sample_size=cfg["sample_size"] if sample_size is None else sample_size,
    )


def vqvae_config_to_diffusers(config: VQVAEConfig) -> dict[str, Any]:
    """``VQModel`` init arguments equivalent to ``config`` (``VQModel(**result)`` builds it).

    Raises :class:`ConfigError` if ``config.norm_eps`` differs from diffusers' fixed 1e-6.  An encoder that pads
    by replication has no diffusers equivalent: the export decodes (generates) exactly, but diffusers'
    ``VQModel.encode`` would pad with zeros and give other tokens; a warning says so.  An FSQ tokenizer
    (docs/design.md §13) is refused: ``VQModel`` has no bounding step, so its nearest-code encode of the raw
    latent gives other tokens than round(bound(z)).
    """
    if config.quantizer != "vq":
        raise ConfigError(
            f"quantizer={config.quantizer!r}: diffusers' VQModel has no FSQ bounding step, so its encode would give "
            "other tokens; save the model in our layout instead"
        )
    if config.encoder_padding != "zeros":
        logger.warning(
            "encoder_padding=%r has no diffusers equivalent: decoding is exact, diffusers' encode pads with zeros",
            config.encoder_padding,
        )
    if config.norm_eps != _DIFFUSERS_NORM_EPS:
        raise ConfigError(
            f"diffusers' VQModel fixes the GroupNorm epsilon at {_DIFFUSERS_NORM_EPS}; "
            f"this config has norm_eps={config.norm_eps}"
        )
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": tuple(_DOWN_ATTN if a else _DOWN_PLAIN for a in config.encoder_attention),
        "up_block_types": tuple(_UP_ATTN if a else _UP_PLAIN for a in reversed(config.decoder_attention)),
        "block_out_channels": tuple(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "sample_size": config.sample_size,
        "num_vq_embeddings": config.num_embeddings,
        "norm_num_groups": config.norm_num_groups,
        "vq_embed_dim": config.embed_dim,
        "norm_type": "group",
        "mid_block_add_attention": config.mid_attention,
    }


# ---------------------------------------------------------------------------------------------------------
# Key map
# ---------------------------------------------------------------------------------------------------------


def _params(src: str, dst: str, names: tuple[str, ...] = ("weight", "bias")) -> dict[str, str]:
    return {f"{src}.{n}": f"{dst}.{n}" for n in names}


def _resblock(src: str, dst: str, has_shortcut: bool) -> dict[str, str]:
    out = {
        **_params(f"{src}.norm1", f"{dst}.in_norm"),
        **_params(f"{src}.conv1", f"{dst}.in_conv"),
        **_params(f"{src}.norm2", f"{dst}.out_norm"),
        **_params(f"{src}.conv2", f"{dst}.out_conv"),
    }
    if has_shortcut:
        out.update(_params(f"{src}.conv_shortcut", f"{dst}.shortcut"))
    return out


def _attention(src: str, dst: str) -> dict[str, str]:
    return {
        **_params(f"{src}.group_norm", f"{dst}.norm"),
        **_params(f"{src}.to_q", f"{dst}.query"),
        **_params(f"{src}.to_k", f"{dst}.key"),
        **_params(f"{src}.to_v", f"{dst}.value"),
        **_params(f"{src}.to_out.0", f"{dst}.proj"),
    }


def _mid(src: str, dst: str, attention: bool) -> dict[str, str]:
    out = {
        **_resblock(f"{src}.resnets.0", f"{dst}.res_a", False),
        **_resblock(f"{src}.resnets.1", f"{dst}.res_b", False),
    }
    if attention:
        out.update(_attention(f"{src}.attentions.0", f"{dst}.attn"))
    return out


def diffusers_to_vqvae_key_map(config: VQVAEConfig) -> dict[str, str]:
    """Explicit map from every ``VQModel`` state-dict key to the :class:`VQVAE` key holding that tensor.

    Families (``i`` = our level, ``j`` = block in the level, ``L`` = number of levels):

    * ``encoder.conv_in`` -> ``encoder.stem``; ``encoder.conv_norm_out`` / ``conv_out`` ->
      ``encoder.out_norm`` / ``out_conv``; same for ``decoder.``;
    * ``encoder.down_blocks.i.resnets.j.{norm1,conv1,norm2,conv2,conv_shortcut}`` ->
      ``encoder.levels.i.res_blocks.j.{in_norm,in_conv,out_norm,out_conv,shortcut}``;
    * ``...attentions.j.{group_norm,to_q,to_k,to_v,to_out.0}`` ->
      ``...attn_blocks.j.{norm,query,key,value,proj}`` (all ``nn.Linear`` on both sides);
    * ``encoder.down_blocks.i.downsamplers.0.conv`` -> ``encoder.levels.i.resample.conv``;
    * ``decoder.up_blocks.(L-1-i)`` -> ``decoder.levels.i`` (``upsamplers.0.conv`` -> ``resample.conv``);
    * ``{encoder,decoder}.mid_block.resnets.0 / attentions.0 / resnets.1`` -> ``mid.res_a / attn / res_b``;
    * ``quant_conv`` -> ``quant_proj``, ``quantize.embedding.weight`` -> ``codebook.weight``,
      ``post_quant_conv`` -> ``post_quant_proj``.
    """
    ch = config.block_out_channels
    levels = config.num_levels
    key_map: dict[str, str] = {}

    # encoder
    key_map.update(_params("encoder.conv_in", "encoder.stem"))
    for i in range(levels):
        src, dst = f"encoder.down_blocks.{i}", f"encoder.levels.{i}"
        in_ch = ch[max(i - 1, 0)]
        for j in range(config.layers_per_block):
            shortcut = j == 0 and in_ch != ch[i]
            key_map.update(_resblock(f"{src}.resnets.{j}", f"{dst}.res_blocks.{j}", shortcut))
            if config.encoder_attention[i]:
                key_map.update(_attention(f"{src}.attentions.{j}", f"{dst}.attn_blocks.{j}"))
        if i < levels - 1:
            key_map.update(_params(f"{src}.downsamplers.0.conv", f"{dst}.resample.conv"))
    key_map.update(_mid("encoder.mid_block", "encoder.mid", config.mid_attention))
    key_map.update(_params("encoder.conv_norm_out", "encoder.out_norm"))
    key_map.update(_params("encoder.conv_out", "encoder.out_conv"))

    # quantiser
    key_map.update(_params("quant_conv", "quant_proj"))
    key_map["quantize.embedding.weight"] = "codebook.weight"
    key_map.update(_params("post_quant_conv", "post_quant_proj"))

    # decoder
    key_map.update(_params("decoder.conv_in", "decoder.stem"))
    key_map.update(_mid("decoder.mid_block", "decoder.mid", config.mid_attention))
    for i in range(levels):
        src, dst = f"decoder.up_blocks.{levels - 1 - i}", f"decoder.levels.{i}"
        in_ch = ch[min(i + 1, levels - 1)]
        for j in range(config.layers_per_block + 1):
            shortcut = j == 0 and in_ch != ch[i]
            key_map.update(_resblock(f"{src}.resnets.{j}", f"{dst}.res_blocks.{j}", shortcut))
            if config.decoder_attention[i]:
                key_map.update(_attention(f"{src}.attentions.{j}", f"{dst}.attn_blocks.{j}"))
        if i > 0:
            key_map.update(_params(f"{src}.upsamplers.0.conv", f"{dst}.resample.conv"))
    key_map.update(_params("decoder.conv_norm_out", "decoder.out_norm"))
    key_map.update(_params("decoder.conv_out", "decoder.out_conv"))
    return key_map


def _vqvae_shapes(config: VQVAEConfig) -> dict[str, torch.Size]:
    """State-dict shapes of ``VQVAE(config)``, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = VQVAE(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def vqvae_state_dict_from_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: VQVAEConfig
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``VQModel`` state dict for ``VQVAE(config)``; load the result with ``strict=True``.

    Raises :class:`~vqdiffusion.formats.keymap.ConversionError` on an unmapped, missing or mis-shaped key.
    """
    return convert_state_dict(
        state_dict,
        diffusers_to_vqvae_key_map(config),
        _vqvae_shapes(config),
        source_name="diffusers VQModel state dict",
    )


def vqvae_state_dict_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: VQVAEConfig
) -> dict[str, torch.Tensor]:
    """Rename a ``VQVAE(config)`` state dict for diffusers' ``VQModel(**vqvae_config_to_diffusers(config))``.

    The diffusers tensors have the same shapes as ours, so the expected shapes come from our model.
    """
    key_map = diffusers_to_vqvae_key_map(config)
    ours = _vqvae_shapes(config)
    target_shapes = {src: ours[dst] for src, dst in key_map.items()}
    return convert_state_dict(state_dict, invert_key_map(key_map), target_shapes, source_name="VQVAE state dict")
