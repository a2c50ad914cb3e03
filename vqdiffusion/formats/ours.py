"""Our model folder layout: JSON configs and safetensors weights, one folder per component.

::

    vqdiffusion.json             the index (written last: a folder without it is an incomplete save)
    schedule.json                MaskReplaceSchedule
    defaults.json                SamplingOptions, the model's default sampling settings (optional)
    vqvae/                       config.json + model.safetensors (vqdiffusion.models.vqvae.save_vqvae)
    denoiser/                    config.json + model.safetensors
    text_encoder/, tokenizer/    text models: the CLIP text model and its tokenizer (transformers layout)
    null_condition.safetensors   text models with a learned null text: one tensor "embedding" [L, D]
    history.json                 how the model was trained (optional): {"stages": [one object per stage]}

Index, ``format_version`` 2 (written)::

    {"format": "vqdiffusion-pipeline", "format_version": 2, "condition": {ConditionConfig fields}}

with :class:`~vqdiffusion.models.conditions.ConditionConfig` describing the condition (kind, text sizes and
padding id, class label count, null input).  Version 1 (read only) had ``"condition": "text"|"class"|"none"``
and the keys ``null_condition`` ("learned"/"empty_prompt"), ``text_pad_token_id`` and ``null_class_label``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from ..config import ConfigBase, ConfigError, is_int, read_json_object
from ..diffusion import MaskReplaceSchedule
from ..io import atomic_write_text, load_module, save_safetensors
from ..models.conditions import CONDITION_KINDS, CLIPTextCondition, ConditionConfig, ConditionKind
from ..models.denoiser import Denoiser, DenoiserConfig, denoiser_part_counts
from ..models.vqvae import load_vqvae, save_vqvae
from ..sampling import SamplingOptions
from .components import PipelineComponents, load_null_condition

__all__ = [
    "DEFAULTS_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "NULL_CONDITION_FILE",
    "READABLE_VERSIONS",
    "SCHEDULE_FILE",
    "HISTORY_FILE",
    "condition_config",
    "index_condition",
    "load_ours",
    "read_history",
    "read_index",
    "save_ours",
    "write_history",
]

FORMAT_NAME = "vqdiffusion-pipeline"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INDEX_FILE = "vqdiffusion.json"
SCHEDULE_FILE = "schedule.json"
HISTORY_FILE = "history.json"
DEFAULTS_FILE = "defaults.json"
NULL_CONDITION_FILE = "null_condition.safetensors"
_INDEX_KEYS = {
    1: {"format", "format_version", "condition", "null_condition", "text_pad_token_id", "null_class_label"},
    2: {"format", "format_version", "condition"},
}

C = TypeVar("C", bound=ConfigBase)


# ---------------------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------------------
def condition_config(components: PipelineComponents) -> ConditionConfig:
    """The index's condition block for ``components``."""
    kind = components.condition_kind
    if kind == ConditionKind.TEXT:
        text = components.text_encoder
        if text is None:
            raise ConfigError("a text-conditional model needs a text encoder to be saved")
        return ConditionConfig(
            kind=ConditionKind.TEXT,
            dim=text.hidden_size,
            seq_len=text.max_length,
            pad_token_id=text.pad_token_id,
            null="learned" if components.null_condition is not None else "empty_prompt",
        )
    if kind == ConditionKind.CLASS:
        rows = components.denoiser.config.num_class_labels
        learned = components.null_class_label is not None
        return ConditionConfig(
            kind=ConditionKind.CLASS,
            dim=None,
            seq_len=None,
            num_labels=rows - (1 if learned else 0),
            null="learned" if learned else "none",
        )
    return ConditionConfig(kind="none", dim=None, seq_len=None, null="none")


def read_index(path: Path) -> dict[str, Any]:
    """The index file as a dict, its ``format``, ``format_version`` and keys checked (ConfigError naming the
    file and the field); the condition block is checked by :func:`index_condition`."""
    index = read_json_object(path)
    if index.get("format") != FORMAT_NAME:
        raise ConfigError(f"{path}: format must be {FORMAT_NAME!r}; unknown format {index.get('format')!r}")
    version = index.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ConfigError(
            f"{path}: format version {version!r} is not supported (format_version: this vqdiffusion reads "
            f"versions {list(READABLE_VERSIONS)})"
        )
    unknown = sorted(set(index) - _INDEX_KEYS[version])
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} in a version-{version} index")
    return index


def index_condition(path: Path, index: dict[str, Any]) -> ConditionConfig | _ConditionV1:
    """The condition block of a checked index: a :class:`ConditionConfig` (version 2), or the version-1
    fields, checked, as a :class:`_ConditionV1`."""
    block = index.get("condition")
    if index["format_version"] == 2:
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: condition must be a JSON object (ConditionConfig fields), got {block!r}")
        try:
            return ConditionConfig.from_dict(block)
        except ConfigError as err:
            raise ConfigError(f"{path}: condition: {err}") from None
    if block not in CONDITION_KINDS:
        raise ConfigError(f"{path}: condition kind {block!r} is not supported (text, class, none)")
    null, pad, label = index.get("null_condition"), index.get("text_pad_token_id"), index.get("null_class_label")
    if block == ConditionKind.TEXT:
        if null not in ("learned", "empty_prompt"):
            raise ConfigError(f"{path}: null_condition must be 'learned' or 'empty_prompt', got {null!r}")
        if pad is not None and not (is_int(pad) and pad >= 0):
            raise ConfigError(f"{path}: text_pad_token_id must be null or an id >= 0, got {pad!r}")
    else:
        for field, value in (("null_condition", null), ("text_pad_token_id", pad)):
            if value is not None:
                raise ConfigError(f"{path}: {field} is for text models; a {block!r} model needs null, got {value!r}")
    if label is not None and not (block == ConditionKind.CLASS and is_int(label) and label >= 0):
        raise ConfigError(f"{path}: null_class_label must be null or (class models) a label >= 0, got {label!r}")
    return _ConditionV1(kind=block, null=null, pad_token_id=pad, null_class_label=label)


@dataclasses.dataclass(frozen=True)
class _ConditionV1:
    """A version-1 index's condition fields (no sizes; the null class given as a label)."""

    kind: str
    null: str | None
    pad_token_id: int | None
    null_class_label: int | None


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def save_ours(
    components: PipelineComponents, path: str | os.PathLike, *, weights_dtype: torch.dtype | None = None
) -> Path:
    """Write ``components`` in our layout (see the module docstring); returns the folder.

    ``weights_dtype`` (e.g. ``torch.float16``) stores the VQ-VAE, denoiser and null-condition floating point
    weights in that dtype (half the size); loading casts them back to the modules' dtype.  The text encoder
    is always stored as it is.
    """
    root = Path(path)
    condition = condition_config(components)  # before anything is written: a model we cannot describe fails
    root.mkdir(parents=True, exist_ok=True)
    components.schedule.save_json(root / SCHEDULE_FILE)
    (components.defaults or SamplingOptions()).save_json(root / DEFAULTS_FILE)
    save_vqvae(components.vqvae, root / "vqvae", weights_dtype=weights_dtype)
    components.denoiser.config.save_json(root / "denoiser" / "config.json")
    save_safetensors(_stored(components.denoiser.state_dict(), weights_dtype), root / "denoiser" / "model.safetensors")
    if components.text_encoder is not None:
        components.text_encoder.save_pretrained(root / "text_encoder", root / "tokenizer")
        if components.null_condition is not None:
            null = _stored({"embedding": components.null_condition.embedding}, weights_dtype)
            save_safetensors(null, root / NULL_CONDITION_FILE)
    index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "condition": condition.to_dict()}
    atomic_write_text(root / INDEX_FILE, json.dumps(index, indent=2) + "\n")  # last: the save is complete
    return root


def write_history(path: str | os.PathLike, stages: list[dict[str, Any]]) -> Path:
    """Write a model folder's training history: ``{"stages": [...]}``, one JSON object per training stage
    (command, objective, samples seen, wall time, machine, the model it started from), oldest first."""
    if not all(isinstance(stage, dict) for stage in stages):
        raise ValueError("a training history is a list of JSON objects, one per stage")
    return atomic_write_text(Path(path) / HISTORY_FILE, json.dumps({"stages": stages}, indent=2) + "\n")


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The training stages recorded in a model folder's ``history.json`` (``[]`` when it has none)."""
    file = Path(path) / HISTORY_FILE
    if not file.is_file():
        return []
    stages = read_json_object(file).get("stages")
    if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
        raise ConfigError(f'{file} must hold {{"stages": [one object per stage]}}; got {stages!r:.80}')
    return stages


def _stored(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
def load_ours(root: Path, *, text_pad_token_id: int | None | Literal["auto"] = "auto") -> PipelineComponents:
    """Read a folder of our layout (index version 1 or 2).

    ``text_pad_token_id``: "auto" uses the id the index records; an int or None replaces it.  Errors name the
    file (and the field) at fault: FileNotFoundError for a missing file, ConfigError/ValueError otherwise.
    """
    root = Path(root)
    index_path = root / INDEX_FILE
    condition = index_condition(index_path, read_index(index_path))
    # Sizes first, checked against the weights files' headers before anything is allocated; then the schedule
    # (its tables have T entries), checked against the denoiser's sizes before it is built.
    den_cfg = _load_config(DenoiserConfig, root / "denoiser" / "config.json")
    denoiser = load_module(
        lambda: Denoiser(den_cfg),
        root / "denoiser" / "model.safetensors",
        f"{root}/denoiser",
        counts=denoiser_part_counts(den_cfg),
    )
    vqvae = load_vqvae(root / "vqvae")
    schedule = _load_config(MaskReplaceSchedule, root / SCHEDULE_FILE, sizes_of=den_cfg)
    defaults = None
    if (root / DEFAULTS_FILE).exists():
        defaults = _load_config(SamplingOptions, root / DEFAULTS_FILE)
        try:
            defaults.validate(schedule.num_timesteps)
        except ValueError as err:
            raise ConfigError(f"{root / DEFAULTS_FILE}: {err} (T of {root / SCHEDULE_FILE})") from None
    if den_cfg.condition_kind != condition.kind:
        raise ConfigError(
            f"{index_path}: condition kind {condition.kind!r} does not match the denoiser "
            f"({root / 'denoiser' / 'config.json'} describes a {den_cfg.condition_kind!r} model)"
        )
    parts: dict[str, Any] = {"vqvae": vqvae, "denoiser": denoiser, "schedule": schedule, "defaults": defaults}
    if condition.kind == ConditionKind.CLASS:
        if isinstance(condition, _ConditionV1):
            parts["null_class_label"] = condition.null_class_label  # the pipeline checks it is the last row
        else:
            if condition.label_rows != den_cfg.num_class_labels:
                raise ConfigError(
                    f"{index_path}: condition.num_labels={condition.num_labels} with null={condition.null!r} "
                    f"needs {condition.label_rows} label rows, but the denoiser has {den_cfg.num_class_labels}"
                )
            parts["null_class_label"] = condition.null_label
    if condition.kind != ConditionKind.TEXT:
        return PipelineComponents(**parts)

    pad = condition.pad_token_id if text_pad_token_id == "auto" else text_pad_token_id
    text = CLIPTextCondition.from_pretrained(root / "text_encoder", root / "tokenizer", pad_token_id=pad)
    if isinstance(condition, ConditionConfig):
        for field, actual in (("dim", text.hidden_size), ("seq_len", text.max_length)):
            if getattr(condition, field) != actual:
                raise ConfigError(
                    f"{index_path}: condition.{field}={getattr(condition, field)} but the text encoder in "
                    f"{root / 'text_encoder'} gives {actual}"
                )
        if condition.null == "none":
            raise ConfigError(
                f"{index_path}: condition.null='none' is not supported for a text model (this pipeline guides with "
                "a learned null text or the empty prompt: 'learned' or 'empty_prompt')"
            )
    if condition.null == "learned":
        parts["null_condition"] = load_null_condition(root / NULL_CONDITION_FILE, "embedding")
    return PipelineComponents(text_encoder=text, **parts)


def _load_config(cls: type[C], path: Path, *, sizes_of: DenoiserConfig | None = None) -> C:
    """``cls.load_json(path)`` with errors that name the file (a missing file: FileNotFoundError).

    ``sizes_of``: K (``num_classes``) and T (``num_timesteps``) of the file must be the denoiser's, checked
    before ``cls`` is built (a schedule's tables have T entries)."""
    try:
        if sizes_of is not None:
            data = read_json_object(path)
            for field, letter in (("num_classes", "K"), ("num_timesteps", "T")):
                if field in data and data[field] != getattr(sizes_of, field):
                    raise ConfigError(
                        f"{path}: {field}={data[field]!r}, but the denoiser has {letter}={getattr(sizes_of, field)}"
                    )
            return cls.from_dict(data)
        return cls.load_json(path)
    except FileNotFoundError:
        raise
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if str(path) in message else f"{path}: {message}") from None
