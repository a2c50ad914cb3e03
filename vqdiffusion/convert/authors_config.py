"""The authors' YAML training config, parsed into the sizes and settings a conversion needs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import ConfigError
from ..models.denoiser import DenoiserConfig
from .authors_files import config_section

_MODULE = "image_synthesis.modeling."


TRANSFORMER_VARIANTS = {
    _MODULE + "transformers.transformer_utils.Text2ImageTransformer": "text",
    _MODULE + "transformers.transformer_utils.Condition2ImageTransformer": "class",
    _MODULE + "transformers.transformer_utils.UnCondition2ImageTransformer": "none",
}


_ATTN_TYPES = {"text": "selfcross", "class": "selfcondition", "none": "self"}


_DEFAULT_MLP = {"text": "fc", "class": "conv_mlp", "none": "conv_mlp"}  # the classes' own defaults


_CODECS = {
    "ema_vqvae.PatchVQVAE",
    "taming_gumbel_vqvae.TamingVQVAE",
    "taming_gumbel_vqvae.TamingFFHQVQVAE",
    "taming_gumbel_vqvae.TamingGumbelVQVAE",
}


@dataclasses.dataclass(frozen=True)
class AuthorsConfig:
    """What the conversion needs from an authors' YAML (``model.params``)."""

    variant: str  # "text", "class" or "none"
    denoiser: DenoiserConfig  # num_class_labels = the YAML's class_number (the checkpoint may add the null row)
    learnable_cf: bool
    codec: str  # e.g. "ema_vqvae.PatchVQVAE"
    token_shape: tuple[int, int]
    quantize_number: int
    mapping_path: str | None
    text_pad_value: int
    training: dict[str, Any]  # diffusion settings under our DenoiserTrainConfig names


def _get(params: dict[str, Any], key: str, default: Any, where: str, kind: type | tuple[type, ...]) -> Any:
    value = params.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: {key}={value!r} has the wrong type (expected {kind})")
    return value


def parse_authors_config(data: dict[str, Any], where: str = "authors' config") -> AuthorsConfig:
    """Read the model, codec and diffusion settings of an authors' YAML (already parsed)."""
    model = config_section(data, "model.params", where)
    diffusion = config_section(model, "diffusion_config.params", f"{where}: model.params")
    transformer = config_section(diffusion, "transformer_config", f"{where}: diffusion_config.params")
    target = transformer.get("target")
    if target not in TRANSFORMER_VARIANTS:
        raise ConfigError(f"{where}: transformer target {target!r} is not one of {sorted(TRANSFORMER_VARIANTS)}")
    variant = TRANSFORMER_VARIANTS[target]
    tp = dict(transformer.get("params") or {})
    tw = f"{where}: transformer_config.params"
    if tp.get("attn_type", _ATTN_TYPES[variant]) != _ATTN_TYPES[variant]:
        raise ConfigError(f"{tw}: attn_type={tp.get('attn_type')!r}; {target} needs {_ATTN_TYPES[variant]!r}")
    timestep_type = tp.get("timestep_type", "adalayernorm")
    if "adalayernorm" not in str(timestep_type) or "abs" in str(timestep_type):
        raise ConfigError(
            f"{tw}: timestep_type={timestep_type!r} is not supported; only the learned step table "
            "'adalayernorm' (every published model) converts"
        )
    activation = {"GELU2": "gelu2", "GELU": "gelu"}.get(tp.get("block_activate"))
    if activation is None:
        raise ConfigError(f"{tw}: block_activate={tp.get('block_activate')!r}; expected GELU or GELU2")
    mlp = {"fc": "linear", "conv_mlp": "conv"}.get(tp.get("mlp_type", _DEFAULT_MLP[variant]))
    if mlp is None:
        raise ConfigError(f"{tw}: mlp_type={tp.get('mlp_type')!r}; expected 'fc' or 'conv_mlp'")
    content = config_section(diffusion, "content_emb_config.params", f"{where}: diffusion_config.params")
    seq_len = _get(tp, "content_seq_len", 1024, tw, int)
    spatial = tp.get("content_spatial_size")
    if spatial is None:
        side = math.isqrt(seq_len)
        spatial = [side, side]
    height, width = (int(x) for x in spatial)
    if height * width != seq_len:
        raise ConfigError(f"{tw}: content_spatial_size {spatial} does not hold content_seq_len={seq_len} tokens")
    dim = _get(tp, "n_embd", None, tw, int)
    if content.get("embed_dim") != dim:
        raise ConfigError(f"{where}: content_emb_config embed_dim={content.get('embed_dim')} != n_embd={dim}")
    if content.get("pos_emb_type", "embedding") != "embedding":
        raise ConfigError(f"{where}: content_emb_config pos_emb_type={content.get('pos_emb_type')!r} is not supported")
    grid = content.get("spatial_size", [32, 32])
    grid = (int(grid), int(grid)) if isinstance(grid, int) else tuple(int(g) for g in grid)
    class_labels = None
    if variant == "class":
        if tp.get("class_type", "adalayernorm") != "adalayernorm":
            raise ConfigError(f"{tw}: class_type={tp.get('class_type')!r}; only 'adalayernorm' converts")
        class_labels = _get(tp, "class_number", 1000, tw, int)
    steps = _get(diffusion, "diffusion_step", 100, f"{where}: diffusion_config.params", int)
    if diffusion.get("alpha_init_type", "cos") != "alpha1":
        raise ConfigError(f"{where}: alpha_init_type={diffusion.get('alpha_init_type')!r}; only 'alpha1' exists")
    denoiser = DenoiserConfig(
        num_classes=_get(content, "num_embed", None, f"{where}: content_emb_config.params", int),
        height=height,
        width=width,
        num_layers=_get(tp, "n_layer", None, tw, int),
        dim=dim,
        num_heads=_get(tp, "n_head", None, tw, int),
        cond_dim=_get(tp, "condition_dim", 512, tw, int) if variant == "text" else None,
        num_timesteps=steps,
        mlp_ratio=float(tp.get("mlp_hidden_times", 4)),
        activation=activation,
        attention_bias=True,
        norm_eps=1e-5,
        mlp_type=mlp,
        num_class_labels=class_labels,
        position_grid=None if grid == (height, width) else grid,
    )
    if variant == "text":
        emb = config_section(diffusion, "condition_emb_config.params", f"{where}: diffusion_config.params")
        for key, need in (("normalize", True), ("pick_last_embedding", False), ("additional_last_embedding", False)):
            if bool(emb.get(key, {"normalize": True}.get(key, False))) != need:
                raise ConfigError(
                    f"{where}: condition_emb_config {key}={emb.get(key)!r} is not supported (need {need})"
                )
        if int(emb.get("embed_dim", 512)) == 1024:
            raise ConfigError(
                f"{where}: condition_emb_config embed_dim=1024 (duplicated CLIP features) is not supported"
            )
        if int(tp.get("condition_seq_len", 77)) != 77:
            raise ConfigError(f"{tw}: condition_seq_len={tp.get('condition_seq_len')}; the CLIP condition has 77")
    codec_cfg = config_section(model, "content_codec_config", f"{where}: model.params")
    codec_target = str(codec_cfg.get("target", ""))
    codec = codec_target.rsplit(".", 2)[-2] + "." + codec_target.rsplit(".", 1)[-1] if "." in codec_target else ""
    if codec not in _CODECS:
        raise ConfigError(f"{where}: content codec {codec_target!r} is not one of {sorted(_CODECS)}")
    cp = dict(codec_cfg.get("params") or {})
    token_shape = tuple(int(x) for x in cp.get("token_shape", (height, width)))
    if token_shape != (height, width):
        raise ConfigError(f"{where}: codec token_shape {list(token_shape)} != transformer grid [{height}, {width}]")
    quantize_number = int(cp.get("quantize_number", 0) or 0)
    mapping = cp.get("mapping_path")
    pad = 0
    if variant == "text":
        pad = int(model.get("condition_codec_config", {}).get("params", {}).get("pad_value", 0))
    mask_weight = diffusion.get("mask_weight", [1, 1])
    training = {
        "num_timesteps": steps,
        "schedule": "alpha1 (abar 0.99999 -> 0.000009, gbar 0.000009 -> 0.99999)",
        "aux_weight": float(diffusion.get("auxiliary_loss_weight", 0.0)),
        "adaptive_aux": bool(diffusion.get("adaptive_auxiliary_loss", False)),
        "mask_weight": [float(w) for w in mask_weight],
    }
    return AuthorsConfig(
        variant=variant,
        denoiser=denoiser,
        learnable_cf=bool(diffusion.get("learnable_cf", False) or model.get("learnable_cf", False)),
        codec=codec,
        token_shape=token_shape,  # type: ignore[arg-type]
        quantize_number=quantize_number,
        mapping_path=None if mapping in (None, "None") else str(mapping),
        text_pad_value=pad,
        training=training,
    )
