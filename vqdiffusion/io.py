"""Safe weight files: safetensors for our format, ``torch.load(weights_only=True)`` for legacy ``.bin``/``.pth``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or (legacy) ``.bin``/``.pth``/``.pt`` without unpickling objects.

    Raises FileNotFoundError for a missing file and ValueError for a corrupt or unsupported one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a valid safetensors file ({err})") from None
    if path.suffix in {".bin", ".pth", ".pt", ".ckpt"}:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors come in many types; report them as one clear error
            raise ValueError(
                f"{path} could not be loaded as plain tensors with torch.load(weights_only=True): {err}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} does not hold a flat dict of tensors")
        return state
    raise ValueError(f"{path}: unsupported weights file type {path.suffix!r} (use .safetensors)")


def find_weights(folder: Path, stems: tuple[str, ...]) -> Path:
    """The first existing ``<stem>.safetensors`` (preferred) or ``<stem>.bin`` in ``folder``."""
    for suffix in (".safetensors", ".bin"):
        for stem in stems:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no weights file ({', '.join(stems)} .safetensors/.bin) in {folder}")


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict ``load_state_dict`` whose errors name the missing/unexpected keys and mismatched shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the configured {type(module).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{source}: {key} has shape {tuple(tensor.shape)} but the config expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(state, strict=True)
