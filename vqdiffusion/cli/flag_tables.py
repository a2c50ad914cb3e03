"""Flag tables of the training commands: each flag fills one field of a training config, defaults to None
("not given") so that a resumed run keeps the checkpoint's value unless the flag is given."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

# flag -> (config field, argparse type, help)
FlagTable = dict[str, tuple[str, Callable[[str], Any], str]]


def add_flag_table(parser: argparse.ArgumentParser, table: FlagTable) -> None:
    """One option per row of ``table``, all defaulting to None."""
    for flag, (field, kind, text) in table.items():
        parser.add_argument(flag, dest=field, type=kind, default=None, help=text)


def given_fields(args: argparse.Namespace, fields: list[str]) -> dict[str, Any]:
    """The config fields whose flags were given."""
    return {field: getattr(args, field) for field in fields if getattr(args, field, None) is not None}


def checkpoint_to_continue(out: str | Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """``--resume``: the latest checkpoint in ``out/checkpoints`` and its meta, checked to be a ``kind``
    training checkpoint (FileNotFoundError if none)."""
    from ..training.checkpoint import find_latest_checkpoint, read_checkpoint_meta

    folder = Path(out) / "checkpoints"
    path = find_latest_checkpoint(folder)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {folder}")
    return path, read_checkpoint_meta(path, kind)
