"""Files: the one atomic write, output-path checks, and safe weight files (safetensors for our format,
``torch.load(weights_only=True)`` for legacy ``.bin``/``.pth``), checked against the module they fill (names,
shapes and dtypes read from the file's header before anything is allocated, then finite values)."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = True) -> Path:
    """Create ``path`` atomically through ``write(tmp)``, a writer that takes a path (safetensors ``save_file``,
    PIL ``Image.save``, ...).

    ``tmp`` is a fresh file in the same folder whose name ends with ``path``'s extension (writers that pick
    the format from it keep working); once ``write`` returns it is flushed to disk (``fsync``) and renamed
    over ``path`` with :func:`os.replace`, so readers and crashes see the old file or the new one, never a
    partial one.  On any error the temporary file is removed and the old ``path`` is left untouched; an
    OSError of the writer (a full disk: ENOSPC) is raised again naming ``path`` instead of the temporary file.
    Missing parent folders are created (see :func:`check_output_path` for the errors).  Returns ``path``.

    A ``path`` that exists and is neither a regular file nor a folder (a device such as ``/dev/null`` or
    ``/dev/full``, a pipe) cannot be replaced: ``write(path)`` writes to it directly, and its errors are raised.
    """
    path = Path(path)
    if is_stream(path):
        return _write_directly(path, write)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as err:
        raise _naming(err, path, err.filename) from err
    os.close(fd)
    try:
        try:
            write(Path(tmp))
            # mkstemp makes the file private (0600, and some writers recreate it so): give it the mode a plain
            # open() would, the replaced file's or 0666 less the umask for a new one
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask())
            if fsync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise _naming(err, path, tmp) from err
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_folder(path.parent)
    return path


# The temporary files of atomic_write_with: ".<name>.<8 random characters>.tmp<suffix>".
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^.]+)?$")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write_with` left in ``folder`` and its subfolders when
    its process was killed mid-write (they are never read); returns them.  Only call this while no other
    process writes there (e.g. holding a training run's lock)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    stale = [p for p in root.rglob(".*.tmp*") if _TEMP_NAME.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def is_special_file(path: str | os.PathLike) -> bool:
    """``path`` exists and is neither a regular file nor a folder (a device, a pipe, a socket)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


# Names of this process's own streams: symlinks into /proc/self/fd, whatever they are redirected to (a pipe,
# a terminal or a regular file); never replaced by a rename.
_STREAM_NAMES = ("/dev/stdin", "/dev/stdout", "/dev/stderr")
_STREAM_PREFIXES = ("/dev/fd/", "/proc/self/fd/")


def is_stream(path: str | os.PathLike) -> bool:
    """``path`` is written in place, never replaced: a device or a pipe (:func:`is_special_file`), or a name
    of this process's standard output, standard error or a file descriptor (``/dev/stdout``, ``/dev/fd/N``),
    even when that is redirected to a regular file."""
    name = os.path.normpath(os.fspath(path))
    return is_special_file(path) or name in _STREAM_NAMES or name.startswith(_STREAM_PREFIXES)


def write_stream_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to the stream ``path`` (see :func:`is_stream`) in one sequential write: nothing is
    sought, so a pipe works.  The process's own standard output is written through ``sys.stdout`` (after
    what was printed before); another stream is opened for appending (a redirected file is not truncated).
    An OSError names ``path``."""
    import sys

    path = Path(path)
    try:
        if _is_standard_output(path):
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            with open(path, "ab") as f:
                f.write(data)
    except OSError as err:
        raise _naming(err, path, None) from err
    return path


def _is_standard_output(path: Path) -> bool:
    import sys

    try:
        return os.path.samestat(path.stat(), os.fstat(sys.stdout.fileno()))
    except (OSError, AttributeError, ValueError):  # no real stdout (captured, closed)
        return False


def _umask() -> int:
    """The process's file-creation mask (read by setting it and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_directly(path: Path, write: Callable[[Path], object]) -> Path:
    try:
        write(path)
    except OSError as err:
        raise _naming(err, path, None) from err
    return path


def _naming(err: OSError, path: Path, tmp: str | None) -> OSError:
    """``err`` with ``path`` as its file name (the writer may name the temporary file, or nothing)."""
    if err.errno is None or err.filename not in (None, tmp):
        return err
    return type(err)(err.errno, err.strerror or os.strerror(err.errno), str(path))


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform or file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputPathError(NotADirectoryError):
    """An output path goes through, or is, a file where a folder is needed (or the reverse)."""


class OutputPermissionError(PermissionError):
    """An output path lies in a folder this process may not write to."""


def check_output_path(path: str | os.PathLike, *, folder: bool = False, what: str = "output") -> Path:
    """Check, before anything is computed, that ``path`` can be written: a file (``folder=False``) or a folder
    of files (``folder=True``), creating nothing.

    Raises :class:`OutputPathError` (a NotADirectoryError) when a file stands where a folder is needed (a
    parent of ``path``, or ``path`` itself for a folder) or ``path`` is a folder where a file is needed, and
    :class:`OutputPermissionError` (a PermissionError) when the deepest existing folder is not writable.
    ``what`` names the path in the messages (e.g. ``"--output"``).  Returns ``path``.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise OutputPathError(f"{what} {path} is a file, not a folder; choose a folder name")
        if not folder and path.is_dir():
            raise OutputPathError(f"{what} {path} is a folder, not a file; give a file name inside it")
        if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
            raise OutputPermissionError(f"{what} {path}: permission denied (the folder is not writable)")
        if not folder and path.is_file() and not os.access(path, os.W_OK):
            raise OutputPermissionError(f"{what} {path}: permission denied (the file is read-only)")
        if folder or is_special_file(path):
            return path
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(
            f"{what} {path}: {existing} is a file, not a folder; choose a path that does not go through it"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPermissionError(
            f"{what} {path}: permission denied ({existing} is not writable); choose a location you can write to"
        )
    return path


class OutputExistsError(ValueError):
    """An output folder that already holds files, refused unless the caller asked to overwrite it."""


def check_new_folder(path: str | os.PathLike, *, overwrite: bool = False, what: str = "the output folder") -> Path:
    """``path`` as an output folder: refused (:class:`OutputExistsError`) when it exists and is not empty,
    unless ``overwrite``; a file there is refused as :func:`check_output_path` refuses it."""
    folder = check_output_path(path, folder=True, what=what)
    if not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise OutputExistsError(f"{what} {folder} exists and is not empty; choose a new folder or give --overwrite")
    return folder


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
    return _read_weights(Path(path), header_only=False)


def read_weights_header(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as ``meta`` tensors: their names, shapes and dtypes, no data read (a
    safetensors header; a legacy file is memory-mapped when it can be).  Errors as :func:`load_weights`."""
    return _read_weights(Path(path), header_only=True)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_weights(path: Path, header_only: bool) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            if not header_only:
                return load_file(str(path))
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = {}
                for key in f.keys():  # noqa: SIM118 (no __iter__)
                    part = f.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.uint8)  # others: refused as not float
                    header[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
                return header
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path} is not a valid safetensors file ({err})") from None
    if path.suffix in {".bin", ".pth", ".pt", ".ckpt"}:
        state = _torch_load(path, mmap=header_only)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} does not hold a flat dict of tensors")
        if header_only:
            return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
        return state
    raise ValueError(f"{path}: unsupported weights file type {path.suffix!r} (use .safetensors)")


def _torch_load(path: Path, *, mmap: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickle errors come in many types; report them as one clear error
        if mmap:  # files of the legacy (non-zip) format cannot be memory-mapped
            return _torch_load(path, mmap=False)
        raise ValueError(
            f"{path} could not be loaded as plain tensors with torch.load(weights_only=True): {err}"
        ) from None


def find_weights(folder: Path, stems: tuple[str, ...]) -> Path:
    """The first existing ``<stem>.safetensors`` (preferred) or ``<stem>.bin`` in ``folder``."""
    for suffix in (".safetensors", ".bin"):
        for stem in stems:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no weights file ({', '.join(stems)} .safetensors/.bin) in {folder}")


def check_weights_match(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str) -> None:
    """ValueError unless ``found`` has exactly the names of ``expected``, each with its shape, and floating point
    values where ``expected`` has them (an integer tensor is no model weight).  Works on ``meta`` tensors, so a
    file's header can be checked before the module is allocated."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the configured model: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, tensor in found.items():
        own = expected[key]
        if tuple(tensor.shape) != tuple(own.shape):
            raise ValueError(
                f"{source}: {key} has shape {tuple(tensor.shape)} but the config expects {tuple(own.shape)}"
            )
        if own.is_floating_point() and not tensor.is_floating_point():
            raise ValueError(
                f"{source}: {key} is stored as {tensor.dtype}, not as floating point numbers; the weights file is "
                "damaged or not this model's (re-export or re-download it)"
            )


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """ValueError naming the first floating point tensor that holds NaN or infinite values."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.device.type != "meta":
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(
                    f"{source}: {key} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the weights are "
                    "damaged (re-export or re-download the model)"
                )


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict ``load_state_dict`` whose errors name the missing/unexpected keys, mismatched shapes, integer
    tensors where weights are floating point, and tensors holding NaN or infinite values."""
    check_weights_match(module.state_dict(), state, source)
    check_finite(state, source)
    module.load_state_dict(state, strict=True)


M = TypeVar("M", bound=nn.Module)


def load_module(
    build: Callable[[], M],
    path: str | os.PathLike,
    source: str,
    *,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    counts: Mapping[str, int] | None = None,
) -> M:
    """``build()`` with the weights of ``path`` loaded (:func:`load_into`); ``convert`` renames a state dict
    of the file's layout to the module's.

    Nothing is allocated before the file's header (:func:`read_weights_header`) is checked against the
    module built on the ``meta`` device, so a config asking for absurd sizes fails at once, naming the
    tensor and both shapes.  ``counts`` (config field -> the number of repeated parts it builds, such as
    layers) must each fit the number of tensors in the file, which bounds even the meta construction.
    """
    header = read_weights_header(path)
    for field, count in (counts or {}).items():
        if count > len(header):
            raise ValueError(
                f"{source}: the config asks for {field}={count}, but {path} holds only {len(header)} tensors; "
                "the config does not describe these weights"
            )
    if convert is not None:
        header = convert(header)
    with torch.device("meta"):
        skeleton = build()
    check_weights_match(skeleton.state_dict(), header, source)
    module = build()
    state = load_weights(path)
    load_into(module, convert(state) if convert is not None else state, source)
    return module
