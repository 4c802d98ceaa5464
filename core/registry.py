"""The plugin registry: built-ins and third-party packages, through the same pluggy hooks.

Loading order (STYLE.md): every module of the built-in package (:data:`BUILTIN_PACKAGE`,
``plugins``) is imported by its dotted path and registered, then each entry point of group
``specreg`` is loaded on its own. Nothing in ``core`` imports ``plugins`` otherwise: the
built-ins are reached through this registry only, at run time. A broken entry point
prints a warning naming its distribution and the error, and the others keep working;
``SPECREG_STRICT_PLUGINS=1`` makes it an error. Two plugins registering one name is an error
naming both providers.

Registering never touches a plugin class: the name lives on the instance.
:meth:`Registry.create` sets ``plugin.name`` to the name asked for (one class registered under
two names gives instances reporting each), and :meth:`Registry.name_of` answers which name a
class was registered under.

    from core.registry import get_registry
    reg = get_registry()
    Sn = reg.regularizers["sn"]
    sn = reg.create("regularizers", "sn")         # sn.name == "sn"
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import inspect
import os
import pkgutil
import sys
from types import ModuleType
from typing import Any, Iterator, Mapping

import attrs
import pluggy

from core import hookspecs
from core.errors import SpecregError
from core.interfaces import PLUGIN_KINDS, REGISTERED_NAMES, Plugin

ENTRY_POINT_GROUP = hookspecs.PROJECT
STRICT_ENV = "SPECREG_STRICT_PLUGINS"
#: the package whose modules are the built-in plugins, imported by name (never by an import
#: statement in core: core does not depend on plugins).
BUILTIN_PACKAGE = "plugins"


class PluginError(SpecregError):
    """A plugin could not be loaded or registered, or a name is not registered."""


class DuplicatePluginError(PluginError):
    """Two providers registered the same name for one kind."""


class UnknownPluginError(PluginError, KeyError):
    """A name that no plugin registered; the message lists what is installed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@attrs.define
class Provider:
    """Where a plugin came from: a built-in module or an installed distribution."""

    name: str  # module path of a built-in, or the entry point's name
    distribution: str = "specreg (built-in)"
    version: str = ""
    registered: dict[str, list[str]] = attrs.field(factory=dict)  # kind -> names
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.distribution} ({self.name})"


SINGULAR = {"regularizers": "regularizer", "architectures": "architecture", "losses": "loss",
            "metrics": "metric", "datasets": "dataset", "callbacks": "callback"}


class Kind(Mapping[str, type]):
    """Name -> plugin class for one kind; a missing name raises a helpful error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}
        self.providers: dict[str, Provider] = {}

    def __getitem__(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownPluginError(self.unknown_message(name)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def unknown_message(self, name: str) -> str:
        singular = SINGULAR[self.kind]
        installed = ", ".join(sorted(self._classes)) or "none"
        msg = f"unknown {singular} '{name}'"
        close = difflib.get_close_matches(name, list(self._classes), n=1)
        if close:
            msg += f" (did you mean '{close[0]}'?)"
        return msg + f"; installed: {installed}"


class Registry:
    """Mappings ``.regularizers``, ``.architectures``, ``.losses``, ``.metrics``, ``.datasets``."""

    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {kind: Kind(kind) for kind in PLUGIN_KINDS}
        self.providers: list[Provider] = []
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)

    def __getattr__(self, kind: str) -> Kind:
        kinds = self.__dict__.get("kinds", {})
        if kind in kinds:
            return kinds[kind]
        raise AttributeError(kind)

    # -- registration --------------------------------------------------------------------------

    def _register_callback(self, kind: str, provider: Provider):
        base = PLUGIN_KINDS[kind]
        table = self.kinds[kind]

        def register(name: str, cls: type) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(f"{provider.label} registered {SINGULAR[kind]} '{name}' as {cls!r}, "
                                  f"which is not a subclass of {base.__module__}.{base.__name__}")
            if name in table._classes:
                other = table.providers[name]
                raise DuplicatePluginError(f"duplicate {SINGULAR[kind]} name '{name}': registered by "
                                  f"{other.label} and by {provider.label}")
            table._classes[name] = cls
            REGISTERED_NAMES.setdefault(cls, name)  # a directly made instance's name
            table.providers[name] = provider
            provider.registered.setdefault(kind, []).append(name)

        return register

    def add(self, plugin: Any, provider: Provider) -> None:
        """Register one plugin object (module or instance) and collect what it registers."""
        pm = self.plugin_manager
        pm.register(plugin, name=f"{provider.distribution}:{provider.name}")
        pm.check_pending()
        for kind in PLUGIN_KINDS:
            caller = getattr(pm.hook, f"register_{kind}")
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=self._register_callback(kind, provider))
        self.providers.append(provider)

    def remove(self, provider: Provider) -> None:
        """Unregister everything ``provider`` registered (tests register plugins temporarily)."""
        for kind, names in provider.registered.items():
            for n in names:
                cls = self.kinds[kind]._classes.pop(n, None)
                self.kinds[kind].providers.pop(n, None)
                if cls is not None and REGISTERED_NAMES.get(cls) == n:
                    del REGISTERED_NAMES[cls]
                    other = self.name_of(cls)
                    if other is not None:
                        REGISTERED_NAMES[cls] = other
        provider.registered = {}
        name = f"{provider.distribution}:{provider.name}"
        if self.plugin_manager.get_plugin(name) is not None:
            self.plugin_manager.unregister(name=name)
        if provider in self.providers:
            self.providers.remove(provider)

    def load_builtins(self) -> None:
        builtin_package = importlib.import_module(BUILTIN_PACKAGE)
        for info in sorted(pkgutil.walk_packages(builtin_package.__path__, f"{BUILTIN_PACKAGE}."),
                           key=lambda i: i.name):
            module = importlib.import_module(info.name)
            if _has_hookimpls(module):
                self.add(module, Provider(name=info.name, version=_own_version()))

    def load_entry_points(self, strict: bool | None = None) -> None:
        """Register every third-party plugin (entry points of ``ENTRY_POINT_GROUP``). One that
        fails to import, registers a name already taken (a built-in's or another package's) or
        calls ``sys.exit()`` at import is skipped with a warning naming its distribution: the
        built-ins and the other plugins keep working. With ``SPECREG_STRICT_PLUGINS=1`` (or
        ``strict=True``) each of these is a :class:`PluginError` instead."""
        strict = _strict() if strict is None else strict
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            version = ep.dist.version if ep.dist is not None else ""
            provider = Provider(name=ep.name, distribution=dist, version=version)
            try:
                self.add(ep.load(), provider)
            except (KeyboardInterrupt, GeneratorExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit at import included
                self.remove(provider)  # undo a partial registration
                if isinstance(exc, SystemExit):
                    provider.error = f"called sys.exit({exc.code!r}) while being imported"
                else:
                    provider.error = f"{type(exc).__name__}: {exc}"
                self.providers.append(provider)
                if strict and isinstance(exc, DuplicatePluginError):
                    raise
                if strict:
                    raise PluginError(f"plugin '{ep.name}' from {dist} {version} failed to load: "
                                      f"{provider.error}") from exc
                print(f"specreg: warning: plugin '{ep.name}' from {dist} {version} failed to load "
                      f"and is skipped: {provider.error} (set {STRICT_ENV}=1 to make this an "
                      f"error)", file=sys.stderr)

    # -- use -----------------------------------------------------------------------------------

    def create(self, kind: str, name: str, config: Any | None = None) -> Plugin:
        """An instance of the plugin registered as ``name``, its ``.name`` set to ``name``."""
        cls = self.kinds[kind][name]
        if _takes_name(cls):
            return cls(config, name=name)
        plugin = cls(config)  # an __init__ of the older signature (config only)
        plugin.name = name
        return plugin

    def name_of(self, cls: type, kind: str | None = None) -> str | None:
        """The first name ``cls`` itself (not a base of it) is registered under, or None."""
        for k in [kind] if kind is not None else list(self.kinds):
            for name, registered in self.kinds[k]._classes.items():
                if registered is cls:
                    return name
        return None


def _takes_name(cls: type) -> bool:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "name" or p.kind is p.VAR_KEYWORD for p in parameters)


def _has_hookimpls(module: ModuleType) -> bool:
    return any(hasattr(getattr(module, attr, None), f"{hookspecs.PROJECT}_impl")
               for attr in dir(module))


def _own_version() -> str:
    try:
        return metadata.version(hookspecs.PROJECT)
    except metadata.PackageNotFoundError:
        return ""


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes"}


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use (``refresh=True`` rebuilds it)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        registry = Registry()
        registry.load_builtins()
        registry.load_entry_points()
        _REGISTRY = registry
    return _REGISTRY
