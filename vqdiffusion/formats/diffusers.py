"""diffusers' VQ-Diffusion layout, read and written (diffusers itself is needed for neither).

The layout is what ``diffusers.VQDiffusionPipeline.save_pretrained`` writes: ``model_index.json``,
``vqvae/``, ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and
``learned_classifier_free_sampling_embeddings/``.  Weights are ``diffusion_pytorch_model.safetensors`` (or
the legacy ``.bin``, read without unpickling objects); the key maps are :mod:`.diffusers_vqvae` and
:mod:`.diffusers_denoiser`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, read_json_object
from ..diffusion import MaskReplaceSchedule
from ..io import atomic_write_text, find_weights, load_module, save_safetensors
from ..models.conditions import CLIPTextCondition
from ..models.denoiser import Denoiser, denoiser_part_counts
from ..models.vqvae import VQVAE, vqvae_part_counts
from ..sampling import DEFAULT_GUIDANCE_SCALE, SamplingOptions
from .components import PipelineComponents, load_null_condition
from .diffusers_denoiser import (
    denoiser_config_from_diffusers,
    denoiser_config_to_diffusers,
    denoiser_state_dict_from_diffusers,
    denoiser_state_dict_to_diffusers,
)
from .diffusers_vqvae import (
    vqvae_config_from_diffusers,
    vqvae_config_to_diffusers,
    vqvae_state_dict_from_diffusers,
    vqvae_state_dict_to_diffusers,
)

__all__ = [
    "DIFFUSERS_VERSION",
    "INDEX_FILE",
    "load_diffusers",
    "save_diffusers",
    "schedule_from_diffusers",
    "schedule_to_diffusers",
]

DIFFUSERS_VERSION = "0.42.1"  # the version whose layout this writes (and the tests load)
INDEX_FILE = "model_index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
NULL_DIR = "learned_classifier_free_sampling_embeddings"
NULL_MODULE = "diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion"


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
def load_diffusers(root: Path, *, text_pad_token_id: int | None | Literal["auto"] = "auto") -> PipelineComponents:
    """Read a diffusers-layout folder.

    ``text_pad_token_id``: "auto" is the authors' 0 (the published models were trained with the authors'
    tokenizer, not diffusers' ``<|endoftext|>`` padding); an int or None (the tokenizer's padding) replaces
    it.  Default sampling settings: guidance :data:`~vqdiffusion.sampling.DEFAULT_GUIDANCE_SCALE` with a
    learned null text, else 1.
    """
    root = Path(root)
    index = read_json_object(root / INDEX_FILE)
    if index.get("_class_name") != "VQDiffusionPipeline":
        raise ValueError(f"{root / INDEX_FILE} describes a {index.get('_class_name')!r}, not a VQDiffusionPipeline")
    # Each module's sizes are checked against its weights file's header before it is allocated (load_module).
    vq_cfg = vqvae_config_from_diffusers(read_json_object(root / "vqvae" / "config.json"))
    vqvae = load_module(
        lambda: VQVAE(vq_cfg),
        find_weights(root / "vqvae", WEIGHT_STEMS),
        f"{root}/vqvae",
        convert=lambda state: vqvae_state_dict_from_diffusers(state, vq_cfg),
        counts=vqvae_part_counts(vq_cfg),
    )
    den_cfg = denoiser_config_from_diffusers(read_json_object(root / "transformer" / "config.json"))
    denoiser = load_module(
        lambda: Denoiser(den_cfg),
        find_weights(root / "transformer", WEIGHT_STEMS),
        f"{root}/transformer",
        convert=lambda state: denoiser_state_dict_from_diffusers(state, den_cfg),
        counts=denoiser_part_counts(den_cfg),
    )
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_path)
    steps = scheduler.get("num_train_timesteps", 100)
    if steps != den_cfg.num_timesteps:  # before the schedule's T-entry tables are built
        raise ConfigError(
            f"{scheduler_path}: num_train_timesteps={steps!r} but the transformer embeds {den_cfg.num_timesteps} steps"
        )
    schedule = schedule_from_diffusers(scheduler)
    pad = 0 if text_pad_token_id == "auto" else text_pad_token_id
    text_encoder = CLIPTextCondition.from_pretrained(root / "text_encoder", root / "tokenizer", pad_token_id=pad)
    null_condition = None
    null_dir = root / NULL_DIR
    if null_dir.is_dir():
        null_cfg = read_json_object(null_dir / "config.json")
        if null_cfg.get("learnable"):
            null_condition = load_null_condition(find_weights(null_dir, WEIGHT_STEMS), "embeddings")
    return PipelineComponents(
        vqvae=vqvae,
        denoiser=denoiser,
        schedule=schedule,
        text_encoder=text_encoder,
        null_condition=null_condition,
        defaults=SamplingOptions(
            # diffusers' 100 steps (all T of a model with fewer)
            num_inference_steps=min(SamplingOptions.num_inference_steps, schedule.num_timesteps),
            guidance_scale=DEFAULT_GUIDANCE_SCALE if null_condition is not None else 1.0,
        ),
    )


def schedule_from_diffusers(config: dict[str, Any]) -> MaskReplaceSchedule:
    """``VQDiffusionScheduler`` config (``num_vec_classes`` counts [MASK]) -> our schedule."""
    try:
        return MaskReplaceSchedule(
            num_classes=int(config["num_vec_classes"]) - 1,
            num_timesteps=int(config.get("num_train_timesteps", 100)),
            alpha_cum_start=float(config.get("alpha_cum_start", 0.99999)),
            alpha_cum_end=float(config.get("alpha_cum_end", 0.000009)),
            gamma_cum_start=float(config.get("gamma_cum_start", 0.000009)),
            gamma_cum_end=float(config.get("gamma_cum_end", 0.99999)),
        )
    except KeyError as err:
        raise ConfigError(f"scheduler config lacks {err}") from None


def schedule_to_diffusers(schedule: MaskReplaceSchedule) -> dict[str, Any]:
    """Our schedule -> ``VQDiffusionScheduler`` config kwargs."""
    return {
        "num_vec_classes": schedule.num_classes + 1,
        "num_train_timesteps": schedule.num_timesteps,
        "alpha_cum_start": schedule.alpha_cum_start,
        "alpha_cum_end": schedule.alpha_cum_end,
        "gamma_cum_start": schedule.gamma_cum_start,
        "gamma_cum_end": schedule.gamma_cum_end,
    }


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def _write_config(path: Path, class_name: str, config: dict[str, Any]) -> None:
    data = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_diffusers(components: PipelineComponents, path: str | os.PathLike) -> Path:
    """Write ``components`` as a diffusers-layout directory; ConfigError when diffusers cannot hold the model.

    diffusers pads prompts with ``<|endoftext|>``; a model trained with another padding (e.g. the authors'
    0) loses that information here, and ``from_pretrained`` of the result assumes the authors' 0 again.
    """
    root = Path(path)
    den_cfg = components.denoiser.config
    if den_cfg.cond_dim is None or components.text_encoder is None:
        kind = "class-conditional" if den_cfg.num_class_labels is not None else "unconditional"
        raise ConfigError(
            f"diffusers' VQDiffusionPipeline is text-conditional only; this model is {kind} and cannot be "
            "written in the diffusers layout (convert it to ours: --to ours)"
        )
    _write_config(root / "vqvae" / "config.json", "VQModel", vqvae_config_to_diffusers(components.vqvae.config))
    save_safetensors(
        vqvae_state_dict_to_diffusers(components.vqvae.state_dict(), components.vqvae.config), root / "vqvae" / WEIGHTS
    )
    _write_config(root / "transformer" / "config.json", "Transformer2DModel", denoiser_config_to_diffusers(den_cfg))
    save_safetensors(
        denoiser_state_dict_to_diffusers(components.denoiser.state_dict(), den_cfg), root / "transformer" / WEIGHTS
    )
    _write_config(
        root / "scheduler" / "scheduler_config.json", "VQDiffusionScheduler", schedule_to_diffusers(components.schedule)
    )
    components.text_encoder.save_pretrained(root / "text_encoder", root / "tokenizer")
    null_dir = root / NULL_DIR
    if components.null_condition is not None:
        length, hidden = components.null_condition.embedding.shape
        _write_config(
            null_dir / "config.json",
            "LearnedClassifierFreeSamplingEmbeddings",
            {"learnable": True, "hidden_size": int(hidden), "length": int(length)},
        )
        save_safetensors({"embeddings": components.null_condition.embedding}, null_dir / WEIGHTS)
    else:
        _write_config(
            null_dir / "config.json",
            "LearnedClassifierFreeSamplingEmbeddings",
            {"learnable": False, "hidden_size": None, "length": None},
        )
    index = {
        # diffusers itself writes ["diffusers", ...] here, which it cannot load back (the class is not
        # exported at the top level); the module path lets diffusers.VQDiffusionPipeline.from_pretrained load it.
        "learned_classifier_free_sampling_embeddings": [NULL_MODULE, "LearnedClassifierFreeSamplingEmbeddings"],
        "scheduler": ["diffusers", "VQDiffusionScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "Transformer2DModel"],
        "vqvae": ["diffusers", "VQModel"],
    }
    _write_config(root / INDEX_FILE, "VQDiffusionPipeline", index)
    return root
