"""Export a denoiser training checkpoint as a pipeline folder for ``vqdiffusion generate --model``.

The folder is our layout, written by :meth:`VQDiffusionPipeline.save_pretrained`: ``vqdiffusion.json``,
``schedule.json``, ``defaults.json``, ``vqvae/``, ``denoiser/``, ``text_encoder/``, ``tokenizer/`` and
``null_condition.safetensors`` when a null condition was trained.  The VQ-VAE is the one named by the token
folder the model was trained on (recorded in the checkpoint), unless another folder is given.  Default
sampling settings: all T steps, truncation 1, guidance 5 with a learned null condition and 1 without.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from ..cli import add_sampling_arguments, sampling_arguments
from ..config import ConfigError
from ..diffusion import MaskReplaceSchedule
from ..io import load_into
from ..models.conditions import CLIPTextCondition, LearnedNullCondition
from ..models.denoiser import Denoiser, DenoiserConfig
from ..pipeline import PipelineDefaults, VQDiffusionPipeline
from .common import find_latest_checkpoint, load_checkpoint, take_prefix

__all__ = ["add_export_parser", "export_pipeline", "pipeline_from_checkpoint", "run_export"]

CHECKPOINT_KIND = "denoiser"


def _resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """A checkpoint file, or a training output folder (its latest checkpoint)."""
    path = Path(checkpoint)
    if path.is_dir():
        latest = find_latest_checkpoint(path / "checkpoints") or find_latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no step_*.safetensors checkpoint in {path} or {path / 'checkpoints'}")
        return latest
    return path


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
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..text_vocab import build_char_clip_tokenizer
    from .denoiser import DenoiserTrainConfig
    from .vqvae import load_vqvae

    path = _resolve_checkpoint(checkpoint)
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is a {meta.get('kind')!r} checkpoint, not a denoiser training checkpoint")
    if meta.get("condition") != "captions":
        raise ValueError(
            f"{path} holds a {meta.get('condition')!r} model; only text-conditioned (caption) models can be "
            "exported as a pipeline"
        )
    state = take_prefix("model", tensors)
    if ema:
        state.update(take_prefix("ema", tensors))  # EMA holds the parameters; buffers come from the model
    config = DenoiserTrainConfig.from_dict(meta["config"])

    denoiser = Denoiser(DenoiserConfig.from_dict(meta["denoiser_config"]))
    load_into(denoiser, take_prefix("denoiser", state), f"{path} (denoiser)")
    schedule = MaskReplaceSchedule.from_dict(meta["schedule"])

    text_config: dict[str, Any] | None = meta.get("text_model_config")
    if text_config is not None:
        tokenizer = build_char_clip_tokenizer(model_max_length=config.text_max_length, words=config.text_words)
        if len(tokenizer) != int(text_config["vocab_size"]):
            raise ValueError(
                f"{path}: the text model has {text_config['vocab_size']} token ids but this version's character "
                f"tokenizer has {len(tokenizer)}; export with the vqdiffusion version that trained it"
            )
        model = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
        text = CLIPTextCondition(model, tokenizer, pad_token_id=meta.get("text_pad_token_id"))
        load_into(text, take_prefix("text", state), f"{path} (text model)")
    else:
        if not config.text_encoder_dir or not config.tokenizer_dir:
            raise ConfigError(f"{path}: the checkpoint names no text encoder folder")
        text = CLIPTextCondition.from_pretrained(
            config.text_encoder_dir, config.tokenizer_dir, pad_token_id=meta.get("text_pad_token_id")
        )

    null = None
    if meta.get("null_condition"):
        if "null.embedding" not in state:
            raise ValueError(f"{path}: the checkpoint says a null condition was trained but holds none")
        null = LearnedNullCondition(state["null.embedding"].detach().clone().float())

    folder = vqvae_dir if vqvae_dir is not None else meta.get("data", {}).get("vqvae_dir")
    if folder is None:
        raise ValueError(f"{path}: no VQ-VAE folder recorded; pass vqvae_dir (--vqvae)")
    if not Path(folder).exists():
        raise FileNotFoundError(f"the VQ-VAE folder {folder} is missing; pass the tokenizer's folder with --vqvae")
    vqvae = load_vqvae(folder)
    defaults = PipelineDefaults(
        num_inference_steps=schedule.num_timesteps,
        guidance_scale=5.0 if null is not None else 1.0,
        truncation_rate=1.0,
    )
    return VQDiffusionPipeline(
        vqvae=vqvae,
        denoiser=denoiser,
        schedule=schedule,
        text_encoder=text,
        null_condition=null,
        defaults=defaults,
    )


def export_pipeline(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ema: bool = True,
    vqvae_dir: str | os.PathLike | None = None,
    defaults: dict[str, Any] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Write the pipeline of ``checkpoint`` (see :func:`pipeline_from_checkpoint`) to ``out_dir``; returns it.

    ``defaults`` replaces fields of the model's default sampling settings (:class:`PipelineDefaults`);
    ``weights_dtype`` stores the weights in that dtype (see :meth:`VQDiffusionPipeline.save_pretrained`).
    """
    pipe = pipeline_from_checkpoint(checkpoint, ema=ema, vqvae_dir=vqvae_dir)
    if defaults:
        pipe.defaults = pipe.sampling_options(**defaults)  # validated for this model
    out = Path(out_dir)
    pipe.save_pretrained(out, weights_dtype=weights_dtype)
    return out


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` command to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "export",
        help="export a denoiser training checkpoint as a model folder for `generate`",
        description="Write a pipeline folder (our layout) from a denoiser checkpoint or training folder.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="step_*.safetensors, or a training --out folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="model folder to write")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    parser.add_argument("--vqvae", default=None, help="VQ-VAE folder (default: the token folder's)")
    parser.add_argument("--half", action="store_true", help="store the VQ-VAE and denoiser weights as float16")
    add_sampling_arguments(parser, default_text="T steps, guidance 5 (1 without a null condition), the rest off")
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run ``export``; prints the model folder."""
    defaults = sampling_arguments(args)
    out = export_pipeline(
        args.checkpoint,
        args.out_dir,
        ema=not args.raw,
        vqvae_dir=args.vqvae,
        defaults=defaults,
        weights_dtype=torch.float16 if args.half else None,
    )
    print(out)
    return 0
