"""A training run's claim on its output folder: one run per ``--out`` at a time.

:func:`claim_output_dir` checks that the folder can be written, creates it, and takes an exclusive lock on
``OUT/.vqdiffusion.lock`` (``flock``: the kernel drops it when the process ends, however it ends, so a killed
run never leaves a stale lock).  A second run on the same folder is refused with :class:`OutputDirInUseError`
before it touches anything.  Holding the lock, the run removes the temporary files of writes that a killed
run left behind (:func:`vqdiffusion.io.remove_stale_temp_files`; checkpoints are only ever renamed into place
complete, so no partial checkpoint is read).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType

from ..io import check_output_path, remove_stale_temp_files

__all__ = ["LOCK_FILE", "OutputDirInUseError", "RunLock", "claim_output_dir"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".vqdiffusion.lock"


class OutputDirInUseError(ValueError):
    """Another process holds the output folder's lock."""


class RunLock:
    """The held lock of :func:`claim_output_dir` (a context manager; :meth:`release` is idempotent)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def claim_output_dir(out_dir: str | os.PathLike, *, what: str = "--out", enabled: bool = True) -> RunLock:
    """Check and create ``out_dir``, lock it for this process, and remove stale temporary files in it.

    ``enabled=False`` (the non-main processes of a distributed run) claims nothing.  Raises
    :class:`OutputDirInUseError` when another run holds the folder, and the errors of
    :func:`vqdiffusion.io.check_output_path` for a folder that cannot be written.
    """
    out = Path(out_dir)
    path = out / LOCK_FILE
    if not enabled:
        return RunLock(path, None)
    check_output_path(out, folder=True, what=what)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked
        logger.warning("cannot lock %s on this platform; do not start two runs on it", out)
        return RunLock(path, None)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise OutputDirInUseError(
            f"{what} {out} is in use by another training run (process {holder}, lock {path}); wait for it to "
            f"finish or choose another {what}"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    for stale in remove_stale_temp_files(out):
        logger.info("removed %s, left by an interrupted write", stale)
    return RunLock(path, fd)
