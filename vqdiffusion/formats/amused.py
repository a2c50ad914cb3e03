"""aMUSEd checkpoints in diffusers' layout, read (and written back) without diffusers.

The layout is what ``diffusers.AmusedPipeline.save_pretrained`` writes (``amused/amused-256``,
``amused/amused-512``): ``model_index.json`` naming ``AmusedPipeline``, ``transformer/`` (``UVit2DModel``),
``vqvae/`` (``VQModel``, f = 16, 8192 codes, decoding to images in [0, 1]), ``text_encoder/``
(``CLIPTextModelWithProjection``), ``tokenizer/`` and ``scheduler/`` (``AmusedScheduler``: ``mask_token_id``,
``masking_schedule``).  Weights are ``diffusion_pytorch_model[.<variant>].safetensors`` (or the legacy
``.bin``, read with ``torch.load(weights_only=True)``); every key is mapped explicitly and shape-checked
(:func:`uvit_state_dict_from_diffusers`, :mod:`.diffusers_vqvae`) and loaded strictly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, read_json_object
from ..io import atomic_write_text, load_module, save_safetensors
from ..models.pooled_text import CLIPPooledTextCondition
from ..models.uvit import UVit, UVitConfig, uvit_part_counts
from ..models.vqvae import VQVAE, vqvae_part_counts
from .diffusers_vqvae import (
    vqvae_config_from_diffusers,
    vqvae_config_to_diffusers,
    vqvae_state_dict_from_diffusers,
    vqvae_state_dict_to_diffusers,
)
from .keymap import ConversionError, convert_state_dict, invert_key_map

__all__ = [
    "AMUSED_PIPELINE",
    "MASKING_SCHEDULES",
    "AmusedComponents",
    "diffusers_to_uvit_key_map",
    "find_variant_weights",
    "is_amused_folder",
    "load_amused",
    "save_amused",
    "uvit_config_from_diffusers",
    "uvit_config_to_diffusers",
    "uvit_state_dict_from_diffusers",
    "uvit_state_dict_to_diffusers",
]

AMUSED_PIPELINE = "AmusedPipeline"
INDEX_FILE = "model_index.json"
DIFFUSERS_VERSION = "0.42.1"
MASKING_SCHEDULES = ("cosine", "linear")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
WEIGHTS = "diffusion_pytorch_model.safetensors"
# aMUSEd's sampling defaults (diffusers' AmusedPipeline.__call__).
DEFAULT_STEPS = 12
DEFAULT_GUIDANCE_SCALE = 10.0
DEFAULT_TEMPERATURE = (2.0, 0.0)

# UVit2DModel.__init__ arguments and their defaults (diffusers 0.42).
_UVIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "use_bias": False,
    "hidden_dropout": 0.0,
    "cond_embed_dim": 768,
    "micro_cond_encode_dim": 256,
    "micro_cond_embed_dim": 1280,
    "encoder_hidden_size": 768,
    "vocab_size": 8256,
    "codebook_size": 8192,
    "in_channels": 768,
    "block_out_channels": 768,
    "num_res_blocks": 3,
    "downsample": False,
    "upsample": False,
    "block_num_heads": 12,
    "num_hidden_layers": 22,
    "num_attention_heads": 16,
    "attention_dropout": 0.0,
    "intermediate_size": 2816,
    "layer_norm_eps": 1e-6,
    "ln_elementwise_affine": True,
    "sample_size": 64,
}
# Training-only keys: dropout does nothing at inference.
_IGNORED_UVIT_KEYS = ("hidden_dropout", "attention_dropout")


# ---------------------------------------------------------------------------------------------------------
# Transformer config and key map
# ---------------------------------------------------------------------------------------------------------
def uvit_config_from_diffusers(config: Mapping[str, Any], *, mask_token_id: int | None = None) -> UVitConfig:
    """A :class:`UVitConfig` from a ``UVit2DModel`` config.json (``_``-keys skipped, missing keys take
    diffusers' defaults); ``mask_token_id`` comes from the scheduler config.  ConfigError on unknown keys."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"diffusers UVit2DModel config must be a mapping, got {type(config).__name__}")
    given = {k: v for k, v in config.items() if not str(k).startswith("_")}
    unknown = sorted(set(given) - set(_UVIT_DEFAULTS))
    if unknown:
        raise ConfigError(f"diffusers UVit2DModel config: unknown key(s) {unknown}")
    cfg = {k: v for k, v in {**_UVIT_DEFAULTS, **given}.items() if k not in _IGNORED_UVIT_KEYS}
    return UVitConfig(**cfg, mask_token_id=mask_token_id)


def uvit_config_to_diffusers(config: UVitConfig) -> dict[str, Any]:
    """``UVit2DModel`` init arguments equivalent to ``config`` (the mask token goes to the scheduler)."""
    out = {k: v for k, v in config.to_dict().items() if k != "mask_token_id"}
    return {**out, "hidden_dropout": 0.0, "attention_dropout": 0.0}


def _stage_pairs(src: str, dst: str, config: UVitConfig, *, down: bool, up: bool) -> list[tuple[str, str]]:
    pairs = []
    if down:
        pairs += [(f"{src}.downsample.norm", f"{dst}.down.norm"), (f"{src}.downsample.conv", f"{dst}.down.conv")]
    for j in range(config.num_res_blocks):
        res, ours = f"{src}.res_blocks.{j}", f"{dst}.res_blocks.{j}"
        pairs += [
            (f"{res}.depthwise", f"{ours}.depthwise"),
            (f"{res}.norm", f"{ours}.norm"),
            (f"{res}.channelwise_linear_1", f"{ours}.mlp_in"),
            (f"{res}.channelwise_norm", f"{ours}.grn"),
            (f"{res}.channelwise_linear_2", f"{ours}.mlp_out"),
            (f"{res}.cond_embeds_mapper", f"{ours}.modulation"),
        ]
        att, ours = f"{src}.attention_blocks.{j}", f"{dst}.attn_blocks.{j}"
        pairs += [(f"{att}.kv_mapper", f"{ours}.context_proj"), (f"{att}.norm1", f"{ours}.norm_a")]
        pairs += _attention_pairs(f"{att}.attn1", f"{ours}.attn_a")
        pairs += [(f"{att}.norm2", f"{ours}.norm_b")]
        pairs += _attention_pairs(f"{att}.attn2", f"{ours}.attn_b")
    if up:
        pairs += [(f"{src}.upsample.norm", f"{dst}.up.norm"), (f"{src}.upsample.conv", f"{dst}.up.conv")]
    return pairs


def _attention_pairs(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.{n}", f"{dst}.{n}") for n in ("to_q", "to_k", "to_v")] + [(f"{src}.to_out.0", f"{dst}.to_out")]


def _module_pairs(config: UVitConfig) -> list[tuple[str, str]]:
    """(diffusers module, our module) for every module holding parameters."""
    pairs = [
        ("encoder_proj", "context_proj"),
        ("encoder_proj_layer_norm", "context_norm"),
        ("cond_embed.linear_1", "cond_in"),
        ("cond_embed.linear_2", "cond_out"),
        ("embed.embeddings", "token_embedding"),
        ("embed.layer_norm", "embed_norm"),
        ("embed.conv", "embed_proj"),
        ("project_to_hidden_norm", "in_norm"),
        ("project_to_hidden", "in_proj"),
        ("project_from_hidden_norm", "out_norm"),
        ("project_from_hidden", "out_proj"),
        ("mlm_layer.conv1", "head_proj"),
        ("mlm_layer.layer_norm", "head_norm"),
        ("mlm_layer.conv2", "head"),
    ]
    pairs += _stage_pairs("down_block", "down", config, down=config.downsample, up=False)
    pairs += _stage_pairs("up_block", "up", config, down=False, up=config.upsample)
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer_layers.{i}", f"layers.{i}"
        pairs += [
            (f"{src}.norm1.linear", f"{dst}.norm_self.modulation"),
            (f"{src}.norm1.norm", f"{dst}.norm_self.norm"),
            (f"{src}.norm2.linear", f"{dst}.norm_cross.modulation"),
            (f"{src}.norm2.norm", f"{dst}.norm_cross.norm"),
            (f"{src}.norm3.linear", f"{dst}.norm_mlp.modulation"),
            (f"{src}.norm3.norm", f"{dst}.norm_mlp.norm"),
            (f"{src}.ff.net.0.proj", f"{dst}.mlp_in"),
            (f"{src}.ff.net.2", f"{dst}.mlp_out"),
        ]
        pairs += _attention_pairs(f"{src}.attn1", f"{dst}.self_attn")
        pairs += _attention_pairs(f"{src}.attn2", f"{dst}.cross_attn")
    return pairs


# 1x1 convolutions of diffusers that are Linear layers here: [out, in, 1, 1] <-> [out, in].
_CONV_AS_LINEAR = ("embed.conv.weight", "mlm_layer.conv1.weight", "mlm_layer.conv2.weight")


def _uvit_shapes(config: UVitConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = UVit(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def diffusers_to_uvit_key_map(config: UVitConfig) -> dict[str, str]:
    """Explicit map from every ``UVit2DModel`` state-dict key to the :class:`UVit` key holding that tensor.

    Module families (``i`` layer, ``j`` block; every parameter of a module keeps its name):
    ``encoder_proj[_layer_norm]`` -> ``context_proj`` / ``context_norm``; ``cond_embed.linear_{1,2}`` ->
    ``cond_in`` / ``cond_out``; ``embed.{embeddings,layer_norm,conv}`` -> ``token_embedding`` /
    ``embed_norm`` / ``embed_proj``; ``{down,up}_block.{downsample,upsample}`` -> ``{down,up}.{down,up}``;
    ``..res_blocks.j.{depthwise,norm,channelwise_linear_1,channelwise_norm,channelwise_linear_2,
    cond_embeds_mapper}`` -> ``..res_blocks.j.{depthwise,norm,mlp_in,grn,mlp_out,modulation}``;
    ``..attention_blocks.j.{kv_mapper,norm1,attn1,norm2,attn2}`` -> ``..attn_blocks.j.{context_proj,norm_a,
    attn_a,norm_b,attn_b}``; ``project_{to,from}_hidden[_norm]`` -> ``{in,out}_{proj,norm}``;
    ``transformer_layers.i.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}`` -> ``layers.i.{norm_self,
    self_attn,norm_cross,cross_attn,norm_mlp,mlp_in,mlp_out}`` (AdaLN ``linear`` -> ``modulation``);
    attention ``to_out.0`` -> ``to_out``; ``mlm_layer.{conv1,layer_norm,conv2}`` -> ``head_proj`` /
    ``head_norm`` / ``head``.  The three 1x1 convs (``embed.conv``, ``mlm_layer.conv1/2``) are Linear here.
    """
    ours = _uvit_shapes(config)
    pairs = _module_pairs(config)
    key_map: dict[str, str] = {}
    for key in ours:
        prefix, _, name = key.rpartition(".")
        src = next((s for s, d in pairs if d == prefix), None)
        if src is None:
            raise ConversionError(f"UVit key {key!r} has no diffusers counterpart in the key map")
        key_map[f"{src}.{name}"] = key
    return key_map


def _squeeze_1x1(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], tensor.shape[1]) if tensor.ndim == 4 else tensor


def uvit_state_dict_from_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: UVitConfig
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UVit2DModel`` state dict for ``UVit(config)``; ConversionError on any mismatch."""
    return convert_state_dict(
        state_dict,
        diffusers_to_uvit_key_map(config),
        _uvit_shapes(config),
        transforms={key: _squeeze_1x1 for key in _CONV_AS_LINEAR if key in state_dict},
        source_name="diffusers UVit2DModel state dict",
    )


def uvit_state_dict_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: UVitConfig) -> dict[str, torch.Tensor]:
    """Rename a ``UVit(config)`` state dict for diffusers' ``UVit2DModel(**uvit_config_to_diffusers(config))``."""
    key_map = diffusers_to_uvit_key_map(config)
    ours = _uvit_shapes(config)
    shapes = {src: ours[dst] for src, dst in key_map.items()}
    for key in _CONV_AS_LINEAR:
        shapes[key] = torch.Size([*shapes[key], 1, 1])
    transforms = {key_map[k]: (lambda t: t[:, :, None, None]) for k in _CONV_AS_LINEAR}
    return convert_state_dict(
        state_dict, invert_key_map(key_map), shapes, transforms=transforms, source_name="UVit state dict"
    )


# ---------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AmusedComponents:
    """The parts of an aMUSEd checkpoint.

    ``transformer``: the time-agnostic masked model; ``vqvae``: decodes [B, h, w] codes to images in
    **[0, 1]** (``decode_tokens(tokens, clamp=False).clamp(0, 1)``; aMUSEd's VQ is not trained on [-1, 1]);
    ``text_encoder``: prompts -> (penultimate hidden states, pooled); ``mask_token_id``: the transformer's
    [MASK] embedding row; ``masking_schedule``: "cosine" or "linear" (the fraction still masked after step
    i of S is cos(pi/2 * (i+1)/S), resp. 1 - (i+1)/S).
    """

    transformer: UVit
    vqvae: VQVAE
    text_encoder: CLIPPooledTextCondition
    mask_token_id: int
    masking_schedule: str = "cosine"
    force_upcast: bool = False

    @property
    def token_shape(self) -> tuple[int, int]:
        """(h, w) of the trained token grid."""
        side = self.transformer.config.sample_size
        return side, side

    @property
    def image_size(self) -> int:
        """The trained image side (token side x the VQ's downsampling factor)."""
        return self.transformer.config.sample_size * self.vqvae.config.downsample_factor


def is_amused_folder(root: str | os.PathLike) -> bool:
    """True when ``root/model_index.json`` names an ``AmusedPipeline``."""
    index = Path(root) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return read_json_object(index).get("_class_name") == AMUSED_PIPELINE
    except (ConfigError, OSError):
        return False


def find_variant_weights(folder: Path, variant: str | None) -> Path:
    """``<stem>.<variant>.safetensors`` (then ``.bin``) when ``variant`` is given and present, else the plain
    ``<stem>.safetensors`` / ``.bin``; FileNotFoundError naming what was looked for."""
    names = [f"{stem}.{variant}" for stem in WEIGHT_STEMS] if variant else []
    names += list(WEIGHT_STEMS)
    for name in names:
        for suffix in (".safetensors", ".bin"):
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    raise FileNotFoundError(f"no weights in {folder}: looked for {[n + '.safetensors' for n in names]} (and .bin)")


def load_amused(
    root: str | os.PathLike, *, dtype: torch.dtype | None = None, variant: str | None = None
) -> AmusedComponents:
    """Read a diffusers-layout aMUSEd folder into :class:`AmusedComponents`.

    ``dtype`` casts the transformer and the text encoder (and the VQ-VAE, unless its config says
    ``force_upcast`` and ``dtype`` is a half type: it then stays float32, as diffusers decodes it).
    ``variant`` (e.g. "fp16") prefers ``<stem>.<variant>.safetensors`` in each folder.
    """
    root = Path(root)
    index = read_json_object(root / INDEX_FILE)
    if index.get("_class_name") != AMUSED_PIPELINE:
        raise ValueError(f"{root / INDEX_FILE} describes a {index.get('_class_name')!r}, not an {AMUSED_PIPELINE}")
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_path)
    mask_token_id = scheduler.get("mask_token_id")
    masking = scheduler.get("masking_schedule", "cosine")
    if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool):
        raise ConfigError(f"{scheduler_path}: mask_token_id must be an integer, got {mask_token_id!r}")
    if masking not in MASKING_SCHEDULES:
        raise ConfigError(f"{scheduler_path}: masking_schedule must be one of {MASKING_SCHEDULES}, got {masking!r}")

    uvit_cfg = uvit_config_from_diffusers(
        read_json_object(root / "transformer" / "config.json"), mask_token_id=mask_token_id
    )
    transformer = load_module(
        lambda: UVit(uvit_cfg),
        find_variant_weights(root / "transformer", variant),
        f"{root}/transformer",
        convert=lambda state: uvit_state_dict_from_diffusers(state, uvit_cfg),
        counts=uvit_part_counts(uvit_cfg),
    )
    vq_json = read_json_object(root / "vqvae" / "config.json")
    force_upcast = bool(vq_json.get("force_upcast", False))
    vq_cfg = vqvae_config_from_diffusers(vq_json)
    # diffusers' VQModel sample_size is not the image side aMUSEd generates; ours is (token side x f).
    vq_cfg = dataclasses.replace(vq_cfg, sample_size=uvit_cfg.sample_size * vq_cfg.downsample_factor)
    if vq_cfg.num_embeddings != uvit_cfg.codebook_size:
        raise ConfigError(
            f"{root}: the transformer predicts {uvit_cfg.codebook_size} codes but the VQ-VAE has "
            f"{vq_cfg.num_embeddings}; the folder mixes two models"
        )
    vqvae = load_module(
        lambda: VQVAE(vq_cfg),
        find_variant_weights(root / "vqvae", variant),
        f"{root}/vqvae",
        convert=lambda state: vqvae_state_dict_from_diffusers(state, vq_cfg),
        counts=vqvae_part_counts(vq_cfg),
    )
    text = CLIPPooledTextCondition.from_pretrained(
        root / "text_encoder", root / "tokenizer", dtype=dtype, variant=_text_variant(root / "text_encoder", variant)
    )
    if text.hidden_size != uvit_cfg.encoder_hidden_size or text.projection_dim != uvit_cfg.cond_embed_dim:
        raise ConfigError(
            f"{root}: the text encoder gives hidden states of width {text.hidden_size} and a pooled embedding of "
            f"{text.projection_dim}, the transformer reads {uvit_cfg.encoder_hidden_size} and {uvit_cfg.cond_embed_dim}"
        )
    if dtype is not None:
        transformer = transformer.to(dtype)
        keep_float32 = force_upcast and dtype in (torch.float16, torch.bfloat16)
        vqvae = vqvae.float() if keep_float32 else vqvae.to(dtype)
    return AmusedComponents(
        transformer=transformer.eval(),
        vqvae=vqvae.eval(),
        text_encoder=text,
        mask_token_id=mask_token_id,
        masking_schedule=masking,
        force_upcast=force_upcast,
    )


def _text_variant(folder: Path, variant: str | None) -> str | None:
    """``variant`` when the text encoder folder has weights of that variant, else None (the plain weights)."""
    if variant and any(folder.glob(f"model.{variant}.*")):
        return variant
    return None


def _write_config(path: Path, class_name: str, config: dict[str, Any]) -> None:
    data = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_amused(components: AmusedComponents, path: str | os.PathLike) -> Path:
    """Write ``components`` as a diffusers-layout aMUSEd folder (``AmusedPipeline.from_pretrained`` reads it)."""
    root = Path(path)
    uvit_cfg = components.transformer.config
    _write_config(root / "transformer" / "config.json", "UVit2DModel", uvit_config_to_diffusers(uvit_cfg))
    save_safetensors(
        uvit_state_dict_to_diffusers(components.transformer.state_dict(), uvit_cfg), root / "transformer" / WEIGHTS
    )
    vq_cfg = components.vqvae.config
    vq_json = {
        **vqvae_config_to_diffusers(vq_cfg),
        "lookup_from_codebook": True,
        "force_upcast": components.force_upcast,
    }
    _write_config(root / "vqvae" / "config.json", "VQModel", vq_json)
    save_safetensors(vqvae_state_dict_to_diffusers(components.vqvae.state_dict(), vq_cfg), root / "vqvae" / WEIGHTS)
    _write_config(
        root / "scheduler" / "scheduler_config.json",
        "AmusedScheduler",
        {"mask_token_id": components.mask_token_id, "masking_schedule": components.masking_schedule},
    )
    components.text_encoder.save_pretrained(root / "text_encoder", root / "tokenizer")
    index = {
        "scheduler": ["diffusers", "AmusedScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "UVit2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    }
    _write_config(root / INDEX_FILE, AMUSED_PIPELINE, index)
    return root
