"""Safe weight files: safetensors for our format, ``torch.load(weights_only=True)`` for legacy ``.bin``/``.pth``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = True) -> Path:
    """Create ``path`` atomically through ``write(tmp)``, a writer that takes a path (safetensors ``save_file``,
    PIL ``Image.save``, ...).

    ``tmp`` is a fresh file in the same folder whose name ends with ``path``'s extension (writers that pick
    the format from it keep working); once ``write`` returns it is flushed to disk (``fsync``) and renamed
    over ``path`` with :func:`os.replace`, so readers and crashes see the old file or the new one, never a
    partial one.  On any error the temporary file is removed and the old ``path`` is left untouched.
    Missing parent folders are created.  Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write_with`)."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_with`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` (moved to the CPU, made contiguous) to a safetensors file ``path`` atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_with(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


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
