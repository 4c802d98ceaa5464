"""User-facing errors: the command line prints their message (one screen, no traceback), exit 2."""

from __future__ import annotations


class SpecregError(Exception):
    """An error caused by the user's input or environment, not a bug: exit status 2."""

    exit_code = 2


class DataMissingError(SpecregError):
    """A dataset's files are not where they must be (and cannot be downloaded)."""


class WeightsMissingError(SpecregError):
    """A network's weights file (e.g. Inception) is missing and cannot be downloaded."""


def print_error(exc: SpecregError, what: str = "recipe") -> None:
    """The command line's report of a user error on stderr: one line, or a count and one line
    per problem when the error lists several (``exc.problems``; ``what`` names their file)."""
    import sys

    problems = getattr(exc, "problems", None)
    if problems and len(problems) > 1:
        print(f"specreg: error: {len(problems)} problems in the {what}:", file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
    else:
        print(f"specreg: error: {exc}", file=sys.stderr)


#: exit status of a command whose reader closed its standard output (128 + SIGPIPE, as a shell
#: reports a tool that ``head`` stopped).
BROKEN_PIPE_EXIT = 141


def quiet_broken_pipe() -> int:
    """After :class:`BrokenPipeError` on standard output (``specreg study S.toml --plan | head``):
    point stdout at /dev/null so that the interpreter's final flush cannot raise again, and return
    :data:`BROKEN_PIPE_EXIT` (the Python documentation's recipe for SIGPIPE)."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return BROKEN_PIPE_EXIT
