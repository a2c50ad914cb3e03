"""Export a denoiser training checkpoint as a model folder for ``vqdiffusion generate --model``.

The folder is our layout, written by :meth:`VQDiffusionPipeline.save_pretrained`, for every condition kind:
a text model (the trained or frozen CLIP text model, its tokenizer and the learned null text), a
class-conditional model (labels through the denoiser's label table, the last row the learned null class)
or an unconditional one.  The VQ-VAE is the one named by the token folder the model was trained on
(recorded in the checkpoint), unless another folder is given.  Default sampling settings
(:func:`training_defaults`): all T steps, truncation 1, guidance :data:`DEFAULT_GUIDANCE_SCALE` with a
learned null condition and 1 without.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data.tokens import CONDITION_OF_DATA_KIND
from ..diffusion import MaskReplaceSchedule
from ..formats.ours import write_history
from ..io import check_new_folder, load_into
from ..models.conditions import CLIPTextCondition, ConditionKind, LearnedNullCondition
from ..models.denoiser import Denoiser, DenoiserConfig
from ..pipeline import PipelineDefaults, VQDiffusionPipeline
from ..sampling import DEFAULT_GUIDANCE_SCALE
from ..text_vocab import build_char_clip_tokenizer
from .checkpoint import DENOISER_CHECKPOINT, find_latest_checkpoint, load_checkpoint, take_prefix
from .denoiser_config import DenoiserTrainConfig
from .init_from import stage_record

__all__ = ["export_pipeline", "pipeline_from_checkpoint", "training_defaults"]


def training_defaults(schedule: MaskReplaceSchedule, has_null: bool) -> PipelineDefaults:
    """Default sampling settings of a freshly trained model: all T steps, truncation 1, guidance
    :data:`DEFAULT_GUIDANCE_SCALE` when a null condition was trained, else 1 (off)."""
    return PipelineDefaults(
        num_inference_steps=schedule.num_timesteps,
        guidance_scale=DEFAULT_GUIDANCE_SCALE if has_null else 1.0,
        truncation_rate=1.0,
    )


def checkpoint_condition(meta: dict[str, Any]) -> ConditionKind:
    """The condition kind recorded in a denoiser checkpoint's meta."""
    value = meta.get("condition")
    # older checkpoints recorded the token folder's data kind (captions, classes, unconditional)
    return CONDITION_OF_DATA_KIND.get(value) or ConditionKind(value)


def _resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """A checkpoint file, or a training output folder (its latest checkpoint)."""
    path = Path(checkpoint)
    if path.is_dir():
        latest = find_latest_checkpoint(path / "checkpoints") or find_latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no step_*.safetensors checkpoint in {path} or {path / 'checkpoints'}")
        return latest
    return path


def _text_encoder(path: Path, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> CLIPTextCondition:
    """The checkpoint's text model: the jointly trained one (rebuilt from its config and ``text.*``
    weights), or the frozen local CLIP the run was configured with."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = DenoiserTrainConfig.from_dict(meta["config"])
    text_config: dict[str, Any] | None = meta.get("text_model_config")
    if text_config is None:
        if not config.text_encoder_dir or not config.tokenizer_dir:
            raise ConfigError(f"{path}: the checkpoint names no text encoder folder")
        return CLIPTextCondition.from_pretrained(
            config.text_encoder_dir, config.tokenizer_dir, pad_token_id=meta.get("text_pad_token_id")
        )
    tokenizer = build_char_clip_tokenizer(model_max_length=config.text_max_length, words=config.text_words)
    if len(tokenizer) != int(text_config["vocab_size"]):
        raise ValueError(
            f"{path}: the text model has {text_config['vocab_size']} token ids but this version's character "
            f"tokenizer has {len(tokenizer)}; export with the vqdiffusion version that trained it"
        )
    model = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
    text = CLIPTextCondition(model, tokenizer, pad_token_id=meta.get("text_pad_token_id"))
    load_into(text, take_prefix("text", state), f"{path} (text model)")
    return text


def pipeline_from_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    ema: bool = True,
    vqvae_dir: str | os.PathLike | None = None,
) -> VQDiffusionPipeline:
    """Build the in-memory pipeline of a denoiser training checkpoint (a file or a run folder).

    Args:
        checkpoint: ``step_*.safetensors`` written by the denoiser trainer, or its output folder.
        ema: use the EMA weights (default) rather than the raw ones.
        vqvae_dir: the VQ-VAE folder (default: the one the token folder was made with).
    """
    return _pipeline_and_meta(checkpoint, ema=ema, vqvae_dir=vqvae_dir)[0]


def training_history(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The history a checkpoint's export records: the stages of the model it started from (``--init-from``),
    then its own stage (:func:`~vqdiffusion.training.init_from.stage_record`)."""
    config = DenoiserTrainConfig.from_dict(meta["config"])
    stage = meta.get("stage") or {}
    step = int(meta.get("step", 0))
    own = stage_record(
        command=stage.get("command", "unknown (a checkpoint written before histories were recorded)"),
        objective=config.objective,
        samples=step * config.batch_size,
        steps=step,
        batch_size=config.batch_size,
        wall_time_s=float(stage.get("wall_time_s", 0.0)),
        machine=stage.get("machine", "unknown"),
        init_from=config.init_from,
    )
    return [*list(meta.get("history") or []), own]


def _pipeline_and_meta(
    checkpoint: str | os.PathLike, *, ema: bool, vqvae_dir: str | os.PathLike | None
) -> tuple[VQDiffusionPipeline, dict[str, Any]]:
    from ..models.vqvae import load_vqvae

    path = _resolve_checkpoint(checkpoint)
    tensors, meta = load_checkpoint(path, DENOISER_CHECKPOINT)
    kind = checkpoint_condition(meta)
    state = take_prefix("model", tensors)
    if ema:
        state.update(take_prefix("ema", tensors))  # EMA holds the parameters; buffers come from the model

    denoiser = Denoiser(DenoiserConfig.from_dict(meta["denoiser_config"]))
    load_into(denoiser, take_prefix("denoiser", state), f"{path} (denoiser)")
    schedule = MaskReplaceSchedule.from_dict(meta["schedule"])
    text, null, null_label = None, None, None
    if kind == ConditionKind.TEXT:
        text = _text_encoder(path, meta, state)
        if meta.get("null_condition"):
            if "null.embedding" not in state:
                raise ValueError(f"{path}: the checkpoint says a null condition was trained but holds none")
            null = LearnedNullCondition(state["null.embedding"].detach().clone().float())
    elif kind == ConditionKind.CLASS and meta.get("null_condition"):
        null_label = len(meta["class_names"])  # the last row of the label table

    folder = vqvae_dir if vqvae_dir is not None else meta.get("data", {}).get("vqvae_dir")
    if folder is None:
        raise ValueError(f"{path}: no VQ-VAE folder recorded; pass vqvae_dir (--vqvae)")
    if not Path(folder).exists():
        raise FileNotFoundError(f"the VQ-VAE folder {folder} is missing; pass the tokenizer's folder with --vqvae")
    pipe = VQDiffusionPipeline(
        vqvae=load_vqvae(folder),
        denoiser=denoiser,
        schedule=schedule,
        text_encoder=text,
        null_condition=null,
        null_class_label=null_label,
        defaults=training_defaults(schedule, bool(meta.get("null_condition"))),
    )
    return pipe, meta


def export_pipeline(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ema: bool = True,
    vqvae_dir: str | os.PathLike | None = None,
    defaults: dict[str, Any] | None = None,
    weights_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the pipeline of ``checkpoint`` (see :func:`pipeline_from_checkpoint`) to ``out_dir``; returns it.

    ``defaults`` replaces fields of the model's default sampling settings (:class:`PipelineDefaults`);
    ``weights_dtype`` stores the weights in that dtype (see :meth:`VQDiffusionPipeline.save_pretrained`).
    The folder's ``history.json`` records the stages that trained it (:func:`training_history`).
    An ``out_dir`` that exists and is not empty is refused unless ``overwrite``.
    """
    check_new_folder(out_dir, overwrite=overwrite, what="the model folder")
    pipe, meta = _pipeline_and_meta(checkpoint, ema=ema, vqvae_dir=vqvae_dir)
    if defaults:
        pipe.defaults = pipe.sampling_options(**defaults)  # validated for this model
    out = Path(out_dir)
    pipe.save_pretrained(out, weights_dtype=weights_dtype)
    write_history(out, training_history(meta))
    return out
