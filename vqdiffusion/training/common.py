"""Training utilities shared by the tokenizer and denoiser trainers.

* Checkpoints: one safetensors file per checkpoint, written atomically, with a JSON document in the
  safetensors metadata (``save_checkpoint`` / ``load_checkpoint``; nothing is ever unpickled).  Nested
  state such as ``optimizer.state_dict()`` is split into tensors plus JSON by ``flatten_state`` and rebuilt
  exactly by ``unflatten_state`` (tuples, integer keys and 0-dim tensors included).
* RNG: ``capture_rng_state`` / ``restore_rng_state`` for torch (CPU and every CUDA device), numpy's global
  generator and Python's ``random``; ``seed_everything``.
* ``EMA`` of model parameters, ``CSVLogger`` (plus TensorBoard when installed), ``lr_at`` (warm-up then
  constant or cosine, a pure function of the step so a resumed run gets the same rates), and
  ``StepBatchSampler`` (the batch of step ``s`` is a pure function of ``(seed, s)``, so resuming needs no
  data-loader state).

Checkpoint key convention used by the trainers: tensors are namespaced by a prefix and a dot (``model.``,
``ema.``, ``optimizer.``, ``rng.``); :func:`with_prefix` and :func:`take_prefix` add and remove one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Sampler

__all__ = [
    "CSVLogger",
    "CHECKPOINT_FORMAT",
    "EMA",
    "LR_SCHEDULES",
    "StepBatchSampler",
    "capture_rng_state",
    "checkpoint_path",
    "find_latest_checkpoint",
    "flatten_state",
    "load_checkpoint",
    "load_optimizer",
    "lr_at",
    "optimizer_to_tensors",
    "prune_checkpoints",
    "read_checkpoint_meta",
    "resolve_device",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_lr",
    "take_prefix",
    "unflatten_state",
    "with_prefix",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vqdiffusion.checkpoint"
CHECKPOINT_FORMAT_VERSION = "1"
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------


def with_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{k: v}`` -> ``{prefix + "." + k: v}``."""
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def take_prefix(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix + "."``, with the prefix removed."""
    start = f"{prefix}."
    return {key[len(start) :]: value for key, value in tensors.items() if key.startswith(start)}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; any other name is checked and returned as a device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"invalid device {name!r} ({err}); use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def autocast_context(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a ``mixed_precision`` setting (``"no"``, ``"bf16"``, ``"fp16"``) on ``device``."""
    if mode == "no":
        return contextlib.nullcontext()
    if mode not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {mode!r}")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON)
# ---------------------------------------------------------------------------------------------------------

_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


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


# ---------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------------------


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(out, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a :func:`save_checkpoint` file: ``(tensors on CPU, meta)``.  Never unpickles anything.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not such a checkpoint.
    """
    return _read_checkpoint(Path(path), with_tensors=True)


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Only the ``meta`` of a :func:`save_checkpoint` file (no tensor is read)."""
    return _read_checkpoint(Path(path), with_tensors=False)[1]


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
    except json.JSONDecodeError as err:
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


# ---------------------------------------------------------------------------------------------------------
# Exponential moving average of parameters
# ---------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's floating-point parameters.

    ``shadow <- decay * shadow + (1 - decay) * param`` on each :meth:`update`; the shadow tensors live on
    the parameters' devices and dtypes.  :meth:`state_dict` maps parameter names to shadow tensors (a
    parameter-only model state dict); :meth:`copy_to` writes them into a model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.is_floating_point()}

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = {name: p for name, p in model.named_parameters() if name in self.shadow}
        if len(params) != len(self.shadow):
            missing = sorted(set(self.shadow) - set(params))
            raise ValueError(f"EMA: the model lacks parameters {missing[:3]} (of {len(missing)} missing)")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averages one step towards ``model``'s current parameters."""
        weight = 1.0 - self.decay
        for name, param in self._params(model).items():
            self.shadow[name].lerp_(param.detach(), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averages."""
        for name, param in self._params(model).items():
            param.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, tensor in state.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state {name}: shape {tuple(tensor.shape)} vs {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        return self


# ---------------------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------------------


def lr_at(step: int, base_lr: float, warmup: int, total: int, kind: str = "constant", min_lr: float = 0.0) -> float:
    """Learning rate of optimizer update ``step`` (0-based).

    Linear warm-up ``base_lr * (step + 1) / warmup`` for ``step < warmup``; then ``base_lr`` (``"constant"``)
    or a cosine from ``base_lr`` at ``step = warmup`` to ``min_lr`` at ``step = total`` and after
    (``"cosine"``).
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {LR_SCHEDULES}")
    if step < 0 or warmup < 0 or total < 0:
        raise ValueError(f"lr_at: step, warmup and total must be >= 0, got {step}, {warmup}, {total}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------------------


class StepBatchSampler(Sampler[list[int]]):
    """Index batches for training steps ``start_step .. end_step - 1``, a pure function of the seed and step.

    The item stream is the concatenation of per-epoch permutations (epoch ``e`` uses
    ``numpy.random.default_rng([seed, e])``); step ``s`` takes stream positions ``s*B .. s*B + B - 1``, so
    a batch may straddle two epochs and a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, end_step: int):
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need num_items >= 1 and batch_size >= 1, got {num_items}, {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return self._cache[epoch]

    def batch(self, step: int) -> list[int]:
        """Dataset indices of the batch of ``step``."""
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.num_items)
            out.append(int(self.permutation(epoch)[offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


# ---------------------------------------------------------------------------------------------------------
# Metrics logging
# ---------------------------------------------------------------------------------------------------------


class CSVLogger:
    """Append rows ``step, metric...`` to a CSV file (and TensorBoard scalars when available).

    Args:
        path: CSV file.  A fresh run (``resume_step=None``) starts a new file; a resumed run keeps the rows
            with ``step <= resume_step`` and drops later ones (written after the checkpoint it resumes).
        resume_step: see above.
        tensorboard_dir: if given and ``torch.utils.tensorboard`` imports, scalars are also written there.

    Columns are fixed by the first row; a row with new metric names rewrites the file with extra columns.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume_step: int | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = []
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                rows = [row for row in reader if _row_step(row) <= resume_step]
        self._rewrite(rows)
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("TensorBoard is not installed; metrics go to %s only", self.path)
            else:
                self._writer = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            if self.columns:
                writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one row; values are written with ``repr`` precision."""
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        new = [key for key in row if key not in self.columns]
        if new:
            with open(self.path, newline="") as f:
                old_rows = list(csv.DictReader(f)) if self.columns else []
            self.columns += new
            self._rewrite(old_rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)
        if self._writer is not None:
            for key, value in row.items():
                if key != "step":
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _row_step(row: Mapping[str, str]) -> float:
    try:
        return float(row.get("step", "inf"))
    except ValueError:
        return math.inf
