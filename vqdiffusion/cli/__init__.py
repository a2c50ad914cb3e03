"""The command line, ``vqdiffusion COMMAND ...`` (also ``python -m vqdiffusion.cli``, e.g. under ``torchrun``).

Each command lives in its own module with its parser (``add_*_parser``) and its run function; this module
builds the parser and maps every error to one ``error: ...`` line and exit code 2 (:mod:`.errors`).
Heavy imports (torch, the models) happen inside the run functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from .convert import add_convert_parser
from .demo import add_demo_parser
from .edit import add_edit_parsers
from .errors import CLIError, OneLineParser, is_user_error, report
from .eval_tokenizer import add_eval_tokenizer_parser, run_eval_tokenizer
from .evaluate import add_eval_parser, add_make_shapes_parser
from .export import add_export_parser, run_export
from .generate import add_generate_parser, add_info_parser
from .sample_set import add_sample_set_parser
from .sampling_flags import add_sampling_arguments, sampling_arguments
from .sheet import add_sheet_parser
from .tokenize import add_tokenize_parser, run_tokenize
from .train import add_train_parser, run_train
from .train_vqvae import add_train_vqvae_parser, run_train_vqvae

__all__ = ["TORCHRUN_COMMANDS", "CLIError", "add_sampling_arguments", "build_parser", "main", "sampling_arguments"]

# The commands meant to run under ``torchrun ... -m vqdiffusion.cli COMMAND``.  torchrun's own parser sees their
# flags too and stops at an abbreviation of one of its options (``--num`` for ``--numa-binding``), so none of
# their flags may be a prefix of a torchrun option (tests/test_torchrun_flags.py checks torchrun's list).
TORCHRUN_COMMANDS = ("train", "train-vqvae", "sample-set")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vqdiffusion", description="VQ-Diffusion text-to-image synthesis")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_edit_parsers(sub)
    add_info_parser(sub)
    add_make_shapes_parser(sub)
    add_convert_parser(sub)
    add_eval_parser(sub)
    add_sample_set_parser(sub)
    add_sheet_parser(sub)
    add_demo_parser(sub)
    for add, run in (
        (add_train_vqvae_parser, run_train_vqvae),
        (add_tokenize_parser, run_tokenize),
        (add_train_parser, run_train),
        (add_export_parser, run_export),
        (add_eval_tokenizer_parser, run_eval_tokenizer),
    ):
        add(sub).set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except BaseException as err:
        if not is_user_error(err):
            raise
        return report(err)
