"""What every sampling strategy shares: the :class:`Sampler` base (a frozen dataclass of the strategy's own
settings, checked from their field metadata) and the :class:`Chain` it runs on (docs/design.md §6).

A strategy owns its settings, their checks and its loop; the callers read only its properties
(:attr:`Sampler.fills_fixed_count`, :attr:`Sampler.needs_mask_only_schedule`,
:attr:`Sampler.needs_timestep`, :attr:`Sampler.reads_logits`) and never its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeVar

import torch
from tqdm.auto import tqdm

from ..config import is_int, is_number
from ..diffusion import Generator, MaskReplaceSchedule
from ..unmasking import require_mask_only

T = TypeVar("T")

# (x_t [B, N] long, t int) -> log p(x0 | x_t) [B, K, N], guided, tempered and truncated, known tokens seen
LogProbFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Chain:
    """One reverse-chain run as a strategy sees it.

    log_p_x0_at: x_t, t -> log p(x0 | x_t) after guidance, temperature and truncation (the model's input
        at known positions already prepared); up to a per-position constant for a strategy that
        :attr:`Sampler.reads_logits`.
    steps: the strictly decreasing step indices of the run (checked).
    x_t: [B, N] long start state, known tokens in place; for a strategy that fills a fixed count every row
        holds the same number (> 0) of [MASK].
    keep: x -> x with the known tokens put back (identity without known tokens).
    free: positions per row that are not known.
    token_shape: (h, w) of the token grid, or None (square).
    """

    log_p_x0_at: LogProbFn
    schedule: MaskReplaceSchedule
    steps: list[int]
    x_t: torch.Tensor
    generator: Generator
    keep: Callable[[torch.Tensor], torch.Tensor]
    free: int
    token_shape: tuple[int, int] | None = None
    progress: bool = True
    callback: Callable[[int, int], None] | None = None

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """``items`` with the terminal progress bar (when ``progress``)."""
        return iter(tqdm(items, desc="sampling", disable=not self.progress, leave=False))

    def report(self, done: int, total: int) -> None:
        """Tell the caller's ``callback`` that ``done`` of ``total`` iterations are finished."""
        if self.callback is not None:
            self.callback(done, total)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base of the sampling strategies: a frozen dataclass whose fields are the strategy's own settings,
    each declared with :func:`vqdiffusion.config.setting` (help, choices, bounds), checked on construction.

    Subclasses set ``name`` (the registry's key, :data:`vqdiffusion.samplers.SAMPLERS`), ``summary`` (one
    line for help texts), the two properties below when they hold, and implement :meth:`run`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # It fills a fixed number of [MASK] positions per step: every row must start with the same number of
    # them, and a variation's start masks an exact count.
    fills_fixed_count: ClassVar[bool] = False
    # Only exact for a schedule that never replaces tokens (replace mass <= 1e-5): refused otherwise.
    needs_mask_only_schedule: ClassVar[bool] = False
    # It runs the chain of a model trained on the timestep (the exact posterior of its schedule): refused for
    # a time-agnostic masked model (aMUSEd, MaskGIT), which predicts x0 from x_t without t.
    needs_timestep: ClassVar[bool] = False

    @property
    def reads_logits(self) -> bool:
        """True when the strategy uses ``log_p_x0_at`` only through softmax over the classes, so the chain may
        hand it unnormalised logits (log p up to a per-position constant) and skip a log_softmax per step."""
        return False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_setting(field, getattr(self, field.name))

    @classmethod
    def settings(cls) -> tuple[dataclasses.Field, ...]:
        """The strategy's own settings (its dataclass fields)."""
        return dataclasses.fields(cls)

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """``{"sampler": name, setting: value, ...}``: the flat form of ``defaults.json`` and the CLI."""
        return {"sampler": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def check_schedule(self, schedule: MaskReplaceSchedule) -> None:
        """Raise a ValueError when the strategy cannot run on ``schedule``."""
        if self.needs_mask_only_schedule:
            require_mask_only(schedule, self.name)

    def run(self, chain: Chain) -> torch.Tensor:
        """Run the reverse chain from ``chain.x_t`` to x0: [B, N] long tokens in [0, K)."""
        raise NotImplementedError


def check_setting(field: dataclasses.Field, value: Any) -> None:
    """ValueError ``"<name> must ..."`` when ``value`` breaks the field's metadata: ``choices``, or a number
    (an integer when the default is one or None) within ``low`` / ``high``; None is allowed when it is the
    default."""
    meta, name = field.metadata, field.name
    if value is None and field.default is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        return
    low, high = meta.get("low"), meta.get("high")
    if field.default is None or is_int(field.default):
        if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            none = " or None" if field.default is None else ""
            kind = "a positive integer" if low == 1 and high is None else f"an integer in [{low}, {high}]"
            raise ValueError(f"{name} must be {kind}{none}, got {value!r}")
        return
    if not is_number(value) or not (low is None or value >= low) or not (high is None or value <= high):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
