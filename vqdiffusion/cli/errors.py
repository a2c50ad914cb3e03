"""How the command line reports errors: one ``error: ...`` line on stderr and exit code 2, never a traceback.

:func:`report` is the one place that maps exceptions to that line; every command raises ordinary
exceptions (:class:`CLIError` for problems only the command line can name, such as a flag combination).
:func:`is_user_error` says which exceptions are the user's input or environment (bad values, files, folders,
devices, a full disk, too little memory) rather than a bug, whose traceback is kept.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import NoReturn

from ..config import first_line

USAGE_ERROR = 2
INTERRUPTED = 130


class CLIError(Exception):
    """A user error reported as one line with exit code 2."""


class UsageError(CLIError):
    """A value argparse cannot parse (not a number, not a choice, a missing argument)."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error:`` line (raised as :class:`UsageError` for
    :func:`report`), not argparse's usage block; ``--help`` still prints the usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# Exceptions that mean "bad input" (or an environment that cannot serve it): their message is what the user
# reads.  OSError covers files and folders (missing, permissions, a file where a folder belongs, a full disk).
USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    ValueError,  # ConfigError, DeviceError are ValueErrors
    OSError,  # FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, ENOSPC, ...
    FloatingPointError,
    RecursionError,  # input nested deeper than any of our files
    MemoryError,
    ModuleNotFoundError,  # an optional dependency that is not installed; our messages say which extra
)

# Phrases of torch's allocation failures (RuntimeErrors): the CPU allocator and CUDA's out of memory.
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "not enough memory")

# What an OS error on a path means for the user, and what to do (``{path}`` is the file it names).
_OS_MESSAGES = {
    errno.EACCES: "permission denied: {path}; choose a location you can write to (or change its permissions)",
    errno.EPERM: "operation not permitted on {path}; choose a location you can write to",
    errno.EROFS: "{path} is on a read-only file system; choose another location",
    errno.ENOSPC: (
        "no space left on the device while writing {path}; free some space or choose another location "
        "(a file being replaced keeps its previous version)"
    ),
    errno.EDQUOT: "disk quota exceeded while writing {path}; free some space or choose another location",
    errno.EEXIST: "{path} exists and is a file, not a folder; choose a path that does not go through it",
    errno.ENOTDIR: "{path}: part of this path is a file, not a folder; choose a path that does not go through it",
    errno.EISDIR: "{path} is a folder, not a file; give a file name",
    errno.ENOENT: "not found: {path}",
    errno.ENAMETOOLONG: "file name too long: {path}; choose a shorter name",
}


def is_out_of_memory(err: BaseException) -> bool:
    """A MemoryError, or torch's RuntimeError for an allocation that failed."""
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and any(p in str(err).lower() for p in _OUT_OF_MEMORY)


def is_user_error(err: BaseException) -> bool:
    """True for the exceptions :func:`report` prints as one line (a Ctrl-C included)."""
    return isinstance(err, (*USER_ERRORS, KeyboardInterrupt)) or is_out_of_memory(err)


def message_of(err: BaseException) -> str:
    """The one line :func:`report` prints after ``error: ``."""
    if is_out_of_memory(err):
        detail = first_line(err)
        detail = f" ({detail})" if detail and detail != type(err).__name__ else ""
        return (
            f"out of memory{detail}; ask for less at once (fewer images, a smaller batch or size) or use a machine "
            "with more memory"
        )
    if isinstance(err, RecursionError):
        return f"the input is nested too deeply to process ({first_line(err)}); it is not a vqdiffusion file"
    if isinstance(err, OSError) and err.errno is not None and (err.filename is not None or err.errno == errno.ENOSPC):
        path = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        template = _OS_MESSAGES.get(err.errno)
        if template is not None:
            return template.format(path=path if path is not None else "a file")
        return f"{err.strerror or 'error'}: {path}"
    return first_line(err)


def report(err: BaseException) -> int:
    """Print ``err`` as one ``error:`` line and return the exit code."""
    if isinstance(err, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    print(f"error: {message_of(err)}", file=sys.stderr)
    return USAGE_ERROR
