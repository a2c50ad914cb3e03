"""The training loop shared by the tokenizer and denoiser trainers.

A trainer is any object with ``step`` (completed optimizer steps), ``train_step(batch) -> dict`` of detached
device tensors (no host synchronisation), ``lr(step) -> float`` and ``save(path)``.  The loop owns what
both runs do the same way: start fresh or resume (:func:`checkpoint_to_resume`), the progress bar, the
logging window (one host synchronisation per window, a NaN check on the loss), and the cadence of sample
grids, checkpoints and their pruning.  Under DDP every rank runs the loop; only the main process logs,
samples and saves, and all ranks meet at a barrier after each save.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import checkpoint_path, find_latest_checkpoint, prune_checkpoints

__all__ = ["LoopSettings", "MetricWindow", "SumWindow", "Trainer", "checkpoint_to_resume", "run_loop"]


class Trainer(Protocol):
    step: int

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]: ...

    def lr(self, step: int) -> float: ...

    def save(self, path: str | os.PathLike) -> None: ...


class MetricWindow(Protocol):
    """Accumulates the results of the steps of one logging window."""

    def add(self, result: dict[str, torch.Tensor]) -> None: ...

    def summary(self) -> dict[str, float]:
        """Host-side means of the window (one synchronisation), then start a new window."""
        ...


class SumWindow:
    """Means over a window of the scalar tensors ``keys`` of each step's result, and ``samples_per_s``
    (``batch_size`` samples per step over the window's wall time)."""

    def __init__(self, keys: tuple[str, ...], batch_size: int) -> None:
        self.keys, self.batch_size = keys, batch_size
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = time.perf_counter()

    def add(self, result: dict[str, torch.Tensor]) -> None:
        for key in self.keys:
            self.sums[key] = self.sums[key] + result[key] if key in self.sums else result[key].detach().clone()
        self.count += 1

    def summary(self) -> dict[str, float]:
        values = {key: float(value) / self.count for key, value in self.sums.items()}
        values["samples_per_s"] = self.count * self.batch_size / max(time.perf_counter() - self.start, 1e-9)
        self._reset()
        return values


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Cadence of a run: ``steps`` in all; a metrics row every ``log_every``, a sample grid every
    ``sample_every``, a checkpoint every ``save_every`` steps (and all three at the last step), keeping the
    ``keep_checkpoints`` most recent; ``postfix`` names the metrics shown on the progress bar.  With
    ``time_limit`` (seconds) the run also ends at the first metrics row after that much wall time, which is
    then handled as the last step (metrics, grid, checkpoint)."""

    steps: int
    log_every: int
    save_every: int
    sample_every: int
    keep_checkpoints: int
    progress: bool = True
    desc: str = "train"
    postfix: tuple[str, ...] = ("loss",)
    time_limit: float | None = None


def checkpoint_to_resume(checkpoint_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    """The checkpoint a run continues from: None for a fresh run (``resume=False``, which refuses a folder that
    already holds checkpoints), the latest ``step_*.safetensors`` for ``resume=True``, or the given path."""
    if not resume:
        if find_latest_checkpoint(checkpoint_dir) is not None:
            raise ValueError(
                f"{checkpoint_dir} already holds checkpoints; resume the run (--resume) or choose another --out"
            )
        return None
    path = find_latest_checkpoint(checkpoint_dir) if resume is True else Path(resume)
    if path is None:
        raise FileNotFoundError(f"nothing to resume: no step_*.safetensors checkpoint in {checkpoint_dir}")
    return path


def run_loop(
    trainer: Trainer,
    batches: Iterable[Any],
    settings: LoopSettings,
    checkpoint_dir: Path,
    window: MetricWindow,
    *,
    log: Callable[[int, dict[str, float]], None],
    sample: Callable[[int], None] | None = None,
    after_save: Callable[[int], None] | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    agree: Callable[[bool], bool] = lambda flag: flag,
    clock: Callable[[], float] = time.monotonic,
) -> Path | None:
    """Train on ``batches`` (one per remaining step) until ``settings.steps``; returns the last checkpoint
    written by this call (None if none was).

    ``log(step, values)`` receives the window's means plus ``lr``; a non-finite loss raises
    FloatingPointError.  ``sample(step)`` draws a sample grid; ``after_save(step)`` runs after each
    checkpoint (e.g. an export).  Only the main process logs, samples and saves; every process calls
    ``barrier`` after a save.  ``agree(flag)`` returns the main process's ``flag`` on every process (the
    time-limit decision must be the same everywhere); ``clock`` measures the time limit.
    """
    bar = tqdm(
        total=settings.steps,
        initial=trainer.step,
        disable=not (settings.progress and is_main),
        desc=settings.desc,
        unit="step",
    )
    last_saved = None
    started = clock()
    try:
        for batch in batches:
            window.add(trainer.train_step(batch))
            step = trainer.step
            bar.update(1)
            final = step == settings.steps
            if settings.time_limit is not None and not final and step % settings.log_every == 0:
                final = agree(clock() - started >= settings.time_limit)
            if is_main and (step % settings.log_every == 0 or final):
                values = window.summary()
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"the loss became {values['loss']} by step {step}; lower the learning rate"
                    )
                values["lr"] = trainer.lr(step - 1)
                log(step, values)
                bar.set_postfix({key: f"{values[key]:.4g}" for key in settings.postfix if key in values})
            if is_main and sample is not None and (step % settings.sample_every == 0 or final):
                sample(step)
            if step % settings.save_every == 0 or final:
                if is_main:
                    last_saved = checkpoint_path(checkpoint_dir, step)
                    trainer.save(last_saved)
                    prune_checkpoints(checkpoint_dir, settings.keep_checkpoints)
                    if after_save is not None:
                        after_save(step)
                barrier()
            if final:
                break
    finally:
        bar.close()
    return last_saved
