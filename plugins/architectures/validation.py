"""Checks of architecture Configs (kept for code written against them).

The built-in architectures' Configs check their values with the shared attrs validators of
:mod:`core.validators`, so a bad value (``ch = 0``, an unsupported resolution) is refused when
the Config is made, and a recipe names the file and the key::

    zoo/x.toml: invalid value at architecture.ch: must be an integer >= 1, got 0

:class:`ArchitectureConfigError` is :class:`core.validators.ConfigValueError`; the ``check_*``
functions check an already-made Config the same way.
"""

from __future__ import annotations

from typing import Any, Iterable

from core.validators import ConfigValueError

__all__ = ["ArchitectureConfigError", "check_positive", "check_nonnegative", "check_choice"]

#: an architecture's Config holds a value the architecture cannot be built with.
ArchitectureConfigError = ConfigValueError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(arch: str, config: Any, fields: Iterable[str]) -> None:
    """Each of ``fields`` of ``config`` must be an integer >= 1."""
    problems = [f"{f} must be an integer >= 1, got {getattr(config, f)!r}"
                for f in fields if not (_is_int(getattr(config, f)) and getattr(config, f) >= 1)]
    if problems:
        raise ArchitectureConfigError("; ".join(problems), owner=arch)


def check_nonnegative(arch: str, config: Any, fields: Iterable[str]) -> None:
    """Each of ``fields`` of ``config`` must be an integer >= 0."""
    problems = [f"{f} must be an integer >= 0 (0 = unconditional), got {getattr(config, f)!r}"
                for f in fields if not (_is_int(getattr(config, f)) and getattr(config, f) >= 0)]
    if problems:
        raise ArchitectureConfigError("; ".join(problems), owner=arch)


def check_choice(arch: str, field: str, value: Any, choices: tuple) -> None:
    """``value`` of ``field`` must be one of ``choices``."""
    if value not in choices or isinstance(value, bool):
        valid = ", ".join(repr(c) for c in choices)
        raise ArchitectureConfigError(f"must be one of {valid}, got {value!r}", owner=arch,
                                      attribute=field)
