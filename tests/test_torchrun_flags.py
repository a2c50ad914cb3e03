"""Every flag of the commands meant for ``torchrun ... -m vqdiffusion.cli COMMAND`` survives torchrun's parser.

torchrun's argparse parser classifies every word of its command line, the script's arguments included, and
stops at an abbreviation of its own options that is ambiguous (``--num`` could be ``--numa-binding`` or
``--numa_binding``).  The rule checked: no flag of those commands is a prefix of a torchrun option (only the
help flags, which both parsers share and torchrun passes on, are equal to one).
"""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest
from torch.distributed.run import get_args_parser

from vqdiffusion.cli import TORCHRUN_COMMANDS, build_parser

SHARED_HELP = {"-h", "--help"}


def torchrun_options() -> list[str]:
    return sorted(s for action in get_args_parser()._actions for s in action.option_strings)


def command_flags(command: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(s for action in sub.choices[command]._actions for s in action.option_strings)


def clashes(flag: str, options: list[str]) -> list[str]:
    """The torchrun options that ``flag`` abbreviates (or equals)."""
    return [option for option in options if option.startswith(flag)]


def survives_torchrun(command: str, flag: str) -> bool:
    """Whether torchrun's own parser hands ``COMMAND FLAG 1`` to the module unchanged."""
    argv = ["--nproc-per-node", "2", "-m", "vqdiffusion.cli", command, flag, "1"]
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args = get_args_parser().parse_args(argv)
        except SystemExit:
            return False
    return args.training_script == "vqdiffusion.cli" and args.training_script_args == [command, flag, "1"]


def test_the_check_catches_the_flag_that_broke_sample_set() -> None:
    options = torchrun_options()
    assert "--numa-binding" in options and "--nproc-per-node" in options  # torchrun's list is read
    assert clashes("--num", options) and not survives_torchrun("sample-set", "--num")
    assert clashes("--n", options) and not survives_torchrun("train", "--n")
    assert not clashes("--num-images", options) and survives_torchrun("sample-set", "--num-images")


@pytest.mark.parametrize("command", TORCHRUN_COMMANDS)
def test_no_flag_of_a_torchrun_command_abbreviates_a_torchrun_option(command: str) -> None:
    options = torchrun_options()
    flags = command_flags(command)
    assert len(flags) > 5
    bad = {flag: clashes(flag, options) for flag in flags if flag not in SHARED_HELP and clashes(flag, options)}
    assert bad == {}
    assert [flag for flag in flags if not survives_torchrun(command, flag)] == []


def test_the_old_num_spelling_still_works_without_torchrun() -> None:
    args = build_parser().parse_args(["sample-set", "--out", "x", "--num", "8"])
    assert args.num == 8
    assert build_parser().parse_args(["sample-set", "--out", "x", "--num-images", "3"]).num == 3
