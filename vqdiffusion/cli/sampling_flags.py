"""The sampling flags shared by ``generate``, ``edit``, ``eval``, ``sample-set`` and ``export``, built from the
fields of :class:`vqdiffusion.sampling.SamplingOptions` and of the strategies
(:data:`vqdiffusion.samplers.SAMPLERS`) and their metadata (help, choices), checked by their own
validation."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..config import renamed
from .errors import CLIError

# The shared settings whose flags predate the generated names (every other flag is --<field-name>).
SHORT_FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "truncation_rate": "--truncation"}


def flag_of(field: str) -> str:
    """The flag of a setting: ``--steps`` ... or ``--<field-name>`` with dashes."""
    return SHORT_FLAGS.get(field, "--" + field.replace("_", "-"))


def sampling_flags() -> dict[str, tuple[str, type, str, list[Any] | None]]:
    """flag -> (setting, argparse type, help, choices): the shared settings, then every strategy's own."""
    from ..samplers import SAMPLERS, owners, sampler_settings
    from ..sampling import SamplingOptions

    out: dict[str, tuple[str, type, str, list[Any] | None]] = {}
    for field in dataclasses.fields(SamplingOptions):
        text = field.metadata["help"]
        if field.name == "sampler":
            text = "; ".join(f"{cls.name}: {cls.summary}" for cls in SAMPLERS.values())
        out[flag_of(field.name)] = (field.name, _kind(field), text, _choices(field))
    for field in sampler_settings().values():
        text = f"{' and '.join(owners(field.name))} sampler: {field.metadata['help']}"
        out[flag_of(field.name)] = (field.name, _kind(field), text, _choices(field))
    return out


def _kind(field: dataclasses.Field) -> type:
    if field.metadata.get("choices") is not None:
        return str
    annotation = str(field.type)
    return int if annotation.startswith("int") else float if annotation.startswith("float") else str


def _choices(field: dataclasses.Field) -> list[Any] | None:
    choices = field.metadata.get("choices")
    return None if choices is None else list(choices)


def add_sampling_arguments(parser: argparse.ArgumentParser, default_text: str = "the model's") -> None:
    """Add the sampling flags (all default to None: ``default_text``)."""
    for flag, (dest, kind, text, choices) in sampling_flags().items():
        text = f"{text} (default: {default_text})"
        parser.add_argument(flag, dest=dest, type=kind, default=None, choices=choices, help=text)


def sampling_arguments(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags that were given, as :class:`SamplingOptions` keywords, validated before any model is
    loaded (the checks that need the model, such as ``--steps`` against T, come with it).

    Without ``--sampler`` the model's default sampler decides later whether a strategy's flags apply; here
    each value is checked, and the strategy flags given must belong to one sampler together."""
    from ..samplers import SAMPLERS, check_setting, owners, sampler_settings
    from ..sampling import SamplingOptions

    fields = [dest for dest, _, _, _ in sampling_flags().values()]
    given = {dest: getattr(args, dest) for dest in fields if getattr(args, dest, None) is not None}
    settings = sampler_settings()
    own = {name: value for name, value in given.items() if name in settings}
    try:
        if "sampler" in given:
            SamplingOptions(**given)
        else:
            SamplingOptions(**{k: v for k, v in given.items() if k not in own})
            for name, value in own.items():
                check_setting(settings[name], value)
            if own and not any(set(own) <= set(cls.setting_names()) for cls in SAMPLERS.values()):
                used = ", ".join(f"{flag_of(name)} ({' or '.join(owners(name))})" for name in own)
                raise CLIError(f"{used} belong to different samplers; give the settings of one --sampler")
    except CLIError:
        raise
    except ValueError as err:
        raise CLIError(flag_message(str(err))) from None
    return given


def flag_message(message: str) -> str:
    """A settings message (it starts with the setting's name) with the setting named by its flag."""
    return renamed(message, {dest: flag for flag, (dest, _, _, _) in sampling_flags().items()})
