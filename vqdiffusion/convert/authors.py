"""The authors' VQ-Diffusion checkpoints (``microsoft/VQ-Diffusion`` ``.pth`` files) -> our pipeline.

A checkpoint is what their ``Solver.save`` writes: ``{"model": DALLE.state_dict(), "ema": the
DiffusionTransformer's EMA state dict, "last_epoch", "last_iter", "clip_grad_norm",
"optimizer_and_scheduler"}``.  Its architecture is described by the YAML it was trained with
(``configs/ithq.yaml``, ``OUTPUT/pretrained_model/config_text.yaml``, ``config_imagenet.yaml``, ...).

Variants (the transformer ``target`` of the YAML):

* ``Text2ImageTransformer`` (ITHQ, COCO, CUB, CC): blocks AdaLN -> self-attn, AdaLN -> cross-attn to
  CLIP, LayerNorm -> MLP; the CLIP ViT-B/32 text encoder is stored in the checkpoint in OpenAI's layout
  (``condition_emb.*``) and becomes a ``transformers.CLIPTextModel``; ``empty_text_embed`` [77, 512] is the
  learned null text of Improved VQ-Diffusion.
* ``Condition2ImageTransformer`` (ImageNet): no cross-attention; the class enters every block through an
  AdaLN of the MLP input over a per-block label table (``ln2.emb`` [class_number, D]).  The learnable-
  guidance checkpoint has 1001 rows (label 1000 = null; the authors' ``imagenet_cf=True``).  For a
  1000-row checkpoint, the authors' AdaLN uses the mean of the rows for label 1000 (what their guidance
  feeds); the converted table gets that mean as row 1000, so both have the same null class.
* ``UnCondition2ImageTransformer`` (FFHQ): AdaLN -> self-attn, LayerNorm -> MLP.

Every key of the checkpoint is either mapped (explicit key maps, shapes checked) or listed as ignored with
a reason (optimizer, step counters, loss history, buffers recomputed from the schedule after checking
them, the unused causal mask of the cross-attention, CLIP's text projection).  Anything else stops the
conversion with a :class:`~vqdiffusion.formats.keymap.ConversionError` naming the key.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..diffusion import MaskReplaceSchedule
from ..formats.keymap import ConversionError, convert_state_dict
from ..io import atomic_write_text
from ..models.conditions import CLIPTextCondition, LearnedNullCondition
from ..models.denoiser import Denoiser, DenoiserConfig
from .authors_files import StateDict, config_section, load_authors_checkpoint, read_authors_yaml, tensor_dict
from .authors_vqvae import canonical_vqvae_state, used_code_table, vqvae_from_taming

logger = logging.getLogger(__name__)

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
# Top-level entries of a training checkpoint that are not weights.
_IGNORED_TOP = {
    "last_epoch": "step counter",
    "last_iter": "step counter",
    "epoch": "step counter",
    "optimizer_and_scheduler": "optimizer and learning-rate scheduler state",
    "optimizer": "optimizer state",
    "clip_grad_norm": "gradient-clipping state",
}
# DiffusionTransformer buffers: the schedule in log space (checked against ours, then dropped) and the
# importance sampler's loss history.
_SCHEDULE_BUFFERS = (
    "log_at",
    "log_bt",
    "log_ct",
    "log_cumprod_at",
    "log_cumprod_bt",
    "log_cumprod_ct",
    "log_1_min_ct",
    "log_1_min_cumprod_ct",
)
_LOSS_HISTORY = ("Lt_history", "Lt_count")


# ---------------------------------------------------------------------------------------------------
# The YAML
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Denoiser
# ---------------------------------------------------------------------------------------------------
def authors_to_denoiser_key_map(config: DenoiserConfig) -> dict[str, str]:
    """Explicit key map: the authors' DiffusionTransformer keys (``transformer.*``) -> our Denoiser keys."""
    km = {
        "transformer.content_emb.emb.weight": "token_embedding.weight",
        "transformer.content_emb.height_emb.weight": "row_embedding.weight",
        "transformer.content_emb.width_emb.weight": "col_embedding.weight",
        "transformer.to_logits.0.weight": "norm_out.weight",
        "transformer.to_logits.0.bias": "norm_out.bias",
        "transformer.to_logits.1.weight": "head.weight",
        "transformer.to_logits.1.bias": "head.bias",
    }
    kind = config.condition_kind
    proj = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj", "to_out"))

    def adaln(src: str, dst: str) -> None:
        km[f"{src}.emb.weight"] = f"{dst}.timestep_embedding.weight"
        km[f"{src}.linear.weight"] = f"{dst}.modulation.weight"
        km[f"{src}.linear.bias"] = f"{dst}.modulation.bias"

    for i in range(config.num_layers):
        src, dst = f"transformer.blocks.{i}", f"blocks.{i}"
        adaln(f"{src}.ln1", f"{dst}.norm_self")
        attn_parts = [("attn1", "self_attn")] if kind == "text" else [("attn", "self_attn")]
        if kind == "text":
            adaln(f"{src}.ln1_1", f"{dst}.norm_cross")
            attn_parts.append(("attn2", "cross_attn"))
        for theirs, ours in attn_parts:
            for a, b in proj:
                for p in ("weight", "bias"):
                    km[f"{src}.{theirs}.{a}.{p}"] = f"{dst}.{ours}.{b}.{p}"
        if kind == "class":
            adaln(f"{src}.ln2", f"{dst}.norm_mlp")
        else:
            for p in ("weight", "bias"):
                km[f"{src}.ln2.{p}"] = f"{dst}.norm_mlp.{p}"
        mlp = (("0", "0"), ("2", "2")) if config.mlp_type == "linear" else (("conv1", "in_conv"), ("conv2", "out_conv"))
        for a, b in mlp:
            for p in ("weight", "bias"):
                km[f"{src}.mlp.{a}.{p}"] = f"{dst}.mlp.{b}.{p}"
    return km


def _check_schedule(state: StateDict, schedule: MaskReplaceSchedule, where: str) -> None:
    """The checkpoint's log-space schedule buffers must be the alpha1 schedule with this T and K."""
    T = schedule.num_timesteps
    abar, bbar, gbar = schedule.cumulative
    expected = {
        "log_cumprod_at": torch.tensor(abar, dtype=torch.float64).log(),
        "log_cumprod_ct": torch.tensor(gbar, dtype=torch.float64).log(),
        "log_cumprod_bt": torch.tensor(bbar, dtype=torch.float64).clamp_min(1e-300).log(),
    }
    for key, want in expected.items():
        if key not in state:
            continue
        got = state[key]
        if got.ndim != 1 or got.shape[0] != T + 1:
            raise ConversionError(
                f"{where}: {key} has shape {tuple(got.shape)} but the config's diffusion_step T={T} needs "
                f"({T + 1},): the config does not match the checkpoint"
            )
        if not torch.allclose(got[:T].double(), want, atol=1e-3, rtol=1e-4):
            raise ConversionError(
                f"{where}: {key} does not match the alpha1 schedule with T={T}, K={schedule.num_classes} "
                "(the config does not match the checkpoint)"
            )


def _class_table_rows(state: StateDict, config: DenoiserConfig, where: str) -> tuple[int, bool]:
    """(rows in the checkpoint's label tables, whether a null row must be appended as their mean)."""
    key = "transformer.blocks.0.ln2.emb.weight"
    if key not in state:
        raise ConversionError(f"{where}: expected key {key!r} (class AdaLN table) is missing")
    rows = int(state[key].shape[0])
    declared = config.num_class_labels or 0
    if rows == declared + 1:
        logger.info(
            "%s: %d label rows for class_number=%d: the learnable null class (imagenet_cf)", where, rows, declared
        )
        return rows, False
    if rows != declared:
        raise ConversionError(
            f"{where}: {key} has shape {tuple(state[key].shape)} but the config's class_number={declared} "
            f"expects ({declared}, {config.dim}) (or {declared + 1} rows with the learnable null class)"
        )
    return rows, True


def denoiser_from_authors(
    state: StateDict, config: DenoiserConfig, where: str
) -> tuple[Denoiser, int | None, dict[str, str], bool]:
    """Build our Denoiser from the DiffusionTransformer keys ``transformer.*`` of ``state``.

    Returns (denoiser, null class label or None, ignored keys with reasons, whether the null row is the mean
    of the label rows rather than a learned one).  For class-conditional models
    the null row is the checkpoint's own (1001 rows) or the mean of the 1000 rows (see module docstring).
    """
    ignored: dict[str, str] = {}
    sub = {k: v for k, v in state.items() if k.startswith("transformer.")}
    for key in list(sub):
        if re.fullmatch(r"transformer\.blocks\.\d+\.attn2\.mask", key):
            ignored[key] = "causal mask buffer of the cross-attention (never used)"
            del sub[key]
    null_label, append_mean = None, False
    if config.condition_kind == "class":
        rows, append_mean = _class_table_rows(sub, config, where)
        config = dataclasses.replace(config, num_class_labels=rows + int(append_mean))
        null_label = config.num_class_labels - 1
        if append_mean:
            for i in range(config.num_layers):
                key = f"transformer.blocks.{i}.ln2.emb.weight"
                if key in sub and sub[key].ndim == 2:
                    table = sub[key]
                    sub[key] = torch.cat([table, table.float().mean(0, keepdim=True).to(table.dtype)])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Denoiser(config).state_dict().items()}
    converted = convert_state_dict(sub, authors_to_denoiser_key_map(config), shapes, source_name=where)
    denoiser = Denoiser(config)
    denoiser.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return denoiser.eval(), null_label, ignored, append_mean


# ---------------------------------------------------------------------------------------------------
# CLIP text encoder (OpenAI layout -> transformers' CLIPTextModel)
# ---------------------------------------------------------------------------------------------------
def _openai_clip_key_map(layers: int) -> dict[str, str]:
    km = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        for p in ("weight", "bias"):
            km[f"{src}.ln_1.{p}"] = f"{dst}.layer_norm1.{p}"
            km[f"{src}.ln_2.{p}"] = f"{dst}.layer_norm2.{p}"
            km[f"{src}.attn.out_proj.{p}"] = f"{dst}.self_attn.out_proj.{p}"
            km[f"{src}.mlp.c_fc.{p}"] = f"{dst}.mlp.fc1.{p}"
            km[f"{src}.mlp.c_proj.{p}"] = f"{dst}.mlp.fc2.{p}"
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                # the fused in_proj is split into q, k, v below (pseudo keys "...in_proj_{p}#j")
                km[f"{src}.attn.in_proj_{p}#{j}"] = f"{dst}.self_attn.{name}.{p}"
    return km


def clip_text_model_from_openai(state: StateDict, tokenizer: Any, where: str) -> torch.nn.Module:
    """The OpenAI-layout CLIP text tower (``condition_emb.*`` with the prefix removed) -> ``CLIPTextModel``.

    ``text_projection`` is not used (the condition is the final layer norm's output at every position).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    state = dict(state)
    state.pop("text_projection", None)
    width = int(state["token_embedding.weight"].shape[1]) if "token_embedding.weight" in state else 0
    if not width:
        raise ConversionError(f"{where}: token_embedding.weight is missing; not a CLIP text encoder")
    layers = len({m.group(1) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    for i in range(layers):
        for p in ("weight", "bias"):
            key = f"transformer.resblocks.{i}.attn.in_proj_{p}"
            if key not in state:
                raise ConversionError(f"{where}: expected key {key!r} is missing")
            fused = state.pop(key)
            if fused.shape[0] != 3 * width:
                raise ConversionError(f"{where}: {key} has shape {tuple(fused.shape)}, expected [{3 * width}, ...]")
            for j, part in enumerate(fused.chunk(3)):
                state[f"{key}#{j}"] = part
    vocab, positions = int(state["token_embedding.weight"].shape[0]), int(state["positional_embedding"].shape[0])
    if len(tokenizer) != vocab:
        raise ConversionError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's CLIP embeds {vocab}; give "
            "the tokenizer the model was trained with (OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz)"
        )
    c_fc = "transformer.resblocks.0.mlp.c_fc.weight"
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(state[c_fc].shape[0]) if c_fc in state else 4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),  # OpenAI's rule: heads = width / 64
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    own = model.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in own) else ""
    key_map = {k: prefix + v for k, v in _openai_clip_key_map(layers).items()}
    shapes = {k: v.shape for k, v in own.items() if k in set(key_map.values())}
    converted = convert_state_dict(state, key_map, shapes, source_name=where)
    missing = sorted(set(own) - set(converted) - {k for k in own if k.endswith("position_ids")})
    if missing:
        raise ConversionError(f"{where}: CLIPTextModel keys not produced: {missing[:5]}")
    model.load_state_dict({**own, **{k: v.float() for k, v in converted.items()}}, strict=True)
    return model.eval()


def load_clip_tokenizer(path: str | os.PathLike) -> Any:
    """A ``CLIPTokenizer`` from a local tokenizer folder, or built from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``
    (the file the authors ship in ``image_synthesis/modeling/modules/clip/``): the vocabulary is the 256
    byte symbols, the same with ``</w>``, one token per merge (the first 49152 - 256 - 2), then
    ``<|startoftext|>`` and ``<|endoftext|>``, exactly as OpenAI's SimpleTokenizer builds it."""
    from transformers import CLIPTokenizer

    path = Path(path)
    if path.is_dir():
        try:
            return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            raise ValueError(f"cannot load a CLIP tokenizer from {path}: {err}") from None
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (a CLIPTokenizer folder or bpe_simple_vocab_16e6.txt.gz)")
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1] if line.strip()]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not a BPE merges file (each line after the first must hold two symbols)")
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"), model_max_length=77
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> character table: printable bytes keep their character (listed first),
    the others get 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


# ---------------------------------------------------------------------------------------------------
# The whole checkpoint
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AuthorsConversion:
    """The converted pipeline and a record of the conversion (written as ``authors_source.json``)."""

    pipeline: Any  # VQDiffusionPipeline
    record: dict[str, Any]


def _split_model(ckpt: dict[str, Any], use_ema: bool, where: str) -> tuple[StateDict, StateDict, dict[str, str], str]:
    """(DiffusionTransformer state with keys relative to it, tokenizer keys of the model, ignored, weights used)."""
    ignored: dict[str, str] = {}
    unknown = sorted(k for k in ckpt if k not in ("model", "ema") and k not in _IGNORED_TOP)
    if unknown:
        raise ConversionError(
            f"{where}: unknown top-level entr(y/ies) {unknown}; expected model, ema, {sorted(_IGNORED_TOP)}"
        )
    for key in ckpt:
        if key in _IGNORED_TOP:
            ignored[key] = _IGNORED_TOP[key]
    if "model" not in ckpt:
        raise ConversionError(f"{where}: no 'model' entry; not a VQ-Diffusion training checkpoint")
    model = tensor_dict(ckpt["model"], f"{where}['model']")
    bad = sorted(k for k in model if not k.startswith(("transformer.", "content_codec.")))
    if bad:
        raise ConversionError(
            f"{where}['model']: unmapped key(s) {bad[:5]} (expected transformer.* and content_codec.*)"
        )
    raw = {k[len("transformer.") :]: v for k, v in model.items() if k.startswith("transformer.")}
    codec = {k: v for k, v in model.items() if k.startswith("content_codec.")}
    if use_ema and "ema" in ckpt:
        ema = tensor_dict(ckpt["ema"], f"{where}['ema']")
        for key in raw:
            ignored[f"model.transformer.{key}"] = "raw weights (the EMA weights are used)"
        return ema, codec, ignored, "ema"
    if use_ema:
        logger.warning("%s has no EMA weights; using the raw ones", where)
    elif "ema" in ckpt:
        ignored["ema"] = "EMA weights (the raw ones were requested)"
    return raw, codec, ignored, "raw"


def convert_authors_checkpoint(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike,
    *,
    vqvae: str | os.PathLike | None = None,
    codes_map: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    use_ema: bool = True,
) -> AuthorsConversion:
    """Convert an authors' checkpoint to a :class:`~vqdiffusion.pipeline.VQDiffusionPipeline`.

    Args:
        checkpoint: the ``.pth`` (e.g. ``ithq_learnable.pth``, ``imagenet_pretrained.pth``).
        config: the YAML it was trained with (``configs/ithq.yaml``, ``OUTPUT/pretrained_model/config_text.yaml``...).
        vqvae: the tokenizer checkpoint (``ithq_vqvae.pth``, ``vqgan_imagenet_f16_16384.pth``...); None uses
            the copy stored in the checkpoint (``content_codec.*``).
        codes_map: the statistics file of a remapped codebook (``help_folder/statistics/taming_vqvae_974.pt``);
            default: the config's ``mapping_path`` if that file exists.
        tokenizer: text models: a CLIPTokenizer folder or OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.
        use_ema: the EMA weights (the authors' inference default) or the raw ones.
    """
    from ..pipeline import PipelineDefaults, VQDiffusionPipeline

    checkpoint, config = Path(checkpoint), Path(config)
    where = str(checkpoint)
    cfg = parse_authors_config(read_authors_yaml(config), str(config))
    ckpt = load_authors_checkpoint(checkpoint)
    state, codec_state, ignored, weights_used = _split_model(ckpt, use_ema, where)
    den_cfg = cfg.denoiser
    schedule = MaskReplaceSchedule(num_classes=den_cfg.num_classes, num_timesteps=den_cfg.num_timesteps)

    # -- the DiffusionTransformer's keys: every one is mapped or ignored -------------------------------
    for key in _SCHEDULE_BUFFERS:
        if key in state:
            ignored[key] = "schedule buffer (checked against ours, recomputed)"
    _check_schedule(state, schedule, where)
    for key in _LOSS_HISTORY:
        if key in state:
            ignored[key] = "loss history of the importance sampler (training only)"
    clip_state = {k[len("condition_emb.") :]: v for k, v in state.items() if k.startswith("condition_emb.")}
    rest = {
        k
        for k in state
        if not k.startswith(("transformer.", "condition_emb."))
        and k not in _SCHEDULE_BUFFERS
        and k not in _LOSS_HISTORY
        and k != "empty_text_embed"
    }
    if rest:
        raise ConversionError(f"{where}: unmapped key(s) {sorted(rest)[:5]}")
    denoiser, null_label, den_ignored, null_is_mean = denoiser_from_authors(state, den_cfg, where)
    ignored.update(den_ignored)

    # -- the condition ---------------------------------------------------------------------------------
    text_encoder = null_condition = None
    if cfg.variant == "text":
        if tokenizer is None:
            raise ValueError(
                f"{where} is a text model: give --tokenizer (a CLIPTokenizer folder such as the tokenizer/ of "
                "microsoft/vq-diffusion-ithq, or bpe_simple_vocab_16e6.txt.gz from the authors' repository)"
            )
        if "text_projection" in clip_state:
            ignored["condition_emb.text_projection"] = "CLIP's pooled-output projection (not used by VQ-Diffusion)"
        clip_tokenizer = load_clip_tokenizer(tokenizer)
        text_model = clip_text_model_from_openai(clip_state, clip_tokenizer, f"{where} (CLIP)")
        text_encoder = CLIPTextCondition(text_model, clip_tokenizer, pad_token_id=cfg.text_pad_value)
        if "empty_text_embed" in state:
            if not cfg.learnable_cf:
                logger.info("%s: learned null text found although the config does not set learnable_cf", where)
            null_condition = LearnedNullCondition(state["empty_text_embed"].float().clone())
        elif cfg.learnable_cf:
            raise ConversionError(f"{where}: the config sets learnable_cf but 'empty_text_embed' is missing")
    elif clip_state or "empty_text_embed" in state:
        raise ConversionError(f"{where}: condition_emb.* / empty_text_embed in a {cfg.variant} model")

    # -- the tokenizer (VQ-VAE) ------------------------------------------------------------------------
    if vqvae is not None:
        vq_file = load_authors_checkpoint(vqvae)
        entry = "model" if "model" in vq_file else "state_dict" if "state_dict" in vq_file else None
        if entry is None:
            raise ConversionError(f"{vqvae}: expected a 'model' (PatchVQGAN) or 'state_dict' (taming) entry")
        for key in codec_state:
            ignored[f"model.{key}"] = "tokenizer copy in the checkpoint (replaced by --vqvae)"
        source = canonical_vqvae_state(tensor_dict(vq_file[entry], f"{vqvae}[{entry!r}]"), str(vqvae))
        for key in vq_file:
            if key != entry:
                source.ignored[key] = "training state of the tokenizer file"
        vq_where = str(vqvae)
    elif codec_state:
        source = canonical_vqvae_state(codec_state, f"{where} content_codec")
        vq_where = f"{where} content_codec"
    else:
        raise ValueError(f"{where} holds no tokenizer weights (content_codec.*); give --vqvae")
    used = None
    if cfg.quantize_number:
        used = _load_codes_map(codes_map, cfg, config, source, vq_where)
    side = cfg.token_shape[0]
    sample_size = side * 2 ** (_levels(source.state) - 1)
    vq_model = vqvae_from_taming(source, sample_size=sample_size, used_codes=used, where=vq_where)
    if vq_model.config.token_shape != cfg.token_shape:
        raise ConversionError(f"{vq_where}: tokenizer grid {vq_model.config.token_shape} != config {cfg.token_shape}")

    defaults = _defaults(cfg, null_condition is not None or (null_label is not None and not null_is_mean))
    pipe = VQDiffusionPipeline(
        vqvae=vq_model,
        denoiser=denoiser,
        schedule=schedule,
        text_encoder=text_encoder,
        null_condition=null_condition,
        defaults=PipelineDefaults(**defaults),
        null_class_label=null_label,
    )
    record = {
        "source": {
            "checkpoint": str(checkpoint),
            "config": str(config),
            "vqvae": None if vqvae is None else str(vqvae),
        },
        "variant": cfg.variant,
        "weights": weights_used,
        "codec": cfg.codec,
        "used_codes": None if used is None else int(used.numel()),
        "null": "learned text"
        if null_condition is not None
        else ("mean of the class rows" if null_is_mean else "learned class" if null_label is not None else "none"),
        "training": cfg.training,
        "ignored": {
            "checkpoint": _summarise(ignored),
            "vqvae": _summarise(source.ignored),
        },
    }
    return AuthorsConversion(pipe, record)


def _levels(state: StateDict) -> int:
    return len({m.group(1) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))}) or 1


def _load_codes_map(
    path: str | os.PathLike | None, cfg: AuthorsConfig, config: Path, source: Any, where: str
) -> torch.Tensor:
    candidates = [Path(path)] if path is not None else []
    if path is None and cfg.mapping_path:
        rel = Path(cfg.mapping_path)
        candidates = [rel, *(parent / rel for parent in config.resolve().parents)]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"the config uses {cfg.quantize_number} of the codebook's codes (quantize_number); give the statistics "
            f"file with --codes-map (e.g. help_folder/statistics/taming_vqvae_{cfg.quantize_number}.pt)"
        )
    table = load_authors_checkpoint_tensor(found)
    codebook = next(v for k, v in source.state.items() if k.startswith("quantize.") and v.ndim == 2)
    used = used_code_table(table, int(codebook.shape[0]), str(found))
    if used.numel() != cfg.quantize_number or cfg.quantize_number != cfg.denoiser.num_classes:
        raise ConversionError(
            f"{found}: maps to {used.numel()} tokens but the config has quantize_number={cfg.quantize_number} and "
            f"num_embed={cfg.denoiser.num_classes}"
        )
    return used


def load_authors_checkpoint_tensor(path: Path) -> torch.Tensor:
    """A statistics file: one tensor saved with ``torch.save`` (loaded with weights_only=True)."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} could not be loaded with torch.load(weights_only=True): {err}") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} holds a {type(value).__name__}, not the full-to-used code tensor")
    return value


def _defaults(cfg: AuthorsConfig, has_null: bool) -> dict[str, Any]:
    """The authors' published sampling settings for the variant (readme.md / inference_VQ_Diffusion.py)."""
    if cfg.variant == "text":
        if has_null:  # ITHQ: guidance 5; COCO/CC learnable: 3 (readme)
            return {"guidance_scale": 5.0 if cfg.codec == "ema_vqvae.PatchVQVAE" else 3.0, "truncation_rate": 1.0}
        return {"guidance_scale": 1.0, "truncation_rate": 0.86}
    if cfg.variant == "class":
        if has_null:  # imagenet_learnable (readme): guidance 1.5, truncation 0.94
            return {"guidance_scale": 1.5, "truncation_rate": 0.94}
        return {"guidance_scale": 1.0, "truncation_rate": 0.86}
    return {"guidance_scale": 1.0, "truncation_rate": 1.0}


def _summarise(ignored: dict[str, str]) -> dict[str, Any]:
    """Group ignored keys by reason: {reason: {"count": n, "examples": [...]}}."""
    out: dict[str, Any] = {}
    for key, reason in sorted(ignored.items()):
        entry = out.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 3:
            entry["examples"].append(key)
    return out


def write_authors_conversion(conversion: AuthorsConversion, out_dir: str | os.PathLike, *, to: str = "ours") -> Path:
    """Write the converted pipeline in our layout (``to="ours"``) or diffusers' (``"diffusers"``, text models
    only), plus ``authors_source.json`` (provenance, diffusion training settings, ignored keys)."""
    out = Path(out_dir)
    if to == "diffusers":
        from ..formats.diffusers import save_diffusers

        save_diffusers(conversion.pipeline.components, out)
    elif to == "ours":
        conversion.pipeline.save_pretrained(out)
    else:
        raise ValueError(f"to must be 'ours' or 'diffusers', got {to!r}")
    atomic_write_text(out / "authors_source.json", json.dumps(conversion.record, indent=2) + "\n")
    return out
