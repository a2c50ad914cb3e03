"""Write a pipeline in diffusers' VQ-Diffusion layout (the reverse of ``VQDiffusionPipeline._load_diffusers``).

The layout is what ``diffusers.VQDiffusionPipeline.save_pretrained`` writes: ``model_index.json``,
``vqvae/``, ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and
``learned_classifier_free_sampling_embeddings/``.  diffusers itself is not needed to write it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..io import atomic_write_text, save_safetensors
from .diffusers_denoiser import denoiser_config_to_diffusers, denoiser_state_dict_to_diffusers
from .diffusers_vqvae import vqvae_config_to_diffusers, vqvae_state_dict_to_diffusers

if TYPE_CHECKING:
    from ..pipeline import VQDiffusionPipeline

DIFFUSERS_VERSION = "0.42.1"  # the version whose layout this writes (and the tests load)
WEIGHTS = "diffusion_pytorch_model.safetensors"
NULL_MODULE = "diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion"


def _write_config(path: Path, class_name: str, config: dict[str, Any]) -> None:
    data = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_diffusers_layout(pipe: VQDiffusionPipeline, path: str | os.PathLike) -> Path:
    """Write ``pipe`` as a diffusers-layout directory; ConfigError when diffusers cannot hold the model.

    diffusers pads prompts with ``<|endoftext|>``; a model trained with another padding (e.g. the authors'
    0) loses that information here, and ``from_pretrained`` of the result assumes the authors' 0 again.
    """
    from ..pipeline import schedule_to_diffusers

    root = Path(path)
    den_cfg = pipe.denoiser.config
    if den_cfg.cond_dim is None or pipe.text_encoder is None:
        kind = "class-conditional" if den_cfg.num_class_labels is not None else "unconditional"
        raise ConfigError(
            f"diffusers' VQDiffusionPipeline is text-conditional only; this model is {kind} and cannot be "
            "written in the diffusers layout (convert it to ours: --to ours)"
        )
    _write_config(root / "vqvae" / "config.json", "VQModel", vqvae_config_to_diffusers(pipe.vqvae.config))
    save_safetensors(
        vqvae_state_dict_to_diffusers(pipe.vqvae.state_dict(), pipe.vqvae.config), root / "vqvae" / WEIGHTS
    )
    _write_config(root / "transformer" / "config.json", "Transformer2DModel", denoiser_config_to_diffusers(den_cfg))
    save_safetensors(
        denoiser_state_dict_to_diffusers(pipe.denoiser.state_dict(), den_cfg), root / "transformer" / WEIGHTS
    )
    _write_config(
        root / "scheduler" / "scheduler_config.json", "VQDiffusionScheduler", schedule_to_diffusers(pipe.schedule)
    )
    pipe.text_encoder.save_pretrained(root / "text_encoder", root / "tokenizer")
    null_dir = root / "learned_classifier_free_sampling_embeddings"
    if pipe.null_condition is not None:
        length, hidden = pipe.null_condition.embedding.shape
        _write_config(
            null_dir / "config.json",
            "LearnedClassifierFreeSamplingEmbeddings",
            {"learnable": True, "hidden_size": int(hidden), "length": int(length)},
        )
        save_safetensors({"embeddings": pipe.null_condition.embedding}, null_dir / WEIGHTS)
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
    _write_config(root / "model_index.json", "VQDiffusionPipeline", index)
    return root
