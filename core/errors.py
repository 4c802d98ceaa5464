"""User-facing errors: the command line prints their message (one screen, no traceback), exit 2."""

from __future__ import annotations


class SpecregError(Exception):
    """An error caused by the user's input or environment, not a bug: exit status 2."""

    exit_code = 2


class DataMissingError(SpecregError):
    """A dataset's files are not where they must be (and cannot be downloaded)."""


class WeightsMissingError(SpecregError):
    """A network's weights file (e.g. Inception) is missing and cannot be downloaded."""
