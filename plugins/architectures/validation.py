"""Checks of architecture Configs, run when an architecture plugin is constructed.

A bad value (e.g. ``ch = 0`` or an unsupported resolution in a recipe) raises
:class:`ArchitectureConfigError`, a :class:`core.errors.SpecregError` the command line prints
as a one-screen message::

    check_positive("resnet32", config, ("ch", "g_ch", "z_dim"))
    check_choice("cnn", "resolution", config.resolution, (32, 48, 64))
"""

from __future__ import annotations

from typing import Any, Iterable

from core.errors import SpecregError

__all__ = ["ArchitectureConfigError", "check_positive", "check_nonnegative", "check_choice"]


class ArchitectureConfigError(SpecregError):
    """An architecture's Config holds a value the architecture cannot be built with."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(arch: str, config: Any, fields: Iterable[str]) -> None:
    """Each of ``fields`` of ``config`` must be an integer >= 1."""
    problems = [f"architecture '{arch}': {f} must be a positive integer, got {getattr(config, f)!r}"
                for f in fields if not (_is_int(getattr(config, f)) and getattr(config, f) >= 1)]
    if problems:
        raise ArchitectureConfigError("\n".join(problems))


def check_nonnegative(arch: str, config: Any, fields: Iterable[str]) -> None:
    """Each of ``fields`` of ``config`` must be an integer >= 0."""
    problems = [f"architecture '{arch}': {f} must be an integer >= 0 (0 = unconditional), "
                f"got {getattr(config, f)!r}"
                for f in fields if not (_is_int(getattr(config, f)) and getattr(config, f) >= 0)]
    if problems:
        raise ArchitectureConfigError("\n".join(problems))


def check_choice(arch: str, field: str, value: Any, choices: tuple) -> None:
    """``value`` of ``field`` must be one of ``choices``."""
    if value not in choices or isinstance(value, bool):
        valid = ", ".join(repr(c) for c in choices)
        raise ArchitectureConfigError(
            f"architecture '{arch}': {field} = {value!r} is not supported; valid values: {valid}")
