"""Typed TOML recipes: attrs sections, plugin tables dispatched by ``name``, strict cattrs errors.

A recipe is a TOML file. ``extends = "base.toml"`` (relative to the file) inherits a base recipe;
tables merge key by key, except that a plugin table whose ``name`` changes is replaced whole.
``--set section.key=value`` overrides (the value is read as a TOML value, else as a string).
Every problem is reported at once, one line each, with the file the key came from::

    zoo/x.toml: unknown key 'fracton' (did you mean 'fraction'?) at discriminator.regularizer

    recipe = load_recipe("zoo/quickstart.toml", overrides=["train.iterations=10"])

Training callbacks are tables keyed by their plugin name, ``[callbacks.spectral] every = 500``
(``--set callbacks.spectral.every=100``); a callback whose class is ``default_enabled`` (the
spectral monitor) is added with its default Config when a recipe does not list it.

Tables that moved keep working: :data:`MOVED_TABLES` maps an old top-level table to where it lives
now, and every file (and every ``--set`` key) is read through it before anything else, so an old
run folder's ``recipe.toml`` with a ``[spectral]`` table loads as ``[callbacks.spectral]``.
"""

from __future__ import annotations

import difflib
import sys
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs
import cattrs
from cattrs.errors import (ClassValidationError, ForbiddenExtraKeysError, IterableValidationError,
                           IterableValidationNote)

from core.errors import SpecregError
from core.registry import UnknownPluginError, get_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RecipeError(SpecregError):
    """A recipe (or an override) is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


@attrs.define
class PluginSpec:
    """A recipe table that selects a plugin by ``name``; its other keys are the plugin's Config."""

    kind: ClassVar[str] = ""
    name: str
    config: Any = None

    def create(self):
        """An instance of the selected plugin, holding the structured Config."""
        return get_registry().create(self.kind, self.name, self.config)


class RegularizerSpec(PluginSpec):
    kind = "regularizers"


class ArchitectureSpec(PluginSpec):
    kind = "architectures"


class LossSpec(PluginSpec):
    kind = "losses"


class MetricSpec(PluginSpec):
    kind = "metrics"


class DatasetSpec(PluginSpec):
    kind = "datasets"


class CallbackSpec(PluginSpec):
    """A ``[callbacks.NAME]`` table: ``name`` is the table's key, its keys the callback's Config."""

    kind = "callbacks"


#: the ``callbacks`` section: plugin name -> its spec, in the recipe's order.
Callbacks = dict[str, CallbackSpec]


def with_default_callbacks(callbacks: Callbacks) -> Callbacks:
    """``callbacks`` plus every registered callback that is ``default_enabled`` and not listed
    (with its default Config), after the listed ones in registry order."""
    out = dict(callbacks)
    kind = get_registry().kinds[CallbackSpec.kind]
    for name, cls in kind.items():
        if getattr(cls, "default_enabled", False) and name not in out:
            out[name] = CallbackSpec(name=name, config=cls.Config())
    return out


@attrs.define
class NetworkSection:
    #: the regularizer applied to this network's layers (none when omitted).
    regularizer: RegularizerSpec | None = None


@attrs.define
class TrainSection:
    #: generator iterations (each = ``n_critic`` discriminator steps + one generator step).
    iterations: int = 50_000
    #: global discriminator batch (real images) per D step: the paper's batch.
    batch_size: int = 64
    #: cap on the per-process micro-batch; the rest is gradient accumulation (0 = no cap).
    micro_batch_size: int = 0
    #: discriminator steps per generator step.
    n_critic: int = 5
    #: the generator's batch is this many times the discriminator's.
    g_batch_multiplier: int = 2
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.9)
    #: "linear": both learning rates decay linearly to 0 at ``iterations``.
    lr_decay: Literal["none", "linear"] = "linear"
    #: Accelerate's mixed precision.
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: data-loading worker processes per training process.
    num_workers: int = 0
    #: run on the CPU even where a GPU is present (needed for gloo DDP on a CPU machine).
    cpu: bool = False


@attrs.define
class CheckpointSection:
    #: save every this many iterations (and always at the end); 0 = only at the end.
    every: int = 5_000
    #: keep the newest this many periodic checkpoints (the best one is kept apart).
    keep: int = 3


#: "jsonl" (ours) and the experiment trackers of Accelerate (``accelerate.tracking``).
TrackerName = Literal["jsonl", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml",
                      "dvclive", "swanlab", "trackio"]


@attrs.define
class LogSection:
    #: write losses to the metrics log and TensorBoard every this many iterations.
    every: int = 100
    #: save a PNG grid of samples from fixed noise every this many iterations (0 = only at the end).
    sample_every: int = 1_000
    #: images in the sample grid.
    grid_size: int = 64
    #: show a progress bar on the main process.
    progress: bool = True
    #: where metrics go (core/tracking.py): "jsonl" (RUN/metrics.jsonl) and Accelerate's trackers.
    trackers: list[TrackerName] = attrs.Factory(lambda: ["jsonl", "tensorboard"])


@attrs.define
class EvalSection:
    #: evaluate every this many iterations (0 = only at the end; no metrics = never).
    every: int = 5_000
    #: ``[[eval.metrics]]`` tables: each picks a metric by ``name``; its own keys (e.g.
    #: ``num_samples``) go to that metric's Config.
    metrics: list[MetricSpec] = attrs.Factory(list)
    #: generator batch size while sampling for metrics.
    batch_size: int = 100
    #: the metric value "best" checkpoints are chosen by, as ``metric.key`` (e.g. "modes.modes").
    best: str = ""
    #: whether a larger ``best`` value is better; "auto" follows the metric's own direction.
    best_mode: Literal["auto", "max", "min"] = "auto"


@attrs.define
class RunSection:
    #: folder under which run folders are created.
    output_dir: str = "runs"
    #: the run folder's name (default: the recipe's file name and a timestamp).
    name: str = ""


@attrs.define
class Recipe:
    """A whole training recipe. Each plugin table owns its Config (STYLE.md: baybe dispatch)."""

    dataset: DatasetSpec
    architecture: ArchitectureSpec
    loss: LossSpec = attrs.Factory(lambda: converter.structure({"name": "hinge"}, LossSpec))
    discriminator: NetworkSection = attrs.Factory(NetworkSection)
    generator: NetworkSection = attrs.Factory(NetworkSection)
    train: TrainSection = attrs.Factory(TrainSection)
    checkpoint: CheckpointSection = attrs.Factory(CheckpointSection)
    log: LogSection = attrs.Factory(LogSection)
    eval: EvalSection = attrs.Factory(EvalSection)
    run: RunSection = attrs.Factory(RunSection)
    #: ``[callbacks.NAME]`` tables: training callbacks by plugin name, each table its Config
    #: (the built-in ``spectral`` monitor is there by default).
    callbacks: Callbacks = attrs.Factory(lambda: with_default_callbacks({}))
    seed: int = 0
    #: the data root: downloaded and prepared datasets live below it.
    data_root: str = "datasets"
    #: a description shown in listings.
    description: str = ""


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------


class _PluginNameError(Exception):
    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class _TypeMismatch(TypeError):
    def __init__(self, expected: str, value: Any) -> None:
        self.expected, self.value = expected, value
        super().__init__(f"expected {expected}, got {_show(value)}")


def _show(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) < 40 else text[:37] + '...'}"


def _strict(expected: str, ok):
    def structure(value, _type):
        if not ok(value):
            raise _TypeMismatch(expected, value)
        return value
    return structure


def make_converter() -> cattrs.Converter:
    """A cattrs converter that forbids unknown keys, checks primitive types strictly and
    dispatches plugin tables through the registry."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(bool, _strict("a boolean", lambda v: isinstance(v, bool)))
    conv.register_structure_hook(
        int, _strict("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)))
    conv.register_structure_hook(
        str, _strict("a string", lambda v: isinstance(v, str)))

    def structure_float(value, _type):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _TypeMismatch("a number", value)
        return float(value)

    conv.register_structure_hook(float, structure_float)

    def structure_spec(data: Any, cls: type[PluginSpec]) -> PluginSpec:
        if not isinstance(data, dict):
            raise _TypeMismatch("a table with a 'name' key", data)
        if "name" not in data:
            raise _PluginNameError("missing key 'name' (which plugin)" +
                                   f"; installed: {', '.join(sorted(get_registry().kinds[cls.kind]))}")
        name = data["name"]
        if not isinstance(name, str):
            raise _TypeMismatch("a plugin name (string)", name)
        try:
            plugin = get_registry().kinds[cls.kind][name]
        except UnknownPluginError as exc:
            raise _PluginNameError(str(exc)) from None
        rest = {k: v for k, v in data.items() if k != "name"}
        return cls(name=name, config=conv.structure(rest, plugin.Config))

    conv.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, PluginSpec), structure_spec)

    def unstructure_spec(spec: PluginSpec) -> dict:
        return {"name": spec.name, **(conv.unstructure(spec.config) or {})}

    conv.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, PluginSpec), unstructure_spec)

    def structure_callbacks(data: Any, _type) -> Callbacks:
        if not isinstance(data, dict):
            raise _TypeMismatch("a table of [callbacks.NAME] tables", data)
        kind = get_registry().kinds[CallbackSpec.kind]
        specs, problems = {}, []
        for name, table in data.items():
            try:
                if not isinstance(table, dict):
                    raise _TypeMismatch(f"a table (the settings of callback '{name}')", table)
                try:
                    plugin = kind[name]
                except UnknownPluginError as exc:
                    raise _PluginNameError(str(exc)) from None
                specs[name] = CallbackSpec(name=name, config=conv.structure(table, plugin.Config))
            except Exception as exc:  # noqa: BLE001 - collected, one line each
                exc.__notes__ = [*getattr(exc, "__notes__", []), IterableValidationNote(
                    f"Structuring callback @ key {name!r}", name, getattr(
                        kind._classes.get(name), "Config", None))]
                problems.append(exc)
        if problems:
            raise IterableValidationError("while structuring callbacks", problems, Callbacks)
        return with_default_callbacks(specs)

    conv.register_structure_hook_func(lambda t: t == Callbacks, structure_callbacks)
    conv.register_unstructure_hook_func(
        lambda t: t == Callbacks,
        lambda specs: {name: conv.unstructure(spec.config) or {} for name, spec in specs.items()})
    return conv


converter = make_converter()


# ---------------------------------------------------------------------------------------------
# Loading: extends, overrides, provenance
# ---------------------------------------------------------------------------------------------

Origins = dict[tuple[str, ...], str]

#: top-level tables that moved: old key -> where the table lives now. Each recipe file and each
#: ``--set`` key is read through it, so old recipes (an old run folder's ``recipe.toml``) load.
MOVED_TABLES: dict[str, tuple[str, ...]] = {
    # the spectral monitor became the built-in callback ``spectral`` (a plugin, not a section)
    "spectral": ("callbacks", "spectral"),
}


def _move_tables(data: dict, shown: str) -> dict:
    """``data`` with each old table of :data:`MOVED_TABLES` moved to its new place."""
    for old, new in MOVED_TABLES.items():
        if old not in data:
            continue
        node = data
        for key in new[:-1]:
            child = node.get(key, {})
            if not isinstance(child, dict):
                raise RecipeError([f"{shown}: [{old}] moved to [{'.'.join(new)}], but "
                                   f"{key} is not a table"])
            node[key] = node = dict(child)  # a copy: the caller's table stays as it was
        if new[-1] in node:
            raise RecipeError([f"{shown}: both [{old}] and [{'.'.join(new)}]: [{old}] is the "
                               f"old name of [{'.'.join(new)}]; keep one"])
        node[new[-1]] = data.pop(old)
    return data


def _moved_key(key_path: tuple[str, ...]) -> tuple[str, ...]:
    """An override's key path through :data:`MOVED_TABLES` (``spectral.every`` ->
    ``callbacks.spectral.every``)."""
    new = MOVED_TABLES.get(key_path[0]) if key_path else None
    return (*new, *key_path[1:]) if new is not None else key_path


def _read_toml(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    """Read a recipe and its ``extends`` chain: (merged table, origin file of every leaf key)."""
    path = path.resolve() if path.is_absolute() else path
    shown = str(path)
    if not path.is_file():
        raise RecipeError([f"{shown}: recipe file not found"])
    if path.resolve() in [p.resolve() for p in chain]:
        raise RecipeError([f"{shown}: 'extends' forms a cycle: " +
                           " -> ".join(str(p) for p in (*chain, path))])
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"{shown}: not valid TOML: {exc}"]) from None
    data = _move_tables(data, shown)
    base_name = data.pop("extends", None)
    own = _origins(data, shown)
    if base_name is None:
        return data, own
    if not isinstance(base_name, str):
        raise RecipeError([f"{shown}: 'extends' must be a file name (string), got {_show(base_name)}"])
    base_path = path.parent / base_name
    if not base_path.is_file():
        raise RecipeError([f"{shown}: extends '{base_name}', which does not exist "
                           f"(looked for {base_path})"])
    base, origins = _read_toml(base_path, (*chain, path))
    for key_path, value in _leaves(data):
        _assign(base, origins, key_path, value, shown)
    return base, origins


def _origins(data: dict, origin: str, prefix: tuple[str, ...] = ()) -> Origins:
    return {p: origin for p, _ in _leaves(data, prefix)}


def _leaves(data: dict, prefix: tuple[str, ...] = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _assign(table: dict, origins: Origins, key_path: tuple[str, ...], value: Any, origin: str) -> None:
    """Set ``table[key_path] = value``; a changed plugin ``name`` drops the table's other keys."""
    node: Any = table
    for i, key in enumerate(key_path[:-1]):
        if isinstance(node, list):  # an array of tables: eval.metrics.0.num_samples
            if not (key.isdigit() and int(key) < len(node)):
                raise RecipeError([f"{origin}: no element {key} in "
                                   f"{'.'.join(key_path[:i])} (it has {len(node)})"])
            node = node[int(key)]
            continue
        child = node.get(key)
        if not isinstance(child, (dict, list)):
            child = node[key] = {}
        node = child
    leaf = key_path[-1]
    if isinstance(node, list):
        raise RecipeError([f"{origin}: cannot set {'.'.join(key_path)}: "
                           f"{'.'.join(key_path[:-1])} is an array"])
    if leaf == "name" and node.get("name") not in (None, value):
        for k in [k for k in node if k != "name"]:
            del node[k]
        prefix = key_path[:-1]
        for p in [p for p in origins if p[: len(prefix)] == prefix]:
            del origins[p]
    node[leaf] = value
    origins[key_path] = origin


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"train.lr_d=1e-4"`` -> ``(("train", "lr_d"), 0.0001)``; values are read as TOML."""
    if "=" not in text:
        raise RecipeError([f"--set {text}: expected section.key=value"])
    key, raw = text.split("=", 1)
    key_path = tuple(k.strip() for k in key.strip().split("."))
    if not all(key_path):
        raise RecipeError([f"--set {text}: empty key in '{key}'"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key_path, value


def resolve_table(path: str | Path, overrides: list[str] = ()) -> tuple[dict, Origins]:
    """The recipe as a plain table after ``extends`` and ``--set`` overrides, with origins."""
    table, origins = _read_toml(Path(path))
    for text in overrides:
        key_path, value = parse_override(text)
        _assign(table, origins, _moved_key(key_path), value, f"--set {text}")
    return table, origins


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, merge, override and structure a recipe; raise :class:`RecipeError` listing every
    problem."""
    table, origins = resolve_table(path, overrides)
    return structure_recipe(table, origins, default_origin=str(path))


def structure_recipe(table: dict, origins: Origins | None = None,
                     default_origin: str = "recipe") -> Recipe:
    origins = origins or {}
    table = _move_tables(dict(table), default_origin)
    try:
        return converter.structure(table, Recipe)
    except Exception as exc:  # noqa: BLE001 - every structuring problem becomes a line
        problems = list(_describe(exc, (), Recipe, origins, default_origin))
        if not problems:
            raise
        raise RecipeError(problems) from None


def recipe_to_table(recipe: Recipe) -> dict:
    """The fully resolved recipe as a TOML-ready table (written into every run folder)."""
    return _drop_none(converter.unstructure(recipe))


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------------------------


def _origin_of(path: tuple[str, ...], origins: Origins, default: str) -> str:
    best, best_len = None, -1
    for key_path, origin in origins.items():
        n = len(path)
        if key_path[:n] == path and best_len < n:  # a leaf under this path
            best, best_len = origin, n
        elif path[: len(key_path)] == key_path and len(key_path) > best_len:
            best, best_len = origin, len(key_path)
    return best or default


def _field_names(cls: Any) -> list[str]:
    if isinstance(cls, type) and attrs.has(cls):
        names = [f.name for f in attrs.fields(cls)]
        return names
    return []


def _describe(exc: BaseException, path: tuple[str, ...], cls: Any, origins: Origins,
              default: str):
    where = ".".join(path) or "top level"
    origin = _origin_of(path, origins, default)
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if hasattr(note, "name"):
                sub_cls = getattr(note, "type", None)
                yield from _describe(sub, (*path, note.name), sub_cls, origins, default)
            else:
                yield from _describe(sub, (*path, str(getattr(note, "index", "?"))),
                                     getattr(note, "type", None), origins, default)
        for sub in without:
            yield from _describe(sub, path, getattr(exc, "cl", cls), origins, default)
    elif isinstance(exc, ForbiddenExtraKeysError):
        fields = _field_names(exc.cl)
        for key in sorted(exc.extra_fields):
            valid = [f for f in fields if f != "config"]
            if _is_spec_config(exc.cl) and path[:1] != ("callbacks",):  # keyed by name there
                valid = ["name", *valid]
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else \
                f" (valid keys: {', '.join(valid) or 'none'})"
            key_origin = _origin_of((*path, key), origins, default)
            yield f"{key_origin}: unknown key '{key}'{hint} at {where}"
    elif isinstance(exc, _PluginNameError):
        yield f"{origin}: {exc.message} at {where}"
    elif isinstance(exc, _TypeMismatch):
        yield f"{origin}: wrong type at {where}: {exc}"
    elif isinstance(exc, KeyError) and path:
        # cattrs reports a missing required attribute as a KeyError on that attribute
        yield f"{origin}: missing required key '{path[-1]}' at {'.'.join(path[:-1]) or 'top level'}"
    elif isinstance(exc, (ValueError, TypeError, cattrs.errors.CattrsError)):
        literal = _literal_choices(cls)
        if literal is not None:
            yield f"{origin}: invalid value at {where}: must be one of " + \
                  ", ".join(repr(c) for c in literal)
        else:
            yield f"{origin}: invalid value at {where}: {exc}"
    else:
        yield f"{origin}: {type(exc).__name__} at {where}: {exc}"


def _is_spec_config(cls: Any) -> bool:
    return isinstance(cls, type) and cls.__name__ == "Config"


def _literal_choices(cls: Any) -> tuple | None:
    if typing.get_origin(cls) is Literal:
        return typing.get_args(cls)
    return None
