"""How the command line reports errors: one ``error: ...`` line on stderr and exit code 2, never a traceback.

:func:`report` is the one place that maps exceptions to that line; every command raises ordinary
exceptions (:class:`CLIError` for problems only the command line can name, such as a flag combination).
"""

from __future__ import annotations

import sys

USAGE_ERROR = 2
INTERRUPTED = 130


class CLIError(Exception):
    """A user error reported as one line with exit code 2."""


# Exceptions that mean "bad input": their message is what the user reads.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    ValueError,  # ConfigError is a ValueError
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FloatingPointError,
)


def report(err: BaseException) -> int:
    """Print ``err`` as one ``error:`` line and return the exit code."""
    if isinstance(err, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR
