"""The sampling flags shared by ``generate``, ``edit``, ``eval``, ``sample-set`` and ``export``, built from the
fields of :class:`vqdiffusion.sampling.SamplingOptions` and of the strategies
(:data:`vqdiffusion.samplers.SAMPLERS`) and their metadata (help, choices), checked by their own
validation; and the micro-condition flags of ``generate``, ``edit`` and ``sample-set``, built from the fields of
:class:`vqdiffusion.models.uvit_config.MicroConditions` (aMUSEd models only)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from ..config import renamed
from .arg_types import number_pair
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


def condition_flags() -> dict[str, tuple[str, Callable[[str], Any], str]]:
    """flag -> (call keyword, argparse type, help): aMUSEd's micro-conditions (``--aesthetic-score``,
    ``--crop-coords``, ``--orig-size``), one per field of :class:`MicroConditions`."""
    from ..models.uvit_config import MicroConditions

    out: dict[str, tuple[str, Callable[[str], Any], str]] = {}
    for field in dataclasses.fields(MicroConditions):
        kind: Callable[[str], Any] = float if str(field.type) == "float" else number_pair
        default = field.default if field.default is not None else "the generated size"
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default)
        text = f"aMUSEd models: {field.metadata['help'].replace(' (default: the generated size)', '')}"
        out[flag_of(field.name)] = (field.name, kind, f"{text} (default {default})")
    return out


def add_sampling_arguments(
    parser: argparse.ArgumentParser, default_text: str = "the model's", conditions: bool = False
) -> None:
    """Add the sampling flags (all default to None: ``default_text``) and, with ``conditions``, the
    micro-condition flags (default None: aMUSEd's defaults)."""
    for flag, (dest, kind, text, choices) in sampling_flags().items():
        text = f"{text} (default: {default_text})"
        parser.add_argument(flag, dest=dest, type=kind, default=None, choices=choices, help=text)
    if conditions:
        for flag, (dest, kind, text) in condition_flags().items():
            parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def check_condition_flags(pipe: Any, args: argparse.Namespace) -> None:
    """CLIError when a micro-condition flag was given for a model that has no micro-conditions."""
    extra = [
        flag
        for flag, (dest, _, _) in condition_flags().items()
        if getattr(args, dest, None) is not None and dest not in pipe.condition_keywords
    ]
    if extra:
        raise CLIError(
            f"{', '.join(extra)}: this model has no micro-conditions (aMUSEd models have them); drop the flag"
        )


def sampling_arguments(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags that were given, as :class:`SamplingOptions` keywords, validated before any model is
    loaded (the checks that need the model, such as ``--steps`` against T, come with it).

    Without ``--sampler`` the model's default sampler decides later whether a strategy's flags apply; here
    each value is checked, and the strategy flags given must belong to one sampler together."""
    from ..samplers import SAMPLERS, check_setting, owners, sampler_settings
    from ..sampling import SamplingOptions

    fields = [dest for dest, _, _, _ in sampling_flags().values()]
    given = {dest: getattr(args, dest) for dest in fields if getattr(args, dest, None) is not None}
    given.update(_condition_arguments(args))
    settings = sampler_settings()
    own = {name: value for name, value in given.items() if name in settings}
    micro = {name for name, _, _ in condition_flags().values()}
    given_options = {name: value for name, value in given.items() if name not in micro}
    try:
        if "sampler" in given:
            SamplingOptions(**given_options)
        else:
            SamplingOptions(**{k: v for k, v in given_options.items() if k not in own})
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


def _condition_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The micro-condition flags that were given, as call keywords, checked (:class:`MicroConditions`)."""
    from ..models.uvit_config import MicroConditions

    dests = [dest for dest, _, _ in condition_flags().values()]
    given = {dest: getattr(args, dest) for dest in dests if getattr(args, dest, None) is not None}
    try:
        MicroConditions(**given)
    except ValueError as err:
        names = {dest: flag for flag, (dest, _, _) in condition_flags().items()}
        raise CLIError(renamed(str(err), names)) from None
    return given


def flag_message(message: str) -> str:
    """A settings message (it starts with the setting's name) with the setting named by its flag."""
    return renamed(message, {dest: flag for flag, (dest, _, _, _) in sampling_flags().items()})
