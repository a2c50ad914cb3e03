"""The sampling strategies, one frozen dataclass each (docs/design.md §6.10), and the one registry that
maps their names to them.

A strategy owns its settings (dataclass fields declared with :func:`vqdiffusion.config.setting`), their
checks and its loop (:meth:`Sampler.run` over a :class:`Chain`).  Adding one means writing its class and
its tests and adding the class to :data:`SAMPLERS`; the CLI flags, the demo's controls,
``defaults.json`` and the pipeline's keywords follow from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .ancestral import Ancestral
from .base import Chain, LogProbFn, Sampler, check_setting
from .budget import MAX_PRIOR_WEIGHT, Budget, Purity, Uniform
from .confidence import MAX_CHOICE_TEMPERATURE, STEP_RULES, Confidence
from .first_hitting import FirstHitting
from .remdm import ReMDM

__all__ = [
    "MAX_CHOICE_TEMPERATURE",
    "MAX_PRIOR_WEIGHT",
    "SAMPLERS",
    "STEP_RULES",
    "Ancestral",
    "Budget",
    "Chain",
    "Confidence",
    "FirstHitting",
    "LogProbFn",
    "Purity",
    "ReMDM",
    "Sampler",
    "Uniform",
    "check_model_kind",
    "check_setting",
    "make_sampler",
    "sampler_settings",
]

# The registry: every strategy by its name, in the order the CLI and the demo offer them.
SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (Ancestral, Uniform, Purity, Confidence, ReMDM, FirstHitting)
}


def sampler_settings() -> dict[str, dataclasses.Field]:
    """Every strategy setting by name (a name shared by several strategies, such as ``tokens_per_call``, is
    one setting with one meaning)."""
    out: dict[str, dataclasses.Field] = {}
    for cls in SAMPLERS.values():
        for field in cls.settings():
            out.setdefault(field.name, field)
    return out


def owners(setting_name: str) -> list[str]:
    """The names of the strategies that have the setting."""
    return [name for name, cls in SAMPLERS.items() if setting_name in cls.setting_names()]


def make_sampler(sampler: str | Sampler, base: Sampler | None = None, **values: Any) -> Sampler:
    """A strategy from a name (or a strategy) and flat settings, the way ``pipe(..., sampler="purity",
    prior_weight=1.0)``, the CLI flags and ``defaults.json`` spell it.

    ``values`` left at None are not given.  A setting the chosen strategy lacks must be given at its
    default (ValueError ``"<name> must be <default> unless sampler is one of [...]"`` otherwise).  The
    strategy's other settings come from ``base`` where it has them (the model's defaults: switching from
    ``purity`` to ``uniform`` keeps ``tokens_per_call``), else from their defaults.
    """
    known = sampler_settings()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown sampler setting(s) {unknown}; the sampler settings are {sorted(known)}")
    given = {k: v for k, v in values.items() if v is not None}
    if isinstance(sampler, Sampler):
        cls, start = type(sampler), {f.name: getattr(sampler, f.name) for f in sampler.settings()}
    else:
        cls = SAMPLERS.get(sampler) if isinstance(sampler, str) else None
        if cls is None:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        start = {}
        if base is not None:
            start = {f.name: getattr(base, f.name) for f in base.settings() if f.name in cls.setting_names()}
    own = cls.setting_names()
    for name, value in given.items():
        if name in own:
            continue
        check_setting(known[name], value)  # a bad value is named as such first
        default = known[name].default
        if value != default:
            raise ValueError(
                f"{name} must be {default!r} unless sampler is one of {owners(name)}; "
                f"got {name}={value!r} with sampler={cls.name!r}"
            )
    return cls(**{**start, **{k: v for k, v in given.items() if k in own}})


def check_model_kind(sampler: Sampler, time_agnostic: bool) -> None:
    """ValueError when ``sampler`` cannot run on the model kind: a strategy that ``needs_timestep`` (the
    trained chain's exact posterior) on a time-agnostic masked model, which has no step input."""
    if time_agnostic and sampler.needs_timestep:
        usable = [name for name, cls in SAMPLERS.items() if not cls.needs_timestep]
        raise ValueError(
            f"sampler={sampler.name!r} needs a model trained on a timestep chain, but this model is time-agnostic "
            f"(it predicts x0 from x_t without t); use one of {usable}"
        )
