"""The one check of a device name (``--device``, ``device=``) that the command line, the pipeline and the
trainers share: a name torch cannot parse, a device type this build or machine does not have, or an index
beyond the devices present is refused with :class:`DeviceError` (a ValueError) naming the value and what to use;
and how much memory a device has left (:func:`available_memory`, for refusing work that cannot fit).
"""

from __future__ import annotations

import os

import torch

__all__ = ["DeviceError", "available_memory", "format_bytes", "resolve_device"]

_USE = "use cpu, cuda, cuda:N or auto"


class DeviceError(ValueError):
    """A device name that cannot be used on this machine."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; any other name is checked and returned as a device.

    Supported: ``cpu``, ``cuda``/``cuda:N`` (CUDA present, N below the device count) and ``mps`` (Apple GPUs,
    when available).  Everything else (an empty or unknown name, ``meta``, a type this build lacks) raises
    :class:`DeviceError`.
    """
    if isinstance(name, torch.device):
        device = name
        text = str(name)
    else:
        text = name
        if not isinstance(text, str) or not text.strip():
            raise DeviceError(f"device {text!r} is empty; {_USE}")
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError, TypeError):
            raise DeviceError(f"device {text!r} is not a device name; {_USE}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {text!r} requested but CUDA is not available on this machine; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise DeviceError(f"device {text!r} (Apple GPU) is not available on this machine; {_USE}")
        return device
    raise DeviceError(f"device {text!r} ({device.type}) is not supported for running models; {_USE}")


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``: CUDA's free memory, or the host's available memory
    (``MemAvailable`` of /proc/meminfo, else the physical memory); None when this cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(count: float) -> str:
    """``1.5 GB``-style size (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} PB"
