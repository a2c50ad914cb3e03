"""CLIP score of captioned images (Hessel et al. 2021, "CLIPScore"), with a local CLIP model folder.

For image v with caption c, CLIP-S(c, v) = w * max(cos(E_T(c), E_I(v)), 0) with w = 2.5, where E_T and E_I
are the CLIP text and image embeddings (``CLIPModel``'s projected ``text_embeds`` and ``image_embeds``);
the reported ``clip_score`` is the mean over the images.  ``clip_score_100`` = 100 * mean max(cos, 0) is the
same number on the scale that torchmetrics and most text-to-image papers print.

The model, tokenizer and image processor are transformers' (``CLIPModel``, ``CLIPProcessor``), loaded from
the folder with ``local_files_only=True``.  The processor's own settings prepare the images (for OpenAI's
CLIP: bicubic resize of the shorter side to 224, centre crop, normalisation) and captions longer than the
text model's positions are truncated.  Hessel et al. prepend "A photo depicts" to each caption;
``prefix`` does that when asked (the default adds nothing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .folder import captions_of, list_images, read_rgb

__all__ = ["CLIP_WEIGHT", "clip_score", "load_clip"]

CLIP_WEIGHT = 2.5  # w of CLIP-S (Hessel et al. 2021)


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local folder in transformers' layout (nothing is downloaded)."""
    from transformers import CLIPModel, CLIPProcessor

    root = _check_clip_folder(path)
    try:
        model = CLIPModel.from_pretrained(str(root), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot load a CLIP model and processor from {root}: {first}") from None
    return model.to(device).eval(), processor


def _check_clip_folder(path: str | os.PathLike) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"CLIP model folder not found: {root}")
    if not (root / "config.json").is_file():
        raise ValueError(f"{root} is not a CLIP model folder (no config.json; expected transformers' layout)")
    return root


@torch.inference_mode()
def clip_score(
    samples: str | os.PathLike,
    clip: str | os.PathLike,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    prefix: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """The CLIP score of every captioned image in ``samples`` (see the module docstring); returns the report.

    Captions come from the folder's ``sample-set`` manifest or its captions file (see
    :func:`~vqdiffusion.eval.folder.captions_of`); every image needs one.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    _check_clip_folder(clip)
    root = Path(samples)
    paths = list_images(root, what="samples folder")
    captions = captions_of(root, paths)
    model, processor = load_clip(clip, device)
    max_length = int(model.config.text_config.max_position_embeddings)
    cosines = []
    for start in tqdm(range(0, len(paths), batch_size), desc="clip score", unit="batch", disable=not progress):
        images = [read_rgb(p) for p in paths[start : start + batch_size]]
        texts = [prefix + str(c) for c in captions[start : start + batch_size]]
        inputs = processor(
            text=texts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        out = model(**{k: v.to(model.device) for k, v in inputs.items()})
        text = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
        image = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
        cosines.append((text * image).sum(dim=-1).cpu())
    cos = torch.cat(cosines)
    clipped = cos.clamp_min(0.0)
    image_processor = processor.image_processor
    return {
        "suite": "clipscore",
        "metrics": {
            "clip_score": float(CLIP_WEIGHT * clipped.mean()),
            "clip_score_100": float(100.0 * clipped.mean()),
            "cosine_mean": float(cos.mean()),
        },
        "samples": {"path": str(root), "num_images": len(paths)},
        "clip": {
            "path": str(clip),
            "projection_dim": int(model.config.projection_dim),
            "image_size": int(model.config.vision_config.image_size),
            "text_max_length": max_length,
            "image_processor": {
                key: _jsonable(getattr(image_processor, key, None))
                for key in ("size", "crop_size", "resample", "do_center_crop", "image_mean", "image_std")
            },
        },
        "settings": {
            "definition": "clip_score = mean over images of 2.5 * max(cos(text_embeds, image_embeds), 0)",
            "w": CLIP_WEIGHT,
            "prefix": prefix,
            "truncation": f"captions truncated to {max_length} tokens",
            "batch_size": batch_size,
            "device": str(model.device),
        },
        "library": {"transformers": _version("transformers"), "torch": torch.__version__},
        "per_image": [
            {"file": p.relative_to(root).as_posix(), "caption": c, "clip_score": float(CLIP_WEIGHT * s)}
            for p, c, s in zip(paths, captions, clipped.tolist(), strict=True)
        ],
    }


def _jsonable(value: Any) -> Any:
    """Processor settings as JSON values (PIL's resampling enums become their integer)."""
    if isinstance(value, (str, bool, float, type(None))):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
