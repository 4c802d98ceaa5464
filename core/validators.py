"""Shared attrs validators for recipe sections and plugin Configs: one style for every check.

Each validator is an ordinary attrs validator (``validator(instance, attribute, value)``); the
parametrized ones are made by a factory. A plugin author uses them the way the built-ins do::

    import attrs
    from core.validators import number_in, one_of, positive_int, positive_number

    @attrs.define
    class Config:
        strength: float = attrs.field(default=1e-4, validator=positive_number)
        every: int = attrs.field(default=1, validator=positive_int)
        beta: float = attrs.field(default=0.5, validator=number_in(0, 1, high_open=True))
        mode: str = attrs.field(default="a", validator=one_of(("a", "b")))

A failing validator raises :class:`ConfigValueError`, a :class:`core.errors.SpecregError` (exit
status 2, no traceback) and a ``ValueError``. Built in Python, a Config says
``ssn: scale must be a finite number > 0, got nan``; loaded from a recipe, every validator of
every table runs before anything else does and each failure is one line naming the file the key
came from and the key (:mod:`core.recipe`)::

    zoo/x.toml: invalid value at train.lr_d: must be a finite number > 0, got nan

A check that relates several fields is a validator on the last of them (attrs runs validators
after every field is set, so it may read the others); :func:`fail` raises the error with the
keys it involves (``related``), which the recipe loader names with their files.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Iterable, Sequence

import attrs

from core.errors import SpecregError

__all__ = ["ConfigValueError", "Validator", "fail", "positive_int", "nonnegative_int",
           "int_at_least", "int_in",
           "positive_number", "nonnegative_number", "finite_number", "number_in", "fraction",
           "one_of", "each", "non_empty", "satisfies", "file_name", "owner_of"]

#: ``validator(instance, attribute, value) -> None``, raising :class:`ConfigValueError`.
Validator = Callable[[Any, "attrs.Attribute", Any], None]


class ConfigValueError(SpecregError, ValueError):
    """A Config value a validator refused.

    ``reason`` reads after the key (``"must be an integer >= 1, got 0"``); ``subpath`` continues
    the key below the field (an element's index, ``("1",)`` for ``betas[1]``); ``related`` are
    other keys of the same Config the problem involves, relative to it (``(("batch_size",),)``).
    ``attribute`` is the field whose validator raised (set by :func:`fail`).
    """

    def __init__(self, reason: str, *, attribute: str = "", owner: str = "",
                 subpath: Sequence[str] = (), related: Iterable[Sequence[str]] = ()) -> None:
        self.reason, self.attribute, self.owner = reason, attribute, owner
        self.subpath = tuple(str(k) for k in subpath)
        self.related = tuple(tuple(str(k) for k in key) for key in related)
        field = ".".join(k for k in (attribute, *self.subpath) if k)
        message = f"{field} {reason}" if field else reason
        super().__init__(f"{owner}: {message}" if owner else message)


def owner_of(instance: Any) -> str:
    """How a message names the Config ``instance``: the registered name of the plugin whose
    nested ``Config`` it is (``"ssn"``), else its class's qualified name (``"TrainSection"``)."""
    cls = type(instance)
    qualname = getattr(cls, "__qualname__", cls.__name__)
    outer_name, _, rest = qualname.partition(".")
    outer = getattr(sys.modules.get(cls.__module__), outer_name, None) if rest else None
    if isinstance(outer, type) and "<" not in qualname:
        from core.interfaces import REGISTERED_NAMES  # here: validators stay importable alone

        return REGISTERED_NAMES.get(outer, qualname)
    return cls.__name__


def fail(instance: Any, attribute: "attrs.Attribute", reason: str, *, subpath: Sequence[str] = (),
         related: Iterable[Sequence[str]] = ()) -> None:
    """Raise :class:`ConfigValueError` for ``attribute`` of ``instance``."""
    raise ConfigValueError(reason, attribute=attribute.name, owner=owner_of(instance),
                           subpath=subpath, related=related)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- integers ------------------------------------------------------------------------------------


def positive_int(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
    """An integer >= 1."""
    if not (_is_int(value) and value >= 1):
        fail(instance, attribute, f"must be an integer >= 1, got {_show(value)}")


def nonnegative_int(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
    """An integer >= 0."""
    if not (_is_int(value) and value >= 0):
        fail(instance, attribute, f"must be an integer >= 0, got {_show(value)}")


def int_at_least(minimum: int, why: str = "") -> Validator:
    """An integer >= ``minimum``; ``why`` is appended in parentheses (``"a covariance"``)."""
    reason = f"must be an integer >= {minimum}" + (f" ({why})" if why else "")

    def check(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
        if not (_is_int(value) and value >= minimum):
            fail(instance, attribute, f"{reason}, got {_show(value)}")
    return check


def int_in(low: int, high: int, why: str = "") -> Validator:
    """An integer in ``[low, high]`` (both included); ``why`` is appended in parentheses."""
    reason = f"must be an integer in [{low}, {high}]" + (f" ({why})" if why else "")

    def check(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
        if not (_is_int(value) and low <= value <= high):
            fail(instance, attribute, f"{reason}, got {_show(value)}")
    return check


# -- numbers -------------------------------------------------------------------------------------


def positive_number(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
    """A finite number > 0 (NaN and infinities refused)."""
    if not (_is_number(value) and 0 < value < math.inf):
        fail(instance, attribute, f"must be a finite number > 0, got {_show(value)}")


def nonnegative_number(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
    """A finite number >= 0."""
    if not (_is_number(value) and 0 <= value < math.inf):
        fail(instance, attribute, f"must be a finite number >= 0, got {_show(value)}")


def finite_number(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
    """Any finite number."""
    if not (_is_number(value) and math.isfinite(value)):
        fail(instance, attribute, f"must be a finite number, got {_show(value)}")


def number_in(low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> Validator:
    """A number in the interval from ``low`` to ``high``, each end included unless ``*_open``
    (``number_in(0, 1, high_open=True)``: ``[0, 1)``)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def inside(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below  # False for NaN

    def check(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
        if not (_is_number(value) and inside(value)):
            fail(instance, attribute, f"must be a number in {interval}, got {_show(value)}")
    return check


#: a share: a number in (0, 1].
fraction = number_in(0, 1, low_open=True)


# -- choices, sequences, names -------------------------------------------------------------------


def one_of(choices: Iterable[Any]) -> Validator:
    """One of ``choices`` (compared with ``==``; booleans never pass for numbers)."""
    choices = tuple(choices)
    valid = ", ".join(repr(c) for c in choices)

    def check(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
        if not any(value == c and isinstance(value, bool) == isinstance(c, bool)
                   for c in choices):
            fail(instance, attribute, f"must be one of {valid}, got {_show(value)}")
    return check


def each(validator: Validator) -> Validator:
    """Every element of a list or tuple passes ``validator``; the first that does not is
    reported under its index (``train.betas.1``)."""

    def check(instance: Any, attribute: "attrs.Attribute", values: Any) -> None:
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
            fail(instance, attribute, f"must be an array, got {_show(values)}")
        for i, value in enumerate(values):
            try:
                validator(instance, attribute, value)
            except ConfigValueError as exc:
                raise ConfigValueError(exc.reason, attribute=attribute.name,
                                       owner=owner_of(instance),
                                       subpath=(str(i), *exc.subpath)) from None
    return check


def non_empty(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
    """A non-empty string, list or table."""
    if not isinstance(value, (str, list, tuple, dict)) or len(value) == 0:
        fail(instance, attribute, f"must not be empty, got {_show(value)}")


def satisfies(predicate: Callable[[Any], bool], reason: str) -> Validator:
    """``predicate(value)`` holds; ``reason`` says what it asks (``"must be a multiple of 8"``)."""

    def check(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
        try:
            ok = bool(predicate(value))
        except (TypeError, ValueError, ArithmeticError):
            ok = False
        if not ok:
            fail(instance, attribute, f"{reason}, got {_show(value)}")
    return check


def file_name(instance: Any, attribute: "attrs.Attribute", value: Any) -> None:
    """A name for one file or folder inside another folder (empty allowed: "the default"): no
    path separator, no ``..``, no NUL, not ``.``, so that nothing lands outside that folder."""
    bad = not isinstance(value, str) or value.strip() == "." or ".." in value or \
        any(sep in value for sep in ("/", "\\", "\0")) or \
        (value != "" and value.strip() == "")
    if bad:
        fail(instance, attribute, "must be a plain folder name (no '/', '\\', '..' or NUL: the run "
             f"folder must stay inside output_dir), got {_show(value)}")
