"""The kit's machinery: cases, the check registry, pytest parametrization, temporary registration.

A check is a function of a :class:`Case` decorated with :func:`conformance_check`, which files it
under its plugin kind in :data:`CHECKS` (or in :data:`COMMON_CHECKS` for every kind); the checks
themselves live in one module per kind (:mod:`core.testing.regularizers`, ...), imported by
:mod:`core.testing`. A new plugin kind gets its own list in :data:`CHECKS` from
:data:`core.interfaces.PLUGIN_KINDS` and its checks in a module of its own.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import attrs
import torch
from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import PLUGIN_KINDS, REGISTERED_NAMES, Architecture, Plugin

__all__ = ["Case", "Check", "CHECKS", "COMMON_CHECKS", "ConformanceError", "SEED", "SMALL_VALUES",
           "Skipped", "as_case", "check_plugin", "checks_for", "conformance_check",
           "config_table", "covered_members", "differences", "fail", "interface_members",
           "kind_of", "parametrize_with_checks", "registered", "skip", "small_architecture",
           "small_config", "small_discriminator", "state_of"]


#: Config fields :func:`small_config` sets, where a plugin's Config has them, to keep checks fast.
SMALL_VALUES: dict[str, Any] = {"ch": 8, "g_ch": 8, "num_samples": 64, "reference_samples": 64}


#: the seed every check starts from.
SEED = 1234


class ConformanceError(AssertionError):
    """A plugin breaks the contract; the message names the plugin, the check and what is wrong."""


class Skipped(Exception):
    """A check that cannot run without files the case does not provide (pytest: a skip)."""


def kind_of(cls: type) -> str:
    """The plugin kind (``"regularizers"``, ...) of a plugin class."""
    for kind, base in PLUGIN_KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    raise TypeError(f"{cls!r} is not a subclass of one of the plugin kinds "
                    f"({', '.join(b.__name__ for b in PLUGIN_KINDS.values())}) of core.interfaces")


@attrs.define
class Case:
    """One plugin to check: its class, the Config to check it with, and how to make its files.

    ``prepare(root)`` is called once (per process) with the data root before the checks that
    need files: a dataset writes a small sample of its files below ``root``; a metric puts its
    network weights where it looks for them under ``root``. The root is a fresh temporary folder
    unless ``root`` names one (cases may share a root, and with it caches such as a metric's
    trained classifier).
    """

    cls: type[Plugin]
    config: Any = None
    prepare: Callable[[Path], None] | None = None
    id: str = ""
    root: Path | None = None
    #: run every check of this case as ``slow`` (e.g. a metric that takes tens of seconds).
    slow: bool = False
    _root: Path | None = attrs.field(default=None, init=False, repr=False, eq=False)
    _tmp: Any = attrs.field(default=None, init=False, repr=False, eq=False)
    #: (evaluation record, MetricResult) pairs computed so far (metrics are evaluated twice).
    _evaluations: list = attrs.field(factory=list, init=False, repr=False, eq=False)
    #: the result of the 2-process DDP run (:func:`core.testing.ddp.ddp_run`), shared by the
    #: checks that compare it.
    _ddp: Any = attrs.field(default=None, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.cls, Plugin):  # a configured instance
            if self.config is None:
                self.config = self.cls.config
            self.cls = type(self.cls)
        kind_of(self.cls)  # a plugin class, or a clear error
        if not self.id:
            self.id = f"{self.kind}/{REGISTERED_NAMES.get(self.cls, self.cls.__name__)}"

    @property
    def kind(self) -> str:
        return kind_of(self.cls)

    def create(self) -> Plugin:
        """A fresh instance (each check gets its own; the Config is copied)."""
        return self.cls(copy.deepcopy(self.config) if self.config is not None else None)

    def data_root(self) -> Path:
        """A data root prepared by ``prepare`` (made once, kept for the life of the process)."""
        if self._root is None:
            if self.root is not None:
                root = Path(self.root)
                root.mkdir(parents=True, exist_ok=True)
            else:
                self._tmp = tempfile.TemporaryDirectory(prefix="specreg-conformance-")
                root = Path(self._tmp.name)
            if self.prepare is not None:
                self.prepare(root)
            self._root = root
        return self._root

    def __str__(self) -> str:
        return self.id


def as_case(plugin: Any) -> Case:
    """A :class:`Case` from a Case, a plugin class or a configured plugin instance."""
    if isinstance(plugin, Case):
        return plugin
    if isinstance(plugin, Plugin):
        return Case(type(plugin), plugin.config)
    if isinstance(plugin, type) and issubclass(plugin, Plugin):
        return Case(plugin)
    raise TypeError(f"expected a plugin class, a plugin instance or core.testing.Case, "
                    f"got {plugin!r}")


@attrs.frozen
class Check:
    """One clause of the contract: ``check(plugin)`` raises :class:`ConformanceError` on a breach."""

    function: Callable[[Case], None]
    kind: str  # a PLUGIN_KINDS key, or "all"
    #: the interface members (methods, properties, ``Config``) this check exercises.
    covers: tuple[str, ...] = ()
    slow: bool = False

    @property
    def name(self) -> str:
        return self.function.__name__

    def __call__(self, plugin: Any) -> None:
        case = as_case(plugin)
        if self.kind not in ("all", case.kind):
            raise TypeError(f"{self.name} checks {self.kind}, not {case.kind} ({case})")
        try:
            self.run(case)
        except Skipped as skipped:
            skip(str(skipped))

    def run(self, case: Case) -> None:
        """Run on ``case``; a breach raises ConformanceError naming plugin, check and contract."""
        try:
            self.function(case)
        except ConformanceError as exc:
            contract = " ".join((self.function.__doc__ or "").split())
            raise ConformanceError(f"{case}: {self.name}: {exc}\n  the contract: {contract}"
                                   ) from None

    def __repr__(self) -> str:
        return self.name


#: the checks of each plugin kind (the common ones are in :data:`COMMON_CHECKS`).
CHECKS: dict[str, list[Check]] = {kind: [] for kind in PLUGIN_KINDS}


#: checks every plugin gets.
COMMON_CHECKS: list[Check] = []


def conformance_check(kind: str, covers: tuple[str, ...] = (), slow: bool = False):
    def register(function: Callable[[Case], None]) -> Callable[[Case], None]:
        check = Check(function, kind, tuple(covers), slow)
        (COMMON_CHECKS if kind == "all" else CHECKS[kind]).append(check)
        return function
    return register


def checks_for(plugin: Any, include_slow: bool = True) -> list[Check]:
    """The checks that apply to ``plugin`` (a class, instance or :class:`Case`)."""
    case = as_case(plugin)
    return [c for c in [*COMMON_CHECKS, *CHECKS[case.kind]] if include_slow or not c.slow]


def parametrize_with_checks(plugins: Iterable[Any], include_slow: bool = True):
    """A ``pytest.mark.parametrize("plugin, check", ...)`` over every check of every plugin.

    Test ids read ``regularizers/orthogonal-check_regularizer_state_dict_round_trip``; the
    multi-process checks (and every check of a ``Case(slow=True)``) carry ``pytest.mark.slow``
    (register the marker in your pytest config, or deselect them with ``-m "not slow"``).
    """
    import pytest

    params = []
    for plugin in plugins:
        case = as_case(plugin)
        for check in checks_for(case, include_slow):
            marks = [pytest.mark.slow] if check.slow or case.slow else []
            params.append(pytest.param(case, check, marks=marks, id=f"{case.id}-{check.name}"))
    return pytest.mark.parametrize(("plugin", "check"), params)


def check_plugin(plugin: Any, include_slow: bool = False) -> list[str]:
    """Run every check outside pytest; raise one ConformanceError listing all failures, else
    return the names of the checks that passed (skipped ones are left out)."""
    case = as_case(plugin)
    passed, failures = [], []
    for check in checks_for(case, include_slow):
        try:
            check.run(case)
            passed.append(check.name)
        except Skipped:
            continue
        except ConformanceError as exc:
            failures.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a crash is a failure of the check, reported
            failures.append(f"{case}: {check.name}: crashed: {type(exc).__name__}: {exc}")
    if failures:
        raise ConformanceError(f"{len(failures)} check(s) failed:\n" + "\n".join(failures))
    return passed


def interface_members(base: type) -> set[str]:
    """The public members a plugin kind defines (methods, properties, class attributes), with
    ``Config`` and ``name`` (which :class:`core.interfaces.Plugin` sets on each instance)."""
    members = {"Config", "name"}
    for cls in base.__mro__:
        if cls is object:
            continue
        for name in vars(cls):
            if not name.startswith("_") and name not in {"Config"}:
                members.add(name)
    return members


def covered_members(kind: str) -> set[str]:
    """The interface members that at least one check of ``kind`` (or a common check) exercises."""
    return {m for c in [*COMMON_CHECKS, *CHECKS[kind]] for m in c.covers}


def skip(reason: str) -> None:
    try:
        import pytest
    except ImportError:  # pragma: no cover - the kit is used under pytest
        raise Skipped(reason) from None
    pytest.skip(reason)


def fail(case: Case, what: str) -> None:
    """Raise the breach (:meth:`Check.run` adds the plugin, the check and the contract)."""
    raise ConformanceError(what)


@contextlib.contextmanager
def registered(cls: type[Plugin]) -> Iterator[str]:
    """The name ``cls`` is registered under; registers it for the block if it is not yet."""
    from core.registry import Provider, get_registry

    kind = kind_of(cls)
    table = get_registry().kinds[kind]
    own = get_registry().name_of(cls, kind)
    if own is not None:
        yield own
        return
    base = f"conformance-{cls.__name__.lower()}"
    name, n = base, 1
    while name in table:
        n += 1
        name = f"{base}-{n}"

    def register_hook(register):
        register(name, cls)

    plugin = types.SimpleNamespace(**{f"register_{kind}": hookimpl(register_hook)})
    provider = Provider(name=f"core.testing:{name}", distribution="conformance kit")
    registry = get_registry()
    registry.add(plugin, provider)
    try:
        yield name
    finally:
        registry.remove(provider)


def small_config(cls: type[Plugin], **values: Any) -> Any:
    """``cls.Config`` with the :data:`SMALL_VALUES` fields it has, then ``values``, set."""
    fields = {f.name for f in attrs.fields(cls.Config)}
    return cls.Config(**{**{k: v for k, v in SMALL_VALUES.items() if k in fields}, **values})


def small_architecture(num_classes: int = 0) -> Architecture:
    """A small resnet32 (ch = g_ch = 8): 32x32 images, D with 10 convolutions and a linear layer
    (and the projection embedding when ``num_classes > 0``)."""
    from core.registry import get_registry

    cls = get_registry().architectures["resnet32"]
    return cls(cls.Config(ch=8, g_ch=8, num_classes=num_classes))


def small_discriminator(num_classes: int = 4) -> nn.Module:
    """The discriminator of :func:`small_architecture`; conditional by default, so that it has
    every layer type a regularizer applies to (Conv2d, Linear, Embedding)."""
    return small_architecture(num_classes).build_discriminator()


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module.state_dict()``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True,
                rtol: float = 1e-5, atol: float = 1e-6) -> list[str]:
    """``"name (max difference d)"`` for each entry of two state dicts that differs."""
    if a.keys() != b.keys():
        return [f"keys differ: only in one: {sorted(set(a) ^ set(b))[:6]}"]
    out = []
    for key in a:
        x, y = a[key], b[key]
        same = (x.shape == y.shape and (torch.equal(x, y) if exact else
                                        torch.allclose(x.double(), y.double(), rtol, atol)))
        if not same:
            diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else "shape"
            out.append(f"{key} (max difference {diff})")
    return out


def config_table(config: Any) -> dict[str, Any]:
    from core.recipe import converter

    return _drop_none(converter.unstructure(config) or {})


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value
