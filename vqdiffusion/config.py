"""Typed, frozen configuration dataclasses saved as JSON beside safetensors weights."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration is malformed or does not match the weights it describes."""


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (NaN and infinities included)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def number_pair(text: str) -> tuple[float, float]:
    """Two numbers written ``"a,b"`` (spaces allowed; integers stay integers), e.g. a crop or a size; ValueError
    naming the text otherwise."""
    parts = [part.strip() for part in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return tuple(int(part) if part.lstrip("+-").isdigit() else float(part) for part in parts)  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"expected two numbers a,b (e.g. 0,0), got {text!r}") from None


def renamed(message: str, names: Mapping[str, str]) -> str:
    """A message that starts with a setting's name (``"<name> must ..."``, as every settings check writes it)
    with that name replaced by its spelling in ``names`` (a CLI flag, a form label); unchanged otherwise."""
    first = message.split(" ", 1)[0].rstrip(":")
    return names[first] + message[len(first) :] if first in names else message


def setting(
    default: Any,
    help: str,
    *,
    label: str | None = None,
    choices: Collection[Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    step: float | None = None,
    ui_high: float | None = None,
) -> Any:
    """A dataclass field that carries what a user interface needs to offer it: ``help`` (one line), the
    ``label`` of a form control (default: the field name in words), ``choices`` of a text setting, and the
    ``low`` / ``high`` bounds and ``step`` of a number (``ui_high``: the top of a slider when ``high`` is far
    above the useful range).  The CLI flags and the demo's controls are built from
    this metadata (:mod:`vqdiffusion.cli.sampling_flags`, :mod:`vqdiffusion.demo`), so a setting is written
    once, where its dataclass declares it."""
    metadata = {"help": help, "label": label, "choices": choices, "low": low, "high": high, "step": step}
    metadata["ui_high"] = ui_high
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base for frozen configs: JSON round trip with strict key checking.

    Subclasses validate their values in ``__post_init__`` and raise :class:`ConfigError`.
    """

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(names)}")
        kwargs = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as err:  # missing required fields
            raise ConfigError(f"{cls.__name__}: {err}") from None

    def save_json(self, path: str | os.PathLike) -> None:
        from .io import atomic_write_text  # io imports torch; `import vqdiffusion.config` (the CLI start) does not

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls: type[C], path: str | os.PathLike) -> C:
        return cls.from_dict(read_json_object(Path(path)))


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON file holding an object; FileNotFoundError / ConfigError name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        data = parse_json(path.read_text(), str(path))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def parse_json(text: str, source: str) -> Any:
    """``json.loads(text)``; ConfigError naming ``source`` for invalid JSON, and for JSON nested too deeply to
    parse (a RecursionError in the standard library), which no config of ours needs."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON ({err})") from None
    except RecursionError:
        raise ConfigError(f"{source}: the JSON is nested too deeply to read; it is not a vqdiffusion file") from None


#: The largest size (a width, a count of layers, tokens or classes) a config may give: no model this library
#: builds comes near it, and a tensor dimension beyond it overflows torch's 32-bit kernels.
MAX_CONFIG_SIZE = 2**31 - 1
#: The largest normalisation eps a config may give (1e-5 and 1e-6 are standard; a large eps flattens every
#: normalised activation, so the model's output no longer depends on its input).
MAX_NORM_EPS = 0.1


def shown(value: Any) -> str:
    """``value`` for a message: an integer too long to print is given by its number of digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"a {len(str(abs(value)))}-digit integer"
    return repr(value)


def check_size_limit(owner: str, **values: int | float) -> None:
    """Raise ConfigError naming the first size above :data:`MAX_CONFIG_SIZE`."""
    for name, value in values.items():
        if value > MAX_CONFIG_SIZE:
            raise ConfigError(
                f"{owner}: {name}={shown(value)} is above the limit {MAX_CONFIG_SIZE}, which no model comes near; "
                "give a smaller value (or re-export a damaged model)"
            )


def check_norm_eps(owner: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is a finite number in (0, :data:`MAX_NORM_EPS`]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}: norm_eps must be a number, got {shown(value)}")
    if not 0 < value <= MAX_NORM_EPS:
        raise ConfigError(f"{owner}: norm_eps must be in (0, {MAX_NORM_EPS}] (1e-5 is standard), got {shown(value)}")


def check_positive(owner: str, **values: int | float) -> None:
    """Raise ConfigError naming the first value that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}: {name} must be > 0, got {value}")


def check_integers(
    owner: str,
    *,
    positive: Mapping[str, Any] | None = None,
    nonneg: Mapping[str, Any] | None = None,
    optional_positive: Mapping[str, Any] | None = None,
    optional: Mapping[str, Any] | None = None,
) -> None:
    """Raise ConfigError naming the first integer field that is wrong, checked in this order: every value is an
    integer (a bool is not one; None is allowed only in ``optional_positive`` and ``optional``), then each of
    ``positive`` is > 0, each given value of ``optional_positive`` is > 0, and each of ``nonneg`` is >= 0
    (``optional``: None or any integer, e.g. a token id)."""
    positive, nonneg = positive or {}, nonneg or {}
    optional_positive, optional = optional_positive or {}, optional or {}
    for key, value in {**positive, **nonneg}.items():
        if not is_int(value):
            raise ConfigError(f"{owner}: {key} must be an integer, got {value!r}")
    for key, value in {**optional_positive, **optional}.items():
        if value is not None and not is_int(value):
            raise ConfigError(f"{owner}: {key} must be an integer, got {value!r}")
    check_positive(owner, **positive, **{key: value for key, value in optional_positive.items() if value is not None})
    for key, value in nonneg.items():
        if not value >= 0:
            raise ConfigError(f"{owner}: {key} must be a number >= 0, got {value!r}")


def check_positive_integers(owner: str, **values: Any) -> None:
    """Raise ConfigError naming the first value that is not an integer >= 1 (a bool is not one)."""
    for name, value in values.items():
        if not is_int(value) or value < 1:
            raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")


def check_choices(owner: str, config: Any, choices: dict[str, tuple[Any, ...]]) -> None:
    """Raise ConfigError naming the first field of ``config`` whose value is not among its allowed values."""
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise ConfigError(f"{owner}: {field} must be one of {list(allowed)}, got {getattr(config, field)!r}")


def check_paths(owner: str, config: Any, *fields: str) -> None:
    """Raise ConfigError naming the first of ``fields`` that is not a non-empty path string."""
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{owner}: {field} must be a non-empty path string, got {value!r}")
