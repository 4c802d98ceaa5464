"""The plugin conformance kit: the contract of every plugin kind, as checks anyone runs on a plugin.

A third-party package checks its plugin against the very checks specreg runs on its built-ins,
with one decorator (the pattern of scikit-learn's ``parametrize_with_checks``)::

    # tests/test_conformance.py of your package
    from core.testing import parametrize_with_checks
    from specreg_orthogonal import Orthogonal

    @parametrize_with_checks([Orthogonal])
    def test_conformance(plugin, check):
        check(plugin)

Each element is a plugin class (checked with its default ``Config``), a configured instance
(``Orthogonal(Orthogonal.Config(strength=1e-3))``), or a :class:`Case` that also says how to make
the files the plugin needs (a dataset's images, a metric's network weights)::

    Case(MyFaces(MyFaces.Config(resolution=16)), prepare=lambda root: write_my_faces(root / "faces"))

Outside pytest, :func:`check_plugin` runs every check and raises one :class:`ConformanceError`
listing all failures. The checks, by kind (:data:`CHECKS`; ``Check.covers`` names the interface
members each one exercises, and specreg's own meta-test fails if a member or a hook has none):

- every kind: the default ``Config`` is constructible and round-trips through the recipe
  converter and TOML; the class has its own docstring.
- regularizers, on a small conditional resnet32 discriminator (ch = 8; convolutions, linear and
  the projection embedding): applies to every layer type; finite outputs and a gradient for every
  parameter; state round-trips through ``state_dict`` and safetensors, and a training run resumed
  from a checkpoint is bit-identical to a straight one; eval mode (and
  :func:`core.layers.frozen_state`) changes no state; k micro-batches of one optimizer step
  equal one batch (state updated once, ``after_step`` once per optimizer step, the loss term
  counted once); deterministic under a seed; identical on 2 gloo processes (slow).
- architectures: shapes, resolution and range of G and D; conditional labels; every weight
  layer discoverable and reparametrizable (what the plan and the spectral monitor count);
  gradients for every parameter; deterministic under a seed; ``state_dict`` round trip.
- losses: sign conventions, gradient signs, means over the batch (so micro-batches add up).
- metrics: a finite score under ``primary``, a JSON-ready protocol record, deterministic in the
  context's seed whatever the global random state (run on a tiny generator and the stacked
  digits; each metric is evaluated twice in all).
- datasets: missing files raise :class:`core.errors.DataMissingError` naming where it looked;
  items are ``float32 [3, R, R]`` in [-1, 1] with integer labels in range, batches collate, and
  item ``i`` is the same every time (needs the files: a ``Case.prepare``, else skipped).

Checks build small things (widths of 8, 64 images, a few steps) and take about a second each;
the multi-process one is marked ``slow``. A regularizer check that trains runs the real
:class:`core.train.Trainer` (with the built-in ``resnet32``, ``stacked_digits`` and ``hinge``);
a plugin that is not registered yet is registered for the duration of the check
(:func:`registered`). :func:`small_config` shrinks the usual size fields of a Config
(``Case(MyArch(small_config(MyArch)))``); :func:`write_prepared_sample` writes random images as
the prepared array of a dataset built on :class:`plugins.datasets.base.ImageDataset`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import socket
import sys
import tempfile
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from core.errors import DataMissingError, SpecregError
from core.hookspecs import hookimpl
from core.interfaces import (PLUGIN_KINDS, Architecture, Dataset, EvaluationContext,
                             MetricResult, Plugin, Regularizer)
from core.layers import LAYER_TYPES, frozen_state, raw_weight, weight_layers

__all__ = ["Case", "Check", "CHECKS", "COMMON_CHECKS", "ConformanceError", "check_plugin",
           "checks_for", "covered_members", "interface_members", "kind_of",
           "parametrize_with_checks", "registered", "small_architecture", "small_config",
           "small_discriminator", "write_prepared_sample", "SMALL_VALUES"]

#: Config fields :func:`small_config` sets, where a plugin's Config has them, to keep checks fast.
SMALL_VALUES: dict[str, Any] = {"ch": 8, "g_ch": 8, "num_samples": 64, "reference_samples": 64}
#: the seed every check starts from.
SEED = 1234


class ConformanceError(AssertionError):
    """A plugin breaks the contract; the message names the plugin, the check and what is wrong."""


class _Skipped(Exception):
    """A check that cannot run without files the case does not provide (pytest: a skip)."""


# ---------------------------------------------------------------------------------------------
# Cases and checks
# ---------------------------------------------------------------------------------------------


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

    def __attrs_post_init__(self) -> None:
        if isinstance(self.cls, Plugin):  # a configured instance
            if self.config is None:
                self.config = self.cls.config
            self.cls = type(self.cls)
        kind_of(self.cls)  # a plugin class, or a clear error
        if not self.id:
            self.id = f"{self.kind}/{self.cls.name or self.cls.__name__}"

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
        except _Skipped as skip:
            _skip(str(skip))

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


def _check(kind: str, covers: tuple[str, ...] = (), slow: bool = False):
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
        except _Skipped:
            continue
        except ConformanceError as exc:
            failures.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a crash is a failure of the check, reported
            failures.append(f"{case}: {check.name}: crashed: {type(exc).__name__}: {exc}")
    if failures:
        raise ConformanceError(f"{len(failures)} check(s) failed:\n" + "\n".join(failures))
    return passed


def interface_members(base: type) -> set[str]:
    """The public members a plugin kind defines (methods, properties, class attributes)."""
    members = {"Config"}
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


def _skip(reason: str) -> None:
    try:
        import pytest
    except ImportError:  # pragma: no cover - the kit is used under pytest
        raise _Skipped(reason) from None
    pytest.skip(reason)


def _fail(case: Case, what: str) -> None:
    """Raise the breach (:meth:`Check.run` adds the plugin, the check and the contract)."""
    raise ConformanceError(what)


# ---------------------------------------------------------------------------------------------
# Helpers: registration, small models, data
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def registered(cls: type[Plugin]) -> Iterator[str]:
    """The name ``cls`` is registered under; registers it for the block if it is not yet."""
    from core.registry import Provider, get_registry

    kind = kind_of(cls)
    table = get_registry().kinds[kind]
    if cls.name and table.get(cls.name) is cls:
        yield cls.name
        return
    had_own, old = "name" in vars(cls), vars(cls).get("name")
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
        if had_own:
            cls.name = old
        else:
            with contextlib.suppress(AttributeError):
                delattr(cls, "name")


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


def _images(n: int, rng: torch.Generator, resolution: int = 32, num_classes: int = 4
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.rand(n, 3, resolution, resolution, generator=rng) * 2 - 1
    y = torch.randint(0, num_classes, (n,), generator=rng) if num_classes else None
    return x, y


def _objective(logits: torch.Tensor) -> torch.Tensor:
    """A smooth D objective (logistic, first half "real", second half "fake"): every logit gets
    a gradient, unlike a saturated hinge."""
    sign = torch.ones_like(logits)
    sign[len(sign) // 2:] = -1
    return F.softplus(-sign * logits).mean()


def _loss_term(case: Case, reg: Regularizer, module: nn.Module, iteration: int
               ) -> torch.Tensor | None:
    term = reg.loss_term(module, iteration)
    if term is None:
        return None
    if not isinstance(term, torch.Tensor) or term.ndim != 0:
        _fail(case, f"loss_term must return None or a scalar tensor, got {term!r:.80}")
    if not torch.isfinite(term):
        _fail(case, f"loss_term returned a non-finite value {term.item()}")
    return term


def _step(case: Case, reg: Regularizer, model: nn.Module, opt: torch.optim.Optimizer,
          batches: list[tuple[torch.Tensor, torch.Tensor | None]], iteration: int,
          wrapped: nn.Module | None = None) -> None:
    """One optimizer step over micro-batches, as :class:`core.train.Trainer` does it: state
    updates in the first micro-batch only, each micro-batch's loss (+ loss term) divided by k,
    gradients all-reduced on the last one (``wrapped`` = the DDP module), then ``after_step``."""
    k = len(batches)
    opt.zero_grad(set_to_none=True)
    forward = wrapped or model
    for m, (x, y) in enumerate(batches):
        with contextlib.ExitStack() as stack:
            if m > 0:
                stack.enter_context(frozen_state())
            if wrapped is not None and m < k - 1:
                stack.enter_context(wrapped.no_sync())
            loss = _objective(forward(x, y))
            term = _loss_term(case, reg, model, iteration)
            if term is not None:
                loss = loss + term
            (loss / k).backward()
    opt.step()
    with torch.no_grad():
        reg.after_step(model, iteration)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True,
                 rtol: float = 1e-5, atol: float = 1e-6) -> list[str]:
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


def _regularized(case: Case, num_classes: int = 4, seed: int = SEED
                 ) -> tuple[Regularizer, nn.Module]:
    torch.manual_seed(seed)
    module = small_discriminator(num_classes)
    reg = case.create()
    out = reg.apply(module)
    if not isinstance(out, nn.Module):
        _fail(case, f"apply must return the module, got {type(out).__name__}")
    return reg, out


def _config_table(config: Any) -> dict[str, Any]:
    from core.recipe import converter

    return _drop_none(converter.unstructure(config) or {})


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Every kind
# ---------------------------------------------------------------------------------------------


@_check("all", covers=("Config", "name"))
def check_config_round_trip(case: Case) -> None:
    """The default Config is constructible; the Config round-trips through the recipe converter
    (a plugin table with ``name``) and TOML, and the recipe builds the same plugin."""
    import tomllib

    import tomli_w

    from core.recipe import (ArchitectureSpec, DatasetSpec, LossSpec, MetricSpec,
                             RegularizerSpec, converter)

    cls = case.cls
    if not attrs.has(cls.Config):
        _fail(case, "Config must be an attrs class (@attrs.define)")
    try:
        default = cls.Config()
    except Exception as exc:  # noqa: BLE001
        _fail(case, f"Config() is not default-constructible: {type(exc).__name__}: {exc}")
    plugin = case.create()
    if not isinstance(plugin.config, cls.Config):
        _fail(case, f"instance.config is {type(plugin.config).__name__}, not {cls.__name__}.Config")
    for config in (default, plugin.config):
        table = _config_table(config)
        try:
            text = tomli_w.dumps(table)
        except Exception as exc:  # noqa: BLE001
            _fail(case, f"Config {table} cannot be written as TOML: {exc}")
        back = converter.structure(tomllib.loads(text), cls.Config)
        if back != config:
            _fail(case, f"Config does not round-trip through TOML and the recipe converter: "
                        f"{config!r} -> {text!r} -> {back!r}")
        with registered(cls) as name:
            spec_cls = {"regularizers": RegularizerSpec, "architectures": ArchitectureSpec,
                        "losses": LossSpec, "metrics": MetricSpec,
                        "datasets": DatasetSpec}[case.kind]
            spec = converter.structure({"name": name, **table}, spec_cls)
            if spec.config != config or type(spec.create()) is not cls:
                _fail(case, f"the recipe table {{name = {name!r}, ...}} does not build the same "
                            f"plugin: {spec.config!r}")


@_check("all")
def check_documented(case: Case) -> None:
    """The class has its own docstring (shown in listings; say what it implements, citing the
    paper and equation)."""
    doc = vars(case.cls).get("__doc__")
    if not doc or not doc.strip():
        _fail(case, f"{case.cls.__name__} has no docstring of its own")


# ---------------------------------------------------------------------------------------------
# Regularizers
# ---------------------------------------------------------------------------------------------


@_check("regularizers", covers=("apply", "loss_term", "after_step"))
def check_regularizer_applies_to_every_layer_type(case: Case) -> None:
    """``apply`` returns the module with its layers, and every Conv2d, Linear and Embedding is
    regularized: parametrized, in the loss term's autograd graph, or changed by ``after_step``."""
    torch.manual_seed(SEED)
    module = small_discriminator(num_classes=4)
    before = [name for name, _ in weight_layers(module)]
    reg = case.create()
    out = reg.apply(module)
    if not isinstance(out, nn.Module):
        _fail(case, f"apply must return the module, got {type(out).__name__}")
    layers = dict(weight_layers(out))
    lost = [n for n in before if n not in layers]
    if lost:
        _fail(case, f"apply removed or replaced layers: {lost}")
    touched = {n for n, layer in layers.items() if parametrize.is_parametrized(layer, "weight")}
    term = _loss_term(case, reg, out, 0)
    rest = [n for n in layers if n not in touched]
    if term is not None and rest:
        grads = torch.autograd.grad(term, [raw_weight(layers[n]) for n in rest], allow_unused=True)
        touched |= {n for n, g in zip(rest, grads) if g is not None}
    rest = [n for n in layers if n not in touched]
    if rest:
        old = {n: raw_weight(layers[n]).detach().clone() for n in rest}
        with torch.no_grad():
            reg.after_step(out, 0)
        touched |= {n for n in rest if not torch.equal(old[n], raw_weight(layers[n]))}
    untouched = {}
    for n, layer in layers.items():
        if n not in touched:
            kind = next(k for k, t in LAYER_TYPES.items() if isinstance(layer, t))
            untouched.setdefault(kind, []).append(n)
    if untouched:
        _fail(case, "layers left unregularized (SPEC §2: every Conv2d, Linear and Embedding): "
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in untouched.items()))


@_check("regularizers", covers=("apply", "loss_term", "after_step"))
def check_regularizer_finite_outputs_and_gradients(case: Case) -> None:
    """On a regularized D (and G): finite outputs in train and eval mode, a finite gradient for
    every parameter, a finite loss term that has a gradient, finite weights after ``after_step``."""
    reg, D = _regularized(case)
    rng = torch.Generator().manual_seed(SEED)
    x, y = _images(6, rng)
    logits = D(x, y)
    if logits.shape != (6,) or not torch.isfinite(logits).all():
        _fail(case, f"the regularized D gives logits {tuple(logits.shape)} with non-finite "
                    f"values or the wrong shape (expected (6,))")
    loss = _objective(logits)
    term = _loss_term(case, reg, D, 0)
    if term is not None:
        if not term.requires_grad:
            _fail(case, "loss_term returned a tensor without a gradient (a constant penalty "
                        "does nothing; return None instead)")
        loss = loss + term
    loss.backward()
    bad = [n for n, p in D.named_parameters() if p.requires_grad and
           (p.grad is None or not torch.isfinite(p.grad).all())]
    if bad:
        _fail(case, f"parameters without a finite gradient: {bad[:8]}")
    with torch.no_grad():
        reg.after_step(D, 0)
        D.eval()
        if not torch.isfinite(D(x, y)).all():
            _fail(case, "non-finite eval-mode logits after after_step")
    bad = [n for n, p in D.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        _fail(case, f"after_step left non-finite parameters: {bad[:8]}")
    # the generator too: regularizers may be applied to G (SN on ImageNet's G, orthogonal reg.)
    torch.manual_seed(SEED)
    arch = small_architecture(num_classes=4)
    reg_g = case.create()
    G = reg_g.apply(arch.build_generator())
    z, yz = arch.sample_latents(4, torch.Generator().manual_seed(1))
    images = G(z, yz)
    loss = images.square().mean()
    term = _loss_term(case, reg_g, G, 0)
    if term is not None:
        loss = loss + term
    loss.backward()
    bad = [n for n, p in G.named_parameters() if p.requires_grad and
           (p.grad is None or not torch.isfinite(p.grad).all())]
    if not torch.isfinite(images).all() or bad:
        _fail(case, f"the regularized generator gives non-finite images or parameters without "
                    f"a finite gradient: {bad[:8]}")


@_check("regularizers", covers=("apply",))
def check_regularizer_state_dict_round_trip(case: Case) -> None:
    """All regularizer state lives in ``state_dict()`` (tensors only, safetensors-ready): loaded
    into a fresh regularized D it gives the same outputs and the same next training step."""
    from safetensors.torch import load, save

    reg1, D1 = _regularized(case, seed=SEED)
    rng = torch.Generator().manual_seed(SEED)
    opt1 = torch.optim.SGD(D1.parameters(), lr=0.05)
    for it in range(2):
        _step(case, reg1, D1, opt1, [_images(4, rng)], it)
    state = D1.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        _fail(case, f"state_dict holds non-tensor entries (checkpoints are safetensors): "
                    f"{not_tensors}")
    state = load(save({k: v.detach().clone().contiguous() for k, v in state.items()}))
    reg2, D2 = _regularized(case, seed=SEED + 1)  # other initial weights and state
    try:
        D2.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        _fail(case, f"the state_dict of a trained regularized D does not load into a freshly "
                    f"regularized one (state created lazily, or shapes that change?): {exc}")
    diff = _differences(_state(D1), _state(D2))
    if diff:
        _fail(case, f"state differs after loading: {diff[:5]}")
    x, y = _images(4, rng)
    D1.eval(), D2.eval()
    with torch.no_grad():
        if not torch.equal(D1(x, y), D2(x, y)):
            _fail(case, "eval outputs differ after loading the state_dict")
    D1.train(), D2.train()
    batch = [_images(4, rng)]
    _step(case, reg1, D1, torch.optim.SGD(D1.parameters(), lr=0.05), batch, 2)
    _step(case, reg2, D2, torch.optim.SGD(D2.parameters(), lr=0.05), batch, 2)
    diff = _differences(_state(D1), _state(D2))
    if diff:
        _fail(case, f"the next training step differs between the original and the reloaded D "
                    f"(state kept outside state_dict, e.g. on the regularizer object?): {diff[:5]}")


class _Stop(Exception):
    pass


def _trainer_recipe(name: str, config: Any, **train: Any):
    from core.recipe import structure_recipe

    table = {
        "seed": 3,
        "dataset": {"name": "stacked_digits", "num_samples": 64},
        "architecture": {"name": "resnet32", "ch": 8, "g_ch": 8},
        "discriminator": {"regularizer": {"name": name, **_config_table(config)}},
        "train": {"iterations": 4, "batch_size": 8, "n_critic": 1, "lr_d": 1e-3, "lr_g": 1e-3,
                  "cpu": True, **train},
        "checkpoint": {"every": 2, "keep": 5},
        "log": {"every": 1, "sample_every": 0, "grid_size": 4, "progress": False},
    }
    return structure_recipe(table)


def _trainer(recipe, run_dir: Path, callbacks=()):
    from core.train import build_trainer, make_accelerator

    return build_trainer(recipe, run_dir, make_accelerator(recipe), callbacks=list(callbacks))


def _trainer_state(trainer) -> dict[str, torch.Tensor]:
    return {f"{key}.{k}": v for key, model in trainer.models.items()
            for k, v in _state(trainer.unwrapped(model)).items()}


@_check("regularizers", covers=("apply", "after_step", "loss_term"))
def check_regularizer_checkpoint_resume(case: Case) -> None:
    """A training run (the real Trainer) interrupted and resumed from its checkpoint ends
    bit-identical to a straight run: weights, regularizer state, optimizer moments."""
    from core import checkpoint as ckpt
    from core.train import TrainingCallback

    class Interrupt(TrainingCallback):
        def on_iteration_end(self, trainer, iteration):
            if iteration == 3:
                raise _Stop

    with registered(case.cls) as name, tempfile.TemporaryDirectory() as tmp:
        recipe = _trainer_recipe(name, case.create().config)
        straight = _trainer(recipe, Path(tmp) / "straight")
        straight.fit()
        first = _trainer(recipe, Path(tmp) / "resumed", [Interrupt()])
        with contextlib.suppress(_Stop):
            first.fit()
        first.log.close()  # fit closes its log only when it ends normally
        second = _trainer(recipe, Path(tmp) / "resumed")
        second.resume(ckpt.resolve_checkpoint(Path(tmp) / "resumed"))
        second.fit()
        diff = _differences(_trainer_state(straight), _trainer_state(second))
        if diff:
            _fail(case, f"a run resumed from its iteration-2 checkpoint differs from a straight "
                        f"run after 4 iterations: {diff[:5]}")
        a, b = straight.opt_d.state_dict()["state"], second.opt_d.state_dict()["state"]
        if any(not torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a):
            _fail(case, "D's optimizer moments differ between the resumed and the straight run")


@_check("regularizers", covers=("apply", "loss_term"))
def check_regularizer_eval_mode_changes_no_state(case: Case) -> None:
    """Eval-mode forwards (with or without gradients), the loss term, and training-mode forwards
    under :func:`core.layers.frozen_state` change no parameter or buffer."""
    reg, D = _regularized(case)
    rng = torch.Generator().manual_seed(SEED)
    x, y = _images(4, rng)
    D(x, y)  # a first training forward: state created lazily exists from here on
    before = _state(D)
    D.eval()
    with torch.no_grad():
        first = D(x, y)
        second = D(x, y)
    D(x, y).sum().backward()
    _loss_term(case, reg, D, 0)
    diff = _differences(before, _state(D))
    if diff:
        _fail(case, f"eval mode changed state: {diff[:5]}")
    if not torch.equal(first, second):
        _fail(case, "two eval-mode forwards of the same input differ")
    D.train()
    with frozen_state():
        D(x, y).sum().backward()
        _loss_term(case, reg, D, 0)
    diff = _differences(before, _state(D))
    if diff:
        _fail(case, f"a training-mode forward under frozen_state() changed state (it must only "
                    f"update while core.layers.state_updates_enabled()): {diff[:5]}")


@_check("regularizers", covers=("apply", "after_step", "loss_term"))
def check_regularizer_acts_once_per_optimizer_step(case: Case) -> None:
    """Two optimizer steps of 2 micro-batches of 4 equal two steps of one batch of 8 (in float64,
    so that rounding neither hides nor fakes a difference): state updated by the first
    micro-batch only, the loss term counted once, ``after_step`` once per step. In the real
    Trainer, ``after_step`` runs once per optimizer step and ``loss_term`` once per micro-batch."""
    results = []
    for k in (1, 2):
        reg, D = _regularized(case)
        D = D.double()
        opt = torch.optim.SGD(D.parameters(), lr=0.05)
        rng = torch.Generator().manual_seed(SEED)
        grads = {}
        for it in range(2):
            x, y = _images(8, rng)  # objective: first half "real", second half "fake"
            x = x.double()
            if k == 1:
                batches = [(x, y)]
            else:  # micro-batch i: real images 2i, 2i+1 and fake images 4+2i, 5+2i
                batches = [(torch.cat([x[2 * i:2 * i + 2], x[4 + 2 * i:6 + 2 * i]]),
                            torch.cat([y[2 * i:2 * i + 2], y[4 + 2 * i:6 + 2 * i]]))
                           for i in range(2)]
            _step(case, reg, D, opt, batches, it)
            if it == 0:
                grads = {n: p.grad.detach().clone() for n, p in D.named_parameters()
                         if p.grad is not None}
        results.append((grads, _state(D)))
    diff = _differences(results[0][0], results[1][0], exact=False, rtol=1e-7, atol=1e-9)
    if diff:
        _fail(case, f"gradients of one step differ between 1 batch of 8 and 2 micro-batches of "
                    f"4: {diff[:5]}")
    diff = _differences(results[0][1], results[1][1], exact=False, rtol=1e-7, atol=1e-9)
    if diff:
        _fail(case, f"state after 2 steps differs between 1 batch of 8 and 2 micro-batches of 4 "
                    f"(state updated per forward, or the loss term not per step?): {diff[:5]}")
    # the real training loop: n_critic = 2 D steps of 2 micro-batches each in one iteration
    with registered(case.cls) as name, tempfile.TemporaryDirectory() as tmp:
        recipe = _trainer_recipe(name, case.create().config, iterations=1, n_critic=2,
                                 micro_batch_size=4)
        trainer = _trainer(recipe, Path(tmp) / "run")
        if trainer.plan.accumulation != 2:
            _fail(case, f"expected 2 micro-batches per step, the plan has "
                        f"{trainer.plan.accumulation}")
        calls = {"after_step": 0, "loss_term": 0}
        reg = trainer.d_reg

        def counting(method):
            @functools.wraps(method)
            def wrapper(*args, **kwargs):
                calls[method.__name__] += 1
                return method(*args, **kwargs)
            return wrapper

        reg.after_step = counting(reg.after_step)
        reg.loss_term = counting(reg.loss_term)
        try:
            trainer.train_iteration()
        finally:
            trainer.log.close()
        if calls != {"after_step": 2, "loss_term": 4}:
            _fail(case, f"in one iteration of 2 D steps x 2 micro-batches the Trainer called "
                        f"after_step {calls['after_step']} times (expected 2, once per optimizer "
                        f"step) and loss_term {calls['loss_term']} times (expected 4, once per "
                        f"micro-batch)")


@_check("regularizers", covers=("apply", "after_step", "loss_term"))
def check_regularizer_deterministic_under_seed(case: Case) -> None:
    """The same seed gives bit-identical state and outputs (apply, training steps, eval)."""
    runs = []
    for _ in range(2):
        reg, D = _regularized(case, seed=SEED)
        rng = torch.Generator().manual_seed(SEED)
        opt = torch.optim.SGD(D.parameters(), lr=0.05)
        for it in range(2):
            _step(case, reg, D, opt, [_images(4, rng), _images(4, rng)], it)
        D.eval()
        with torch.no_grad():
            out = D(*_images(4, rng))
        runs.append(({**_state(D), "__eval_output": out}))
    diff = _differences(*runs)
    if diff:
        _fail(case, f"two runs with the same seed differ: {diff[:5]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_child(rank: int, world: int, port: int, case: Case, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    code = 1
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        reg, D = _regularized(case, seed=SEED)  # identical initialization on every rank
        ddp = DistributedDataParallel(D)  # buffers synced from rank 0 at every forward
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        rng = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
        torch.manual_seed(SEED + rank)  # and its own global random stream, as under torchrun
        for it in range(3):
            _step(case, reg, D, opt, [_images(4, rng), _images(4, rng)], it, wrapped=ddp)
        states: list[Any] = [None] * world
        dist.all_gather_object(states, _state(D))
        if rank == 0:
            Path(out).write_text(json.dumps(_differences(states[0], states[1])))
        dist.barrier()
        dist.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the file, then exit
        Path(f"{out}.rank{rank}.error").write_text(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@_check("regularizers", covers=("apply", "after_step", "loss_term"), slow=True)
def check_regularizer_consistent_across_processes(case: Case) -> None:
    """Under DDP on 2 gloo processes, each with its own data and random stream, parameters and
    regularizer state stay identical on both after 3 steps of 2 micro-batches."""
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "differences.json")
        port = _free_port()
        procs = [ctx.Process(target=_ddp_child, args=(r, 2, port, case, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [f.read_text() for f in Path(tmp).glob("*.error")]
        if errors:
            _fail(case, "a DDP process failed:\n" + errors[0][-3000:])
        if not Path(out).is_file():
            _fail(case, f"the DDP processes ended without a result (exit codes "
                        f"{[p.exitcode for p in procs]})")
        diff = json.loads(Path(out).read_text())
        if diff:
            _fail(case, f"parameters/state differ between the 2 processes: {diff[:5]}")


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


def _built(case: Case, seed: int = SEED) -> tuple[Architecture, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    arch = case.create()
    return arch, arch.build_generator(), arch.build_discriminator()


def _latents(arch: Architecture, n: int, seed: int = SEED):
    return arch.sample_latents(n, torch.Generator().manual_seed(seed))


@_check("architectures", covers=("resolution", "z_dim", "build_generator",
                                 "build_discriminator", "sample_latents"))
def check_architecture_shapes_and_range(case: Case) -> None:
    """G(z, y) gives ``[n, 3, R, R]`` in [-1, 1] (R = ``resolution``) from ``[n, z_dim]``
    latents; D(x, y) gives finite logits ``[n]``; in train and eval mode."""
    arch, G, D = _built(case)
    R = arch.resolution
    if not isinstance(R, int) or R < 1:
        _fail(case, f"resolution must be a positive int, got {R!r}")
    z, y = _latents(arch, 3)
    if z.shape != (3, arch.z_dim):
        _fail(case, f"sample_latents(3) gave z of shape {tuple(z.shape)}, expected (3, {arch.z_dim})")
    for mode in ("train", "eval"):
        G.train(mode == "train"), D.train(mode == "train")
        with torch.no_grad():
            images = G(z, y)
            logits = D(images, y)
        if images.shape != (3, 3, R, R) or images.dtype != torch.float32:
            _fail(case, f"{mode} mode: G gave {images.dtype} {tuple(images.shape)}, "
                        f"expected float32 (3, 3, {R}, {R})")
        if not torch.isfinite(images).all() or images.abs().max() > 1 + 1e-6:
            _fail(case, f"{mode} mode: G's images must be finite and in [-1, 1] "
                        f"(max |x| = {images.abs().max().item():.4g})")
        if logits.shape != (3,) or not torch.isfinite(logits).all():
            _fail(case, f"{mode} mode: D gave {tuple(logits.shape)} (expected (3,)) or "
                        f"non-finite logits")


@_check("architectures", covers=("num_classes", "conditional", "sample_latents"))
def check_architecture_conditional_labels(case: Case) -> None:
    """Conditional: labels ``[n]`` int64 in [0, num_classes) that change G's and D's outputs
    (once the weights are not at their label-blind initialization), and refusing no labels.
    Unconditional: ``y`` is None and both networks run without labels."""
    arch, G, D = _built(case)
    z, y = _latents(arch, 6)
    x = torch.rand(6, 3, arch.resolution, arch.resolution,
                   generator=torch.Generator().manual_seed(SEED)) * 2 - 1
    if arch.conditional != (arch.num_classes > 0):
        _fail(case, f"conditional = {arch.conditional} but num_classes = {arch.num_classes}")
    G.eval(), D.eval()
    if not arch.conditional:
        if y is not None:
            _fail(case, "an unconditional architecture's sample_latents must give y = None")
        with torch.no_grad():
            G(z), D(x)
        return
    if y is None or y.shape != (6,) or y.dtype != torch.int64 or \
            not bool(((y >= 0) & (y < arch.num_classes)).all()):
        _fail(case, f"sample_latents must give int64 labels [6] in [0, {arch.num_classes}), "
                    f"got {y!r:.100}")
    with torch.no_grad():  # randomize: some inits (conditional BN = 1, 0) ignore labels at first
        for p in [*G.parameters(), *D.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
        other = (y + 1) % arch.num_classes
        if torch.equal(G(z, y), G(z, other)):
            _fail(case, "G's images do not depend on the labels")
        if torch.equal(D(x, y), D(x, other)):
            _fail(case, "D's logits do not depend on the labels")
    for net, args in (("G", (z,)), ("D", (x,))):
        try:
            with torch.no_grad():
                (G if net == "G" else D)(*args)
        except Exception:  # noqa: BLE001 - any clear error is fine
            continue
        _fail(case, f"the conditional {net} ran without labels: it must raise instead of "
                    f"silently ignoring the condition")


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor


@_check("architectures", covers=("build_generator", "build_discriminator"))
def check_architecture_layers_reported(case: Case) -> None:
    """D (and G) expose their weight layers as Conv2d/Linear/Embedding modules with unique names
    (what regularizers, the dry-run plan and the spectral monitor count), and the forward pass
    reads each weight through ``torch.nn.utils.parametrize`` (identity on all: same output;
    one layer's weight halved: another output)."""
    from core.dry_run import describe_regularized

    arch, G, D = _built(case)
    z, y = _latents(arch, 3)
    x = torch.rand(3, 3, arch.resolution, arch.resolution,
                   generator=torch.Generator().manual_seed(SEED)) * 2 - 1
    for label, net, inputs in (("D", D, (x, y)), ("G", G, (z, y))):
        net.eval()
        layers = list(weight_layers(net))
        if label == "D" and not layers:
            _fail(case, "D has no Conv2d/Linear/Embedding layer a regularizer could act on")
        with torch.no_grad():
            reference = net(*inputs)
        for _, layer in layers:
            parametrize.register_parametrization(layer, "weight", _Scale(1.0))
        report = describe_regularized(net)
        if layers and not report.startswith(f"{len(layers)} layers"):
            _fail(case, f"{label}: {len(layers)} weight layers, but the plan reports '{report}'")
        with torch.no_grad():
            if not torch.allclose(net(*inputs), reference, rtol=1e-5, atol=1e-6):
                _fail(case, f"{label}: an identity parametrization of every weight changed the "
                            f"output")
            ignored = []
            for name, layer in layers:
                layer.parametrizations.weight[0].factor = 0.5
                if torch.equal(net(*inputs), reference):
                    ignored.append(name)
                layer.parametrizations.weight[0].factor = 1.0
        if ignored:
            _fail(case, f"{label}: halving the parametrized weight of {', '.join(ignored)} did not "
                        f"change the output: the forward pass does not read it through the layer")


@_check("architectures", covers=("build_generator", "build_discriminator", "sample_latents"))
def check_architecture_gradients(case: Case) -> None:
    """Every parameter of G and D gets a finite gradient from ``D(G(z, y), y).mean()``."""
    arch, G, D = _built(case)
    z, y = _latents(arch, 4)
    D(G(z, y), y).mean().backward()
    bad = [f"{label}.{n}" for label, net in (("G", G), ("D", D))
           for n, p in net.named_parameters()
           if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    if bad:
        _fail(case, f"parameters without a finite gradient: {bad[:8]}")


@_check("architectures", covers=("build_generator", "build_discriminator"))
def check_architecture_deterministic_and_state_dict(case: Case) -> None:
    """The same seed builds identical networks; a network's ``state_dict`` loads strictly into
    one built from another seed and reproduces its eval-mode outputs."""
    _, G1, D1 = _built(case, SEED)
    arch, G2, D2 = _built(case, SEED)
    for label, a, b in (("G", G1, G2), ("D", D1, D2)):
        diff = _differences(_state(a), _state(b))
        if diff:
            _fail(case, f"{label} built twice with the same seed differs: {diff[:5]}")
    _, G3, D3 = _built(case, SEED + 1)
    z, y = _latents(arch, 3)
    for label, a, b in (("G", G1, G3), ("D", D1, D3)):
        b.load_state_dict(a.state_dict(), strict=True)
        a.eval(), b.eval()
    with torch.no_grad():
        images = G1(z, y)
        if not torch.equal(images, G3(z, y)) or not torch.equal(D1(images, y), D3(images, y)):
            _fail(case, "networks loaded from a state_dict give other eval-mode outputs")


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


@_check("losses", covers=("discriminator_loss", "generator_loss"))
def check_loss_sign_conventions(case: Case) -> None:
    """Logits are "realness": D's loss is lower when real logits are high and fake ones low,
    G's loss is lower when fake logits are high; both are finite scalars."""
    loss = case.create()
    high, low = torch.full((4,), 3.0), torch.full((4,), -3.0)
    good, bad = loss.discriminator_loss(high, low), loss.discriminator_loss(low, high)
    g_good, g_bad = loss.generator_loss(high), loss.generator_loss(low)
    for label, value in (("discriminator_loss", good), ("generator_loss", g_good)):
        if not isinstance(value, torch.Tensor) or value.ndim != 0 or not torch.isfinite(value):
            _fail(case, f"{label} must return a finite scalar tensor, got {value!r:.80}")
    if not good < bad:
        _fail(case, f"discriminator_loss(real=+3, fake=-3) = {good.item():.4g} is not below "
                    f"discriminator_loss(real=-3, fake=+3) = {bad.item():.4g}")
    if not g_good < g_bad:
        _fail(case, f"generator_loss(fake=+3) = {g_good.item():.4g} is not below "
                    f"generator_loss(fake=-3) = {g_bad.item():.4g}")


@_check("losses", covers=("discriminator_loss", "generator_loss"))
def check_loss_gradients(case: Case) -> None:
    """Gradients are finite and point the right way at logits near 0: raising a real logit never
    raises D's loss, raising a fake one never lowers it, raising a fake logit never raises G's
    loss; and each is nonzero there."""
    loss = case.create()
    rng = torch.Generator().manual_seed(SEED)
    real = (torch.rand(6, generator=rng) - 0.5).requires_grad_()
    fake = (torch.rand(6, generator=rng) - 0.5).requires_grad_()
    g_real, g_fake = torch.autograd.grad(loss.discriminator_loss(real, fake), [real, fake])
    fake_g = fake.detach().clone().requires_grad_()
    (g_gen,) = torch.autograd.grad(loss.generator_loss(fake_g), [fake_g])
    for label, g, sign in (("d(L_D)/d(real)", g_real, -1), ("d(L_D)/d(fake)", g_fake, 1),
                           ("d(L_G)/d(fake)", g_gen, -1)):
        if not torch.isfinite(g).all():
            _fail(case, f"{label} is not finite")
        if bool((g * sign < 0).any()) or not bool((g * sign > 0).any()):
            _fail(case, f"{label} must be {'<=' if sign < 0 else '>='} 0 and not all zero near "
                        f"logit 0, got {g.tolist()}")


@_check("losses", covers=("discriminator_loss", "generator_loss"))
def check_loss_is_a_batch_mean(case: Case) -> None:
    """Each loss is a mean over the batch: two halves' losses average to the whole batch's, so
    k accumulated micro-batches (each divided by k) equal one large batch."""
    loss = case.create()
    rng = torch.Generator().manual_seed(SEED)
    real, fake = torch.randn(8, generator=rng) * 2, torch.randn(8, generator=rng) * 2
    whole = loss.discriminator_loss(real, fake)
    halves = (loss.discriminator_loss(real[:4], fake[:4]) +
              loss.discriminator_loss(real[4:], fake[4:])) / 2
    g_whole = loss.generator_loss(fake)
    g_halves = (loss.generator_loss(fake[:4]) + loss.generator_loss(fake[4:])) / 2
    if not torch.allclose(whole, halves, rtol=1e-5, atol=1e-6) or \
            not torch.allclose(g_whole, g_halves, rtol=1e-5, atol=1e-6):
        _fail(case, f"the losses are not batch means: D {whole.item():.6g} vs halves "
                    f"{halves.item():.6g}; G {g_whole.item():.6g} vs halves {g_halves.item():.6g}")


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _metric_context(root: Path, seed: int = 0) -> EvaluationContext:
    from core.registry import get_registry

    torch.manual_seed(SEED)
    arch = small_architecture()
    G, D = arch.build_generator().eval(), arch.build_discriminator().eval()
    cls = get_registry().datasets["stacked_digits"]
    return EvaluationContext(generator=G, architecture=arch, dataset=cls(cls.Config(num_samples=64)),
                             data_root=root, device=torch.device("cpu"), seed=seed, iteration=0,
                             batch_size=32, discriminator=D, show_progress=False)


def _evaluations(case: Case, count: int) -> list[tuple[dict[str, Any], Any]]:
    """``count`` evaluations of fresh instances on the same context (seed), each as (record of
    :func:`core.eval.runner.evaluate`, the MetricResult ``compute`` returned); kept on the case,
    so that the metric checks together evaluate a metric twice."""
    from core.eval.runner import evaluate

    while len(case._evaluations) < count:
        metric = case.create()
        results = []
        compute = metric.compute

        def capture(context, compute=compute, results=results):
            results.append(compute(context))
            return results[-1]

        metric.compute = capture
        context = _metric_context(case.data_root())
        # another global random state each time: a score may depend on context.seed only
        torch.manual_seed(SEED + 1000 * (1 + len(case._evaluations)))
        try:
            (record,) = evaluate([metric], context)
        except SpecregError as exc:
            _fail(case, f"compute failed with a user-facing error (does the case need a "
                        f"Case(prepare=...) that provides files under the data root?): {exc}")
        case._evaluations.append((record, results[0]))
    return case._evaluations[:count]


@_check("metrics", covers=("compute", "primary", "higher_is_better"))
def check_metric_protocol_record(case: Case) -> None:
    """On a tiny generator and the stacked digits: float values (NaN for an undefined score, never
    infinite), a finite one under ``primary``, ``higher_is_better`` a bool, and a non-empty
    protocol that the evaluation record (JSON) carries."""
    metric = case.create()
    ((record, direct),) = _evaluations(case, 1)
    if not isinstance(direct, MetricResult) or not isinstance(direct.values, dict) \
            or not direct.values:
        _fail(case, f"compute must return a MetricResult with values, got {direct!r:.100}")
    if not isinstance(direct.protocol, dict) or not direct.protocol:
        _fail(case, "the MetricResult's protocol is empty: record what produced the numbers "
                    "(samples, reference data, network and its hash, ...)")
    values = record["values"]
    bad = {k: v for k, v in values.items() if not isinstance(k, str) or math.isinf(v)}
    if bad:
        _fail(case, f"infinite values or non-string keys: {bad}")
    primary = type(metric).primary
    if not primary or primary not in values:
        _fail(case, f"primary = {primary!r} is not one of the values {sorted(values)}")
    if not math.isfinite(values[primary]):
        _fail(case, f"the primary score {primary} = {values[primary]} is not finite")
    if not isinstance(type(metric).higher_is_better, bool):
        _fail(case, "higher_is_better must be a bool")
    try:
        json.dumps(record)
    except (TypeError, ValueError) as exc:
        _fail(case, f"the evaluation record is not JSON-ready: {exc}")


@_check("metrics", covers=("compute",))
def check_metric_deterministic(case: Case) -> None:
    """The same context seed gives the same values twice, whatever the global random state (a
    metric draws its randomness from ``context.seed``)."""
    (first, _), (second, _) = _evaluations(case, 2)
    first, second = first["values"], second["values"]

    def same(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)

    if first.keys() != second.keys() or not all(same(first[k], second[k]) for k in first):
        _fail(case, f"two evaluations with the same seed differ: {first} vs {second}")


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def _offline(case: Case) -> Dataset:
    """The case's dataset with downloading switched off (a Config field ``download``)."""
    plugin = case.create()
    if any(f.name == "download" for f in attrs.fields(type(plugin.config))):
        plugin = type(plugin)(attrs.evolve(plugin.config, download=False))
    return plugin


@_check("datasets", covers=("build",))
def check_dataset_missing_data_is_reported(case: Case) -> None:
    """Built on an empty data root (downloads off), a dataset either has its data built in or
    raises :class:`core.errors.DataMissingError` naming where it looked."""
    plugin = _offline(case)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "empty-root"
        root.mkdir()
        try:
            data = plugin.build(root, "train")
        except DataMissingError as exc:
            if not any(s in str(exc) for s in (str(root), str(root.resolve()))):
                _fail(case, f"DataMissingError does not name the data root {root}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001
            _fail(case, f"missing files must raise core.errors.DataMissingError (a one-screen "
                        f"message: which files, from where, to which folder), got "
                        f"{type(exc).__name__}: {exc}")
        if len(data) < 1:
            _fail(case, "built without files, but empty")


def _built_dataset(case: Case) -> tuple[Dataset, torch.utils.data.Dataset]:
    plugin = _offline(case)
    try:
        return plugin, plugin.build(case.data_root(), "train")
    except DataMissingError as exc:
        if case.prepare is None:
            raise _Skipped(f"{case}: needs files; give Case(prepare=...) writing a small sample "
                           f"under the data root ({str(exc).splitlines()[0]})") from None
        _fail(case, f"the files written by prepare() were not found: {exc}")


@_check("datasets", covers=("build", "resolution", "num_classes"))
def check_dataset_items(case: Case) -> None:
    """Items are ``(float32 [3, R, R] in [-1, 1], int label)`` with R = ``resolution`` and labels
    in [0, num_classes) when conditional; batches collate to ``[b, 3, R, R]`` and int64 ``[b]``."""
    plugin, data = _built_dataset(case)
    R, C = plugin.resolution, plugin.num_classes
    n = len(data)
    if n < 1:
        _fail(case, "the dataset is empty")
    for index in sorted({0, n // 2, n - 1}):
        image, label = data[index]
        if not isinstance(image, torch.Tensor) or image.dtype != torch.float32 or \
                image.shape != (3, R, R):
            _fail(case, f"item {index}: image must be float32 [3, {R}, {R}], got "
                        f"{getattr(image, 'dtype', type(image))} {tuple(getattr(image, 'shape', ()))}")
        if not torch.isfinite(image).all() or image.min() < -1 or image.max() > 1:
            _fail(case, f"item {index}: pixels must be in [-1, 1], got "
                        f"[{image.min().item():.4g}, {image.max().item():.4g}]")
        if isinstance(label, torch.Tensor):
            label = label.item() if label.ndim == 0 and not label.is_floating_point() else label
        if not isinstance(label, int) or isinstance(label, bool):
            _fail(case, f"item {index}: label must be an int, got {label!r:.60}")
        if C and not 0 <= label < C:
            _fail(case, f"item {index}: label {label} outside [0, num_classes = {C})")
    images, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=min(4, n))))
    if images.shape != (min(4, n), 3, R, R) or labels.dtype != torch.int64:
        _fail(case, f"a batch collates to {tuple(images.shape)} / labels {labels.dtype}, expected "
                    f"({min(4, n)}, 3, {R}, {R}) / int64")


@_check("datasets", covers=("build",))
def check_dataset_deterministic(case: Case) -> None:
    """Item ``i`` is the same every time it is read and in every build (resuming a run replays
    the same data position)."""
    _, first = _built_dataset(case)
    _, second = _built_dataset(case)
    n = len(first)
    if len(second) != n:
        _fail(case, f"two builds have {n} and {len(second)} items")
    for index in sorted({0, n - 1}):
        a, b, c = first[index], first[index], second[index]
        if not (torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and
                int(a[1]) == int(b[1]) == int(c[1])):
            _fail(case, f"item {index} differs between reads or builds")


def write_prepared_sample(plugin: Dataset, root: Path, count: int = 8, split: str = "train",
                          seed: int = 0) -> None:
    """For datasets built on :class:`plugins.datasets.base.ImageDataset`: write ``count`` random
    images as the prepared array ``build`` reads (with the plugin's own protocol), so the checks
    run without the real files: ``Case(plugin, prepare=lambda root: write_prepared_sample(plugin,
    root))``."""
    import numpy as np

    from plugins.datasets.prepared import write_prepared

    R = plugin.resolution
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, R, R, 3), dtype=np.uint8)
    labels = rng.integers(0, max(1, plugin.num_classes), count)
    source = [(images[i], int(labels[i])) for i in range(count)]
    protocol = dict(plugin.protocol(split))
    if plugin.num_classes:
        protocol["classes"] = [f"class{i}" for i in range(plugin.num_classes)]
    write_prepared(source, plugin.prepared_files(root, split), protocol, R, workers=0,
                   progress=False)

