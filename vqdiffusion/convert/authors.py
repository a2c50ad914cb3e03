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
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..diffusion import MaskReplaceSchedule
from ..formats.keymap import ConversionError, convert_state_dict
from ..io import atomic_write_text, check_finite
from ..models.conditions import CLIPTextCondition, LearnedNullCondition
from ..models.denoiser import Denoiser, DenoiserConfig
from .authors_clip import check_tokenizer_path, clip_text_model_from_openai, load_clip_tokenizer
from .authors_config import AuthorsConfig, parse_authors_config
from .authors_files import StateDict, load_authors_checkpoint, read_authors_yaml, tensor_dict
from .authors_vqvae import canonical_vqvae_state, used_code_table, vqvae_from_taming

logger = logging.getLogger(__name__)

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


def _check_config_sizes(state: StateDict, config: DenoiserConfig, config_path: str, where: str) -> None:
    """The YAML's n_layer and diffusion_step against the checkpoint's blocks and schedule buffers, checked
    on the shapes alone: a config that does not match would otherwise build its own sizes first."""
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"transformer\.blocks\.(\d+)\.", key))}
    found = max(blocks) + 1 if blocks else 0
    if config.num_layers != found:
        first = min(found, config.num_layers)
        extra = "is missing" if config.num_layers > found else "is not in the config"
        raise ConversionError(
            f"{where}: the config {config_path} says n_layer={config.num_layers} but the checkpoint holds {found} "
            f"blocks (transformer.blocks.{first}.* {extra}); the config does not match the checkpoint"
        )
    T = config.num_timesteps
    for key in ("log_cumprod_at", "transformer.blocks.0.ln1.emb.weight"):
        got = state.get(key)
        rows = T + 1 if key.startswith("log_") else T
        if got is not None and (got.ndim < 1 or got.shape[0] != rows):
            raise ConversionError(
                f"{where}: {key} has shape {tuple(got.shape)} but the config's diffusion_step T={T} needs "
                f"{rows} rows: the config does not match the checkpoint"
            )


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
    if codes_map is not None and not cfg.quantize_number:
        raise ValueError(
            f"--codes-map {codes_map}: the config {config} sets no quantize_number, so its codec uses the whole "
            "codebook and there is no map to apply; leave --codes-map out"
        )
    if tokenizer is not None:
        check_tokenizer_path(tokenizer)
    ckpt = load_authors_checkpoint(checkpoint)
    state, codec_state, ignored, weights_used = _split_model(ckpt, use_ema, where)
    weights = {k: v for k, v in state.items() if k not in _SCHEDULE_BUFFERS and k not in _LOSS_HISTORY}
    check_finite(weights, f"{where} ({weights_used} weights)")  # the log-space schedule holds -inf by design
    check_finite(codec_state, f"{where} (content_codec)")
    den_cfg = cfg.denoiser
    _check_config_sizes(state, den_cfg, str(config), where)  # before anything of the config's size is built
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
    defaults["num_inference_steps"] = schedule.num_timesteps  # the authors sample with every step
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
