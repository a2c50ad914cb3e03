"""The sampling flags shared by ``generate``, ``eval`` and ``export``: one flag per field of
:class:`vqdiffusion.sampling.SamplingOptions`, checked by the options' own validation."""

from __future__ import annotations

import argparse

from .errors import CLIError

# flag -> (SamplingOptions field, type, help)
SAMPLING_FLAGS: dict[str, tuple[str, type, str]] = {
    "--steps": ("num_inference_steps", int, "sampling steps, 1..T"),
    "--guidance": ("guidance_scale", float, "classifier-free guidance scale (1 = off, one pass per step)"),
    "--truncation": ("truncation_rate", float, "truncation rate in (0, 1] (1 = off)"),
    "--sampler": (
        "sampler",
        str,
        "ancestral; uniform or purity (high-quality inference, Improved VQ-Diffusion); confidence (MaskGIT-style, "
        "not the trained chain); remdm (remasking) or first_hitting (exact, fewer model calls): mask-only schedules",
    ),
    "--prior-weight": ("prior_weight", float, "r of the purity sampler, >= 0"),
    "--spacing": ("spacing", str, "step indices: uniform or quadratic"),
    "--temperature": ("temperature", float, "temperature of p(x0 | x_t), > 0"),
    "--tokens-per-call": ("tokens_per_call", int, "budget samplers: positions filled per model call"),
    "--order": ("order", str, "uniform sampler: random or halton order of the positions filled"),
    "--masking-schedule": ("masking_schedule", str, "confidence sampler: cosine or linear masked fraction"),
    "--choice-temperature": ("choice_temperature", float, "confidence sampler: Gumbel scale, annealed to 0"),
    "--remask-schedule": ("remask_schedule", str, "remdm sampler: cap or rescale remasking probability"),
    "--remask-eta": ("remask_eta", float, "remdm sampler: eta in [0, 1]"),
}
CHOICES = {
    "--sampler": ["ancestral", "uniform", "purity", "confidence", "remdm", "first_hitting"],
    "--spacing": ["uniform", "quadratic"],
    "--order": ["random", "halton"],
    "--masking-schedule": ["cosine", "linear"],
    "--remask-schedule": ["cap", "rescale"],
}
FLAG_OF_FIELD = {field: flag for flag, (field, _, _) in SAMPLING_FLAGS.items()}


def add_sampling_arguments(parser: argparse.ArgumentParser, default_text: str = "the model's") -> None:
    """Add the sampling flags (all default to None: ``default_text``)."""
    for flag, (dest, kind, text) in SAMPLING_FLAGS.items():
        text = f"{text} (default: {default_text})"
        parser.add_argument(flag, dest=dest, type=kind, default=None, choices=CHOICES.get(flag), help=text)


def sampling_arguments(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags that were given, as :class:`SamplingOptions` fields, validated before any model is
    loaded (the checks that need the model, such as ``--steps`` against T, come with it)."""
    given = {dest: getattr(args, dest) for dest, _, _ in SAMPLING_FLAGS.values() if getattr(args, dest) is not None}
    from ..sampling import SAMPLER_FIELDS, SAMPLERS, SamplingOptions

    # Field checks only: without --sampler the model's default sampler decides later whether sampler-only
    # settings (--prior-weight, --order, ...) apply, so they are checked here against a sampler that uses
    # them all (purity when there is one; none when they belong to different samplers: then the error says so).
    usable = [s for s in SAMPLERS if all(s in SAMPLER_FIELDS[f] for f in given if f in SAMPLER_FIELDS)]
    check_with = "purity" if "purity" in usable or not usable else usable[0]
    try:
        SamplingOptions(**{"sampler": check_with, **given})
    except ValueError as err:
        raise CLIError(flag_message(str(err))) from None
    return given


def flag_message(message: str) -> str:
    """A SamplingOptions message (it starts with the field name) with the field named by its flag."""
    first = message.split(" ", 1)[0].rstrip(":")
    flag = FLAG_OF_FIELD.get(first)
    return message if flag is None else flag + message[len(first) :]
