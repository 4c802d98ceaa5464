"""The checks every plugin gets, whatever its kind: its Config and its docstring."""

from __future__ import annotations

import attrs

from core.testing.kit import Case, conformance_check, config_table, fail, registered


def spec_class(kind: str) -> type:
    """The recipe table class (:class:`core.recipe.PluginSpec` subclass) selecting a ``kind``."""
    from core.recipe import PluginSpec

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    found = [c for c in subclasses(PluginSpec) if c.kind == kind]
    if not found:
        raise TypeError(f"core.recipe has no PluginSpec subclass with kind {kind!r}")
    return found[0]


@conformance_check("all", covers=("Config", "name"))
def check_config_round_trip(case: Case) -> None:
    """The default Config is constructible; the Config round-trips through the recipe converter
    (a plugin table with ``name``) and TOML, and the recipe builds the same plugin."""
    import tomllib

    import tomli_w

    from core.recipe import converter

    cls = case.cls
    if not attrs.has(cls.Config):
        fail(case, "Config must be an attrs class (@attrs.define)")
    try:
        default = cls.Config()
    except Exception as exc:  # noqa: BLE001
        fail(case, f"Config() is not default-constructible: {type(exc).__name__}: {exc}")
    plugin = case.create()
    if not isinstance(plugin.config, cls.Config):
        fail(case, f"instance.config is {type(plugin.config).__name__}, not {cls.__name__}.Config")
    for config in (default, plugin.config):
        table = config_table(config)
        try:
            text = tomli_w.dumps(table)
        except Exception as exc:  # noqa: BLE001
            fail(case, f"Config {table} cannot be written as TOML: {exc}")
        back = converter.structure(tomllib.loads(text), cls.Config)
        if back != config:
            fail(case, f"Config does not round-trip through TOML and the recipe converter: "
                       f"{config!r} -> {text!r} -> {back!r}")
        with registered(cls) as name:
            spec = converter.structure({"name": name, **table}, spec_class(case.kind))
            if spec.config != config or type(spec.create()) is not cls:
                fail(case, f"the recipe table {{name = {name!r}, ...}} does not build the same "
                           f"plugin: {spec.config!r}")


@conformance_check("all")
def check_documented(case: Case) -> None:
    """The class has its own docstring (shown in listings; say what it implements, citing the
    paper and equation)."""
    doc = vars(case.cls).get("__doc__")
    if not doc or not doc.strip():
        fail(case, f"{case.cls.__name__} has no docstring of its own")
