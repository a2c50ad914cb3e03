"""Starting a denoiser run from an exported model (``vqdiffusion train --init-from MODEL``).

A run that continues a model takes its trained weights: the denoiser, the trained text model and the learned
null condition (a class model's labels and null class live in the denoiser's label table).  The optimizer,
its learning-rate warm-up, the EMA and the importance sampler start fresh.  The model must have exactly the
architecture the run's flags describe, the same noise schedule and condition kind, and a text model with
the same tokenizer; the token folder must have been made with the model's VQ-VAE (the same codebook), since
a token id means a code of that codebook.  Anything else is one :class:`ConfigError` naming the difference.

A model's training history (one entry per stage, see :func:`stage_record`) is read here and carried into
the run's checkpoints; the export appends the run's own stage (docs/design.md §5.4).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

from ..config import ConfigError
from ..formats.ours import read_history
from ..models.vqvae import load_vqvae
from ..pipeline import VQDiffusionPipeline, resolve_model_path
from .denoiser_modules import DenoiserTrainModule


def _differences(want: dict[str, Any], have: dict[str, Any]) -> str:
    keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    return ", ".join(f"{k}: model {have.get(k)!r}, run {want.get(k)!r}" for k in keys)


def init_from_model(
    module: DenoiserTrainModule,
    source: str,
    *,
    schedule: dict[str, Any],
    vqvae_dir: str | os.PathLike | None,
) -> list[dict[str, Any]]:
    """Copy the trained weights of the model ``source`` (a folder, ``builtin:NAME`` or a Hub id) into
    ``module``; returns the model's training history (``[]`` when it records none).

    ``schedule`` is the run's noise schedule (``MaskReplaceSchedule.to_dict()``); ``vqvae_dir`` the VQ-VAE
    folder the run's token folder was made with (None skips the codebook check).
    """
    try:
        root = resolve_model_path(source)
        pipe = VQDiffusionPipeline.from_pretrained(root)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--init-from {source}: {err}") from None
    fix = "train with the model's settings, or drop --init-from"
    want, have = module.denoiser.config.to_dict(), pipe.denoiser.config.to_dict()
    if want != have:
        raise ConfigError(
            f"--init-from {source}: its denoiser differs from this run's ({_differences(want, have)}); {fix}"
        )
    if pipe.schedule.to_dict() != schedule:
        raise ConfigError(
            f"--init-from {source}: its noise schedule differs "
            f"({_differences(schedule, pipe.schedule.to_dict())}); {fix}"
        )
    if vqvae_dir is not None and os.path.isdir(vqvae_dir):
        ours, theirs = load_vqvae(vqvae_dir).codebook.weight.float(), pipe.vqvae.codebook.weight.float()
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3):
            raise ConfigError(
                f"--init-from {source}: the token folder was made with another VQ-VAE ({vqvae_dir}) than the "
                f"model's; tokenize the data with the model's vqvae/ folder"
            )
    with torch.no_grad():
        module.denoiser.load_state_dict(_as(pipe.denoiser.state_dict(), module.denoiser))
        if module.text is not None:
            text = pipe.text_encoder
            if text is None or not hasattr(text, "text_model"):
                raise ConfigError(f"--init-from {source}: the run trains a text model but the model has none; {fix}")
            want_text = module.text.text_model.config.to_dict()
            have_text = text.text_model.config.to_dict()
            keys = (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
                "vocab_size",
            )
            if any(want_text.get(k) != have_text.get(k) for k in keys):
                diff = _differences({k: want_text.get(k) for k in keys}, {k: have_text.get(k) for k in keys})
                raise ConfigError(f"--init-from {source}: its text model differs ({diff}); {fix}")
            if module.text.tokenizer.get_vocab() != text.tokenizer.get_vocab():
                raise ConfigError(
                    f"--init-from {source}: its text tokenizer has another vocabulary than this run's "
                    "(--text-vocab and the captions' words must match the model's)"
                )
            module.text.text_model.load_state_dict(_as(text.text_model.state_dict(), module.text.text_model))
        if module.null is not None:
            null = getattr(pipe, "null_condition", None)
            embedding = getattr(null, "embedding", None)
            if not isinstance(embedding, torch.Tensor) or embedding.shape != module.null.embedding.shape:
                raise ConfigError(f"--init-from {source}: the model has no learned null condition of this shape; {fix}")
            module.null.embedding.copy_(embedding.float())
    return read_history(root)


def _as(state: dict[str, torch.Tensor], target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` in the dtypes and device of ``target``'s own tensors (a half-precision export into a float32
    run)."""
    own = target.state_dict()
    return {
        k: v.to(own[k].dtype if k in own else v.dtype).to(own[k].device if k in own else v.device)
        for k, v in state.items()
    }


def machine_description(device: torch.device | str) -> str:
    """What trained a stage: the device (a GPU's name), torch's thread count and the host's CPU count."""
    device = torch.device(device)
    if device.type == "cuda":
        what = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        what = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores)"
    return f"{what}, torch {torch.__version__}"


def stage_record(
    *,
    objective: str,
    samples: int,
    steps: int,
    batch_size: int,
    wall_time_s: float,
    machine: str,
    init_from: str | None,
    command: str | None = None,
) -> dict[str, Any]:
    """One entry of a model's training history (``history.json``)."""
    return {
        "command": command if command is not None else " ".join(["vqdiffusion", *sys.argv[1:]]),
        "objective": objective,
        "samples_seen": int(samples),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "wall_time_s": round(float(wall_time_s), 1),
        "machine": machine,
        "init_from": init_from,
    }
