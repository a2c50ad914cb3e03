"""Training checkpoints: one safetensors file per checkpoint, written atomically, with a JSON document in the
safetensors metadata (nothing is ever unpickled).

* :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`read_checkpoint_meta`; file names
  ``step_XXXXXXXX.safetensors`` (:func:`checkpoint_path`, :func:`find_latest_checkpoint`,
  :func:`prune_checkpoints`).
* Nested state such as ``optimizer.state_dict()`` is split into tensors plus JSON by :func:`flatten_state` and
  rebuilt exactly by :func:`unflatten_state` (tuples, integer keys and 0-dim tensors included).
* Global RNG states: :func:`capture_rng_state` / :func:`restore_rng_state` (torch CPU and CUDA, numpy, Python).
* :func:`check_resume_config`: which config fields may change when a run is resumed.

Key convention: tensors are namespaced by a prefix and a dot (``model.``, ``ema.``, ``optimizer.``, ``rng.``);
:func:`with_prefix` and :func:`take_prefix` add and remove one.  The ``kind`` of a checkpoint (its meta's
``"kind"``) is one of :data:`DENOISER_CHECKPOINT` and :data:`VQVAE_CHECKPOINT`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ConfigError
from ..io import atomic_write_with

logger = logging.getLogger(__name__)

DENOISER_CHECKPOINT = "denoiser"
VQVAE_CHECKPOINT = "vqvae"
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


CHECKPOINT_FORMAT = "vqdiffusion.checkpoint"


CHECKPOINT_FORMAT_VERSION = "1"


_CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


def with_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{k: v}`` -> ``{prefix + "." + k: v}``."""
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def take_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix + "."``, with the prefix removed."""
    start = f"{prefix}."
    return {key[len(start) :]: value for key, value in tensors.items() if key.startswith(start)}


def flatten_state(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tuples, numbers, strings, None, tensors) into tensors and JSON.

    Each tensor is stored under ``prefix.<path>`` (path components joined by dots) and replaced in the JSON
    by ``{"__tensor__": key}``; tuples become ``{"__tuple__": [...]}`` and dicts with non-string keys
    ``{"__dict__": [[key, value], ...]}``, so :func:`unflatten_state` rebuilds the exact same structure.
    Raises TypeError for any other value type.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            if path in tensors:
                raise ValueError(f"flatten_state: two entries map to the tensor key {path!r}")
            tensors[path] = obj
            return {_TENSOR: path}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, tuple):
            return {_TUPLE: [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, Mapping):
            plain = all(isinstance(k, str) for k in obj) and not ({_TENSOR, _TUPLE, _DICT} & set(obj))
            if plain:
                return {k: encode(v, f"{path}.{k}") for k, v in obj.items()}
            for k in obj:
                if not (k is None or isinstance(k, (bool, int, float, str))):
                    raise TypeError(f"flatten_state: unsupported dict key {k!r} at {path}")
            return {_DICT: [[k, encode(v, f"{path}.{k}")] for k, v in obj.items()]}
        raise TypeError(f"flatten_state: cannot store a {type(obj).__name__} ({obj!r}) at {path}")

    return tensors, encode(state, prefix)


def unflatten_state(meta: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`; raises KeyError naming a tensor key that is missing."""

    def decode(obj: Any) -> Any:
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        if isinstance(obj, dict):
            if set(obj) == {_TENSOR}:
                key = obj[_TENSOR]
                if key not in tensors:
                    raise KeyError(f"checkpoint is missing the tensor {key!r}")
                return tensors[key]
            if set(obj) == {_TUPLE}:
                return tuple(decode(v) for v in obj[_TUPLE])
            if set(obj) == {_DICT}:
                return {k: decode(v) for k, v in obj[_DICT]}
            return {k: decode(v) for k, v in obj.items()}
        return obj

    return decode(meta)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optimizer") -> tuple[dict, Any]:
    """``optimizer.state_dict()`` as ``(tensors keyed prefix.*, JSON meta)``; see :func:`load_optimizer`."""
    return flatten_state(optimizer.state_dict(), prefix)


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Any) -> None:
    """Restore ``optimizer`` from :func:`optimizer_to_tensors` output (state moves to the params' devices)."""
    state = unflatten_state(meta, tensors)
    own_groups = optimizer.state_dict()["param_groups"]
    groups = state.get("param_groups", []) if isinstance(state, dict) else []
    if len(groups) != len(own_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, own_groups, strict=True)
    ):
        raise ValueError(
            "optimizer checkpoint does not match the model: parameter group sizes "
            f"{[len(g['params']) for g in groups]} vs {[len(g['params']) for g in own_groups]}"
        )
    optimizer.load_state_dict(state)


def capture_rng_state(prefix: str = "rng") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states: torch CPU (and each CUDA device, once CUDA is initialised) as uint8 tensors under
    ``prefix.torch_cpu`` / ``prefix.cuda.<i>``, numpy and Python ``random`` as JSON."""
    tensors = {f"{prefix}.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "num_cuda": len(tensors) - 1,
    }
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str = "rng") -> None:
    """Inverse of :func:`capture_rng_state`.  CUDA states are restored when CUDA is available (a warning
    says so when a checkpoint written on GPUs is resumed without them or with fewer devices)."""
    torch.set_rng_state(tensors[f"{prefix}.torch_cpu"])
    cuda = [tensors[f"{prefix}.cuda.{i}"] for i in range(int(meta.get("num_cuda", 0)))]
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
            for i, state in enumerate(cuda):
                torch.cuda.set_rng_state(state, device=i)
        else:
            logger.warning("checkpoint holds %d CUDA RNG states that cannot be restored here", len(cuda))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` and the JSON-serialisable ``meta`` to one safetensors file, atomically.

    The file is written to a temporary name in the same folder, flushed to disk, then renamed over
    ``path``, so a crash leaves either the old or the new checkpoint, never a partial one.  Tensors are
    copied to the CPU; tensors sharing memory are cloned (safetensors refuses shared storage).

    Format: safetensors metadata ``{"format": "vqdiffusion.checkpoint", "format_version": "1",
    "meta": json.dumps(meta)}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint meta is not JSON-serialisable: {err}") from None
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(storage)
        out[key] = tensor
    metadata = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, "meta": meta_json}
    atomic_write_with(path, lambda tmp: save_file(out, str(tmp), metadata=metadata))


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a :func:`save_checkpoint` file: ``(tensors on CPU, meta)``.  Never unpickles anything.

    With ``kind`` (:data:`DENOISER_CHECKPOINT` or :data:`VQVAE_CHECKPOINT`) the meta and tensors are checked
    to be a training checkpoint of that kind (:func:`check_checkpoint`).  Raises FileNotFoundError for a
    missing file and ValueError for a file that is not such a checkpoint.
    """
    tensors, meta = _read_checkpoint(Path(path), with_tensors=True)
    if kind is not None:
        check_checkpoint(meta, str(path), kind, tensors)
    return tensors, meta


def read_checkpoint_meta(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Only the ``meta`` of a :func:`save_checkpoint` file (no tensor is read), checked as
    :func:`load_checkpoint` does when ``kind`` is given."""
    meta = _read_checkpoint(Path(path), with_tensors=False)[1]
    if kind is not None:
        check_checkpoint(meta, str(path), kind)
    return meta


class CheckpointError(ValueError):
    """A training checkpoint whose meta or tensors are not what its trainer wrote (damaged or crafted)."""


# The meta fields of each kind of checkpoint and the JSON types they must have (None: may be null); those in
# _REQUIRED must be there (the others are read with a default, so older checkpoints may lack them).
_OBJECT, _LIST, _TEXT = (dict,), (list,), (str,)
_MAYBE_OBJECT, _MAYBE_LIST = (dict, type(None)), (list, type(None))
_META_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    DENOISER_CHECKPOINT: {
        "config": _OBJECT,
        "denoiser_config": _OBJECT,
        "schedule": _OBJECT,
        "condition": _TEXT,
        "class_names": _MAYBE_LIST,
        "text_model_config": _MAYBE_OBJECT,
        "data": _OBJECT,
        "optimizer": _OBJECT,
        "scaler": _MAYBE_OBJECT,
        "rng": _OBJECT,
    },
    VQVAE_CHECKPOINT: {
        "config": _OBJECT,
        "model_config": _OBJECT,
        "optimizer": _OBJECT,
        "disc_optimizer": _MAYBE_OBJECT,
        "rng": _OBJECT,
    },
}
_REQUIRED = frozenset({"config", "denoiser_config", "model_config", "schedule", "optimizer", "rng"})
# The weights each kind must hold (the EMA weights are what a denoiser run exports), and those that must be
# finite.
_WEIGHTS = {DENOISER_CHECKPOINT: ("model.", "ema."), VQVAE_CHECKPOINT: ("model.",)}
_FINITE = ("model.", "ema.", "codebook_ema.", "disc.")
_RETRAIN = "resume from an earlier checkpoint or train again"


def check_checkpoint(
    meta: Any, source: str, kind: str, tensors: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """The one validation of a training checkpoint's meta (and, when given, its tensors): every field its
    trainer reads has the type it wrote, each tensor the meta refers to is there, and the weights are finite.
    Raises :class:`CheckpointError` naming the file, the field and the fix; returns ``meta``."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: the checkpoint metadata is a JSON {type(meta).__name__}, not an object")
    if "kind" not in meta:
        raise CheckpointError(f"{source}: the checkpoint metadata has no 'kind' (expected {kind!r}); {_RETRAIN}")
    if meta["kind"] != kind:
        raise CheckpointError(f"{source} is a {meta['kind']!r} checkpoint, not a {kind} training checkpoint")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{source}: the checkpoint's 'step' must be an integer >= 0, got {step!r}")
    for field, types in _META_FIELDS[kind].items():
        if field not in meta and field not in _REQUIRED:
            continue
        if field not in meta or not isinstance(meta[field], types):
            found = "missing" if field not in meta else f"a JSON {type(meta[field]).__name__}"
            wanted = " or ".join("null" if t is type(None) else _JSON_NAMES[t] for t in types)
            raise CheckpointError(f"{source}: the checkpoint's {field!r} is {found}, not {wanted}; {_RETRAIN}")
    _check_rng_meta(meta["rng"], source)
    for field in ("optimizer", "disc_optimizer"):
        if meta.get(field) is not None:
            _check_optimizer_meta(meta[field], source, field)
    if tensors is not None:
        _check_checkpoint_tensors(meta, source, kind, tensors)
    return meta


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string"}


def _check_rng_meta(rng: dict[str, Any], source: str) -> None:
    """The RNG states :func:`capture_rng_state` wrote: Python's (3 entries, 625 words), numpy's MT19937."""
    python, numpy_state, num_cuda = rng.get("python"), rng.get("numpy"), rng.get("num_cuda", 0)
    good = (
        isinstance(python, list)
        and len(python) == 3
        and _int_list(python[1], 625)
        and isinstance(numpy_state, list)
        and len(numpy_state) == 5
        and numpy_state[0] == "MT19937"
        and _int_list(numpy_state[1], 624)
        and all(isinstance(v, (int, float)) for v in numpy_state[2:])
        and isinstance(num_cuda, int)
        and 0 <= num_cuda <= 1024
    )
    if not good:
        raise CheckpointError(
            f"{source}: the checkpoint's random number generator states ('rng') are damaged; {_RETRAIN}"
        )


def _int_list(value: Any, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(isinstance(v, int) for v in value)


def _check_optimizer_meta(state: dict[str, Any], source: str, field: str) -> None:
    """An optimizer state dict: ``state`` and ``param_groups``, a list of objects each with a ``params`` list."""
    groups = state.get("param_groups")
    good = (
        "state" in state
        and isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    )
    if not good:
        raise CheckpointError(f"{source}: the checkpoint's optimizer state ({field!r}) is damaged; {_RETRAIN}")


def _tensor_keys(obj: Any) -> list[str]:
    """The tensor keys a :func:`flatten_state` document refers to."""
    found: list[str] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if set(item) == {_TENSOR} and isinstance(item[_TENSOR], str):
                found.append(item[_TENSOR])
            else:
                stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _check_checkpoint_tensors(
    meta: dict[str, Any], source: str, kind: str, tensors: Mapping[str, torch.Tensor]
) -> None:
    needed = [f"rng.cuda.{i}" for i in range(meta["rng"].get("num_cuda", 0))] + ["rng.torch_cpu"]
    if kind == VQVAE_CHECKPOINT:
        needed.append("rng.trainer")
    needed += _tensor_keys(meta["optimizer"]) + _tensor_keys(meta.get("disc_optimizer"))
    missing = [key for key in needed if key not in tensors]
    if missing:
        raise CheckpointError(
            f"{source}: the checkpoint lacks the tensor {missing[0]!r} ({len(missing)} missing); {_RETRAIN}"
        )
    for prefix in _WEIGHTS[kind]:
        if not any(key.startswith(prefix) for key in tensors):
            raise CheckpointError(f"{source}: the checkpoint holds no {prefix[:-1]!r} weights; {_RETRAIN}")
    for key, tensor in tensors.items():
        if key.startswith(_FINITE) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{source}: {key} holds NaN or infinite values (the run diverged before this checkpoint); {_RETRAIN}"
            )


def _read_checkpoint(path: Path, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if with_tensors:
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors checkpoint ({err})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a vqdiffusion training checkpoint (format {metadata.get('format')!r}); "
            "exported model folders are loaded with VQVAE/VQDiffusionPipeline instead"
        )
    if metadata.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported checkpoint format_version {metadata.get('format_version')!r} "
            f"(this version reads {CHECKPOINT_FORMAT_VERSION!r})"
        )
    try:
        meta = json.loads(metadata.get("meta", ""))
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: checkpoint metadata is not valid JSON ({err})") from None
    return tensors, meta


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    """``folder/step_<step, 8 digits>.safetensors``."""
    return Path(folder) / f"step_{step:08d}.safetensors"


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint of the highest step in ``folder``, or None when there is none."""
    found = _checkpoints(Path(folder))
    return found[-1][1] if found else None


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` most recent checkpoints in ``folder``."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for _, path in _checkpoints(Path(folder))[:-keep]:
        path.unlink(missing_ok=True)


def check_resume_config(saved: Any, new: Any, resumable: frozenset[str], source: str) -> None:
    """Raise ConfigError if the training config ``new`` differs from the checkpoint's ``saved`` in any field
    outside ``resumable``; the message names every differing field with both values."""
    old_d, new_d = saved.to_dict(), new.to_dict()
    changed = sorted(k for k in old_d if old_d[k] != new_d.get(k) and k not in resumable)
    if changed:
        details = ", ".join(f"{k}: {old_d[k]!r} -> {new_d.get(k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {source} with a different model or training setup ({details}); only "
            f"{sorted(resumable)} may change"
        )
    if (
        saved.steps != new.steps
        and getattr(new, "lr_schedule", None) == "cosine"
        and getattr(new, "lr_decay_steps", None) is None
    ):
        logger.warning("steps changed from %d to %d: the cosine schedule is stretched", saved.steps, new.steps)
