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

import contextlib
import difflib
import os
import sys
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs
import cattrs
from cattrs.cols import list_structure_factory, mapping_structure_factory
from cattrs.errors import (AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError,
                           IterableValidationError, IterableValidationNote)

from core.errors import SpecregError
from core.registry import UnknownPluginError, get_registry
from core.validators import (ConfigValueError, file_name, fail, int_in, each, nonnegative_int,
                             non_empty, number_in, positive_int, positive_number)

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
class EMASection:
    """``[generator.ema]``: an exponential moving average of G's weights (Karras et al. 2022,
    EDM's ``ema_halflife_kimg``; Yazıcı et al. 2019), sampled and evaluated in G's place."""

    #: the EMA's decay per generator step (``ema = decay * ema + (1 - decay) * G``) ...
    decay: float | None = None
    #: ... or its half-life in generated images (EDM): decay = 0.5 ** (G's global batch /
    #: half_life_images). Exactly one of the two.
    half_life_images: float | None = None
    #: generator iteration from which the average runs; before it the EMA copies G.
    start: int = 0

    def decay_per_step(self, images_per_step: int) -> float:
        """The decay of one generator step that draws ``images_per_step`` images (all
        processes)."""
        if self.decay is not None:
            return self.decay
        return 0.5 ** (images_per_step / self.half_life_images)


@attrs.define
class NetworkSection:
    #: the regularizer applied to this network's layers (none when omitted): the one-item form
    #: of ``regularizers``.
    regularizer: RegularizerSpec | None = None
    #: ``[[discriminator.regularizers]]`` tables: several regularizers, applied in this order.
    regularizers: list[RegularizerSpec] | None = None
    #: ``[generator.ema]``: an EMA of the generator (generator only).
    ema: EMASection | None = None

    @property
    def regularizer_specs(self) -> list[RegularizerSpec]:
        """Every regularizer of the network, in the order they are applied."""
        if self.regularizer is not None:
            return [self.regularizer]
        return list(self.regularizers or [])


# ---------------------------------------------------------------------------------------------
# Checks that span keys (attrs validators like the per-key ones: core.validators)
# ---------------------------------------------------------------------------------------------


def training_processes() -> int:
    """The processes this command trains on: ``WORLD_SIZE`` (set by ``accelerate launch`` and
    ``torchrun``), 1 without it. The batch arithmetic is checked for that many."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _batch_divides(train: "TrainSection", attribute: attrs.Attribute, batch: Any) -> None:
    processes = training_processes()
    if isinstance(batch, int) and batch >= 1 and batch % processes:
        fail(train, attribute, f"must divide over the {processes} training processes "
             f"(WORLD_SIZE); use a multiple of {processes}, got {batch}")


def _micro_batch_divides(train: "TrainSection", attribute: attrs.Attribute, cap: Any) -> None:
    batch, processes = train.batch_size, training_processes()
    if not (isinstance(batch, int) and batch >= 1 and batch % processes == 0 and
            isinstance(cap, int) and cap > 0):
        return  # reported by the checks of each key
    per_process = batch // processes
    if cap < per_process and per_process % cap:
        caps = [d for d in range(1, cap + 1) if per_process % d == 0]
        fail(train, attribute, f"must divide the per-process batch {per_process} (= batch_size "
             f"{batch} / {processes} process(es)); valid caps: {', '.join(map(str, caps))} (or 0: "
             f"no cap), got {cap}", related=[("batch_size",)])


def metric_keys(name: str) -> tuple[str, ...]:
    """The scores metric ``name`` declares (its class's ``value_keys``; empty: not declared)."""
    try:
        cls = get_registry().kinds[MetricSpec.kind][name]
    except UnknownPluginError:
        return ()
    return tuple(getattr(cls, "value_keys", ()) or ())


def _best_is_a_score(section: "EvalSection", attribute: attrs.Attribute, best: Any) -> None:
    if not isinstance(best, str) or not best:
        return
    names = [spec.name for spec in section.metrics]
    metric, _, key = best.partition(".")
    if not names:
        fail(section, attribute, f"names a score, but eval.metrics is empty; got {best!r}",
             related=[("metrics",)])
    if not key:
        fail(section, attribute, f"must be 'metric.key' (e.g. 'modes.modes'), got {best!r}")
    if metric not in names:
        fail(section, attribute, f"names no metric of eval.metrics ({', '.join(names)}), got "
             f"{best!r}", related=[("metrics",)])
    keys = metric_keys(metric)
    if keys and key not in keys:
        fail(section, attribute, f"metric '{metric}' has no score '{key}' (its scores: "
             f"{', '.join(keys)}), got {best!r}")


def _builds(recipe: Any, attribute: attrs.Attribute, spec: Any) -> None:
    """The plugin of ``spec`` can be constructed: a :class:`SpecregError` (or ``ValueError``)
    its constructor raises is reported at its table, with the recipe file."""
    if spec is None:
        return
    try:
        spec.create()
    except ConfigValueError:
        raise
    except (SpecregError, ValueError) as exc:
        kind = {"losses": "loss"}.get(spec.kind, spec.kind[:-1])
        fail(recipe, attribute, f"{kind} '{spec.name}' cannot be built: {exc}")


def _takes_resolution(config: Any, resolution: int) -> bool:
    """Whether a dataset Config has a ``resolution`` key that accepts ``resolution``."""
    if not attrs.has(type(config)) or not hasattr(config, "resolution"):
        return False
    try:
        attrs.evolve(config, resolution=resolution)  # runs the key's validators
    except Exception:  # noqa: BLE001 - any refusal: the size is not offered
        return False
    return True


def _resolution_matches(recipe: Any, attribute: attrs.Attribute, architecture: Any) -> None:
    """The architecture makes images of the dataset's size (checked by ``--dry-run`` and the
    real run alike, before anything runs)."""
    try:
        arch, data = architecture.create(), recipe.dataset.create()
        a, d = int(arch.resolution), int(data.resolution)
    except Exception:  # noqa: BLE001 - a plugin that cannot be built is reported by _builds
        return
    if a == d:
        return
    arch_key = "resolution" if hasattr(architecture.config, "resolution") else "name"
    data_key = "resolution" if _takes_resolution(recipe.dataset.config, a) else "name"
    fail(recipe, attribute, f"architecture '{architecture.name}' makes {a}x{a} images but "
         f"dataset '{recipe.dataset.name}' is {d}x{d} (dataset.{data_key}); make them equal",
         subpath=(arch_key,), related=[("dataset", data_key)])


#: the largest recipe seed: the seeds derived from it (``seed * 7919 + 104729`` for latents,
#: ``seed * 1000003 + epoch`` for the data order, ``seed + 2**20`` for the sample grid, the
#: switch's) all stay far inside what ``torch.manual_seed`` takes (< 2**64).
MAX_SEED = 2**32 - 1


@attrs.define
class TrainSection:
    #: generator iterations (each = ``n_critic`` discriminator steps + one generator step).
    iterations: int = attrs.field(default=50_000, validator=positive_int)
    #: global discriminator batch (real images) per D step: the paper's batch.
    batch_size: int = attrs.field(default=64, validator=[positive_int, _batch_divides])
    #: cap on the per-process micro-batch; the rest is gradient accumulation (0 = no cap).
    micro_batch_size: int = attrs.field(default=0,
                                        validator=[nonnegative_int, _micro_batch_divides])
    #: discriminator steps per generator step.
    n_critic: int = attrs.field(default=5, validator=positive_int)
    #: the generator's batch is this many times the discriminator's.
    g_batch_multiplier: int = attrs.field(default=2, validator=positive_int)
    lr_g: float = attrs.field(default=2e-4, validator=positive_number)
    lr_d: float = attrs.field(default=2e-4, validator=positive_number)
    #: Adam's (beta1, beta2), each in [0, 1).
    betas: tuple[float, float] = attrs.field(default=(0.0, 0.9),
                                             validator=each(number_in(0, 1, high_open=True)))
    #: "linear": both learning rates decay linearly to 0 at ``iterations``.
    lr_decay: Literal["none", "linear"] = "linear"
    #: Accelerate's mixed precision.
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: data-loading worker processes per training process.
    num_workers: int = attrs.field(default=0, validator=nonnegative_int)
    #: run on the CPU even where a GPU is present (needed for gloo DDP on a CPU machine).
    cpu: bool = False
    #: how a D step passes reals and fakes through D: "joint" (one forward of both: one power
    #: iteration step per D step) or "separate" (D(real), then D(fake): two steps, as SN-GAN's
    #: and SR's Chainer updaters).
    d_forward: Literal["joint", "separate"] = "joint"
    #: whether D's forward in the G step advances D's regularizer state (power iteration):
    #: "update" (PyTorch/Chainer: every training-mode forward) or "frozen" (no step, as the
    #: TF code's ``update_collection`` of the G loss).
    d_state_in_g_step: Literal["update", "frozen"] = "update"
    #: compile G and D with ``torch.compile`` (in place, ``nn.Module.compile``: state dicts and
    #: checkpoints are the eager ones'); a graph that fails to compile runs eagerly, with a
    #: warning (torch._dynamo's ``suppress_errors``).
    compile: bool = False
    #: the ``torch.compile`` backend when ``compile`` is true ("inductor"; "aot_eager" traces
    #: without generating code, for checking a model compiles).
    compile_backend: str = attrs.field(default="inductor", validator=non_empty)
    #: G and D weights, and the reals, in the channels-last memory format (NHWC); measured
    #: 0.68x the iteration time of NCHW for the quickstart model on a 2-core CPU (README,
    #: Benchmarks).
    channels_last: bool = False


@attrs.define
class CheckpointSection:
    #: save every this many iterations (and always at the end); 0 = only at the end.
    every: int = attrs.field(default=5_000, validator=nonnegative_int)
    #: keep the newest this many periodic checkpoints (the best one is kept apart).
    keep: int = attrs.field(default=3, validator=positive_int)


#: "jsonl" (ours) and the experiment trackers of Accelerate (``accelerate.tracking``).
TrackerName = Literal["jsonl", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml",
                      "dvclive", "swanlab", "trackio"]


@attrs.define
class LogSection:
    #: write losses to the metrics log and TensorBoard every this many iterations.
    every: int = attrs.field(default=100, validator=positive_int)
    #: save a PNG grid of samples from fixed noise every this many iterations (0 = only at the end).
    sample_every: int = attrs.field(default=1_000, validator=nonnegative_int)
    #: images in the sample grid.
    grid_size: int = attrs.field(default=64, validator=positive_int)
    #: show a progress bar on the main process.
    progress: bool = True
    #: where metrics go (core/tracking.py): "jsonl" (RUN/metrics.jsonl) and Accelerate's trackers.
    trackers: list[TrackerName] = attrs.Factory(lambda: ["jsonl", "tensorboard"])


@attrs.define
class EvalSection:
    #: evaluate every this many iterations (0 = only at the end; no metrics = never).
    every: int = attrs.field(default=5_000, validator=nonnegative_int)
    #: ``[[eval.metrics]]`` tables: each picks a metric by ``name``; its own keys (e.g.
    #: ``num_samples``) go to that metric's Config.
    metrics: list[MetricSpec] = attrs.field(factory=list, validator=each(_builds))
    #: generator batch size while sampling for metrics.
    batch_size: int = attrs.field(default=100, validator=positive_int)
    #: the metric value "best" checkpoints are chosen by, as ``metric.key`` (e.g. "modes.modes").
    best: str = attrs.field(default="", validator=_best_is_a_score)
    #: whether a larger ``best`` value is better; "auto" follows the metric's own direction.
    best_mode: Literal["auto", "max", "min"] = "auto"


@attrs.define
class RunSection:
    #: folder under which run folders are created.
    output_dir: str = "runs"
    #: the run folder's name (default: the recipe's file name and a timestamp); a plain name:
    #: no path separator, no ``..``.
    name: str = attrs.field(default="", validator=file_name)


@attrs.define
class Recipe:
    """A whole training recipe. Each plugin table owns its Config (STYLE.md: baybe dispatch)."""

    dataset: DatasetSpec = attrs.field(validator=_builds)
    architecture: ArchitectureSpec = attrs.field(validator=[_builds, _resolution_matches])
    loss: LossSpec = attrs.field(factory=lambda: converter.structure({"name": "hinge"}, LossSpec),
                                 validator=_builds)
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
    #: every random stream of the run derives from it; 0 <= seed <= MAX_SEED.
    seed: int = attrs.field(default=0, validator=int_in(0, MAX_SEED, "the seeds derived from "
                                                        "it must fit torch.manual_seed"))
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


@contextlib.contextmanager
def _validators_off():
    """attrs validators off while cattrs builds an instance: :func:`_validated` then runs every
    one of them itself, so that all failures are collected (attrs stops at the first)."""
    before = attrs.validators.get_disabled()
    attrs.validators.set_disabled(True)
    try:
        yield
    finally:
        attrs.validators.set_disabled(before)


def _validation_problems(instance: Any, skip: frozenset[str] = frozenset()) -> list[Exception]:
    """The failures of the attrs validators of ``instance``'s fields (but ``skip``), each with
    the cattrs note of its attribute (so that the recipe errors name its key and file). A
    validator that reads a field ``instance`` lacks (a partial instance) is left out."""
    cls = type(instance)
    problems = []
    for field in attrs.fields(cls):
        if field.validator is None or field.name in skip or not hasattr(instance, field.name):
            continue
        try:
            field.validator(instance, field, getattr(instance, field.name))
        except AttributeError:  # it needs a field that did not structure: reported there
            continue
        except Exception as exc:  # noqa: BLE001 - collected, one line each
            exc.__notes__ = [*getattr(exc, "__notes__", []), AttributeValidationNote(
                f"Validating class {cls.__qualname__} @ attribute {field.name}", field.name,
                field.type)]
            problems.append(exc)
    return problems


def _validated(instance: Any) -> Any:
    """``instance`` after running every attrs validator of its class; the failures are raised
    together as one cattrs ``ClassValidationError``."""
    problems = _validation_problems(instance)
    if problems:
        cls = type(instance)
        raise ClassValidationError(f"While validating {cls.__qualname__}", problems, cls)
    return instance


def _partial(conv: cattrs.Converter, cls: type, data: dict, failed: set[str]) -> Any:
    """An instance of ``cls`` holding the fields of ``data`` that structure (and the defaults of
    absent ones), the others unset: the validators of the good fields still run when others
    fail, so that every problem of a recipe is reported at once (``seed`` beside a bad
    ``[train]``)."""
    instance = object.__new__(cls)
    for field in attrs.fields(cls):
        if field.name in failed:
            continue
        if field.name in data:
            try:
                with _validators_off():
                    value = conv.structure(data[field.name], field.type)
            except Exception:  # noqa: BLE001 - reported by the first pass
                continue
        elif isinstance(field.default, attrs.Factory) and not field.default.takes_self:
            value = field.default.factory()
        elif field.default is not attrs.NOTHING and not isinstance(field.default, attrs.Factory):
            value = field.default
        else:
            continue
        object.__setattr__(instance, field.name, value)
    return instance


def _is_sequence(t: Any) -> bool:
    return (typing.get_origin(t) or t) in (list, tuple)


def _is_mapping(t: Any) -> bool:
    return (typing.get_origin(t) or t) is dict


def make_converter() -> cattrs.Converter:
    """A cattrs converter that forbids unknown keys, checks primitive types strictly, runs every
    attrs validator of every table (:mod:`core.validators`), refuses a string or a number where an
    array or a table belongs, and dispatches plugin tables through the registry."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def structure_attrs_factory(cls: type):
        build = conv.gen_structure_attrs_fromdict(cls)

        def structure(data: Any, _type: Any) -> Any:
            if not isinstance(data, dict):
                raise _TypeMismatch("a table", data)
            try:
                with _validators_off():
                    instance = build(data, cls)
            except ClassValidationError as exc:  # and the checks of the fields that did build
                failed = {note.name for _, note in exc.group_exceptions()[0]
                          if hasattr(note, "name")}
                more = _validation_problems(_partial(conv, cls, data, failed), frozenset(failed))
                if not more:
                    raise
                raise ClassValidationError(exc.message, [*exc.exceptions, *more], cls) from None
            return _validated(instance)
        return structure

    conv.register_structure_hook_factory(attrs.has, structure_attrs_factory)

    def structure_sequence_factory(t: Any):
        origin, args = typing.get_origin(t) or t, typing.get_args(t)
        build_list = list_structure_factory(t, conv) if origin is list else None

        def structure(value: Any, _type: Any) -> Any:
            if not isinstance(value, (list, tuple)):
                raise _TypeMismatch("an array", value)  # a string is not a list of letters
            if build_list is not None:
                return build_list(value, _type)
            if len(args) == 2 and args[1] is Ellipsis:
                types = [args[0]] * len(value)
            else:
                types = list(args) if args else [Any] * len(value)
            if len(types) != len(value):
                raise _TypeMismatch(f"an array of {len(types)} values", value)
            out, problems = [], []
            for i, (item, item_type) in enumerate(zip(value, types)):
                try:
                    out.append(conv.structure(item, item_type))
                except Exception as exc:  # noqa: BLE001 - collected, one line each
                    exc.__notes__ = [*getattr(exc, "__notes__", []), IterableValidationNote(
                        f"Structuring {t!r} @ index {i}", i, item_type)]
                    problems.append(exc)
            if problems:
                raise IterableValidationError(f"While structuring {t!r}", problems, t)
            return tuple(out)
        return structure

    conv.register_structure_hook_factory(_is_sequence, structure_sequence_factory)

    def structure_mapping_factory(t: Any):
        build = mapping_structure_factory(t, conv)

        def structure(value: Any, _type: Any) -> Any:
            if not isinstance(value, dict):
                raise _TypeMismatch("a table", value)
            return build(value, _type)
        return structure

    conv.register_structure_hook_factory(_is_mapping, structure_mapping_factory)
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
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError([f"{shown}: cannot read the recipe: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError([f"{shown}: not valid UTF-8 (TOML files are UTF-8): byte "
                           f"0x{raw[exc.start]:02x} at line {line}, byte offset {exc.start}"]) \
            from None
    try:
        data = tomllib.loads(text)
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
    """Set ``table[key_path] = value``; a changed plugin ``name`` (a ``name`` inside a table, as
    ``[loss] name``) drops the table's other keys. A top-level ``name`` (a study's) is a plain
    value."""
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
            origins.pop(key_path[: i + 1], None)  # a value replaced by a table
        node = child
    leaf = key_path[-1]
    if isinstance(node, list):
        raise RecipeError([f"{origin}: cannot set {'.'.join(key_path)}: "
                           f"{'.'.join(key_path[:-1])} is an array"])
    if isinstance(node.get(leaf), (dict, list)):  # a whole table replaced (--set train=5): the
        for p in [p for p in origins if p[: len(key_path)] == key_path]:  # error is this one's
            del origins[p]
    if leaf == "name" and len(key_path) > 1 and node.get("name") not in (None, value):
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
    _check_network_tables(table, origins, default_origin)
    try:
        return converter.structure(table, Recipe)
    except Exception as exc:  # noqa: BLE001 - every structuring problem becomes a line
        problems = list(_describe(exc, (), Recipe, origins, default_origin))
        if not problems:
            raise
        raise RecipeError(problems) from None


def _check_network_tables(table: dict, origins: Origins, default: str) -> None:
    """The rules of ``[discriminator]`` / ``[generator]`` that span keys: not both
    ``regularizer`` and ``regularizers``; ``ema`` on the generator only; an EMA's ``decay`` or
    ``half_life_images``, exactly one."""
    problems = []
    for net in ("discriminator", "generator"):
        section = table.get(net)
        if not isinstance(section, dict):
            continue
        origin = _origin_of((net,), origins, default)
        if "regularizer" in section and "regularizers" in section:
            problems.append(f"{_origin_of((net, 'regularizers'), origins, default)}: both "
                            f"[{net}.regularizer] and [[{net}.regularizers]]: give one "
                            f"(regularizer is the one-item form of regularizers)")
        ema = section.get("ema")
        if ema is None:
            continue
        if net == "discriminator":
            problems.append(f"{origin}: [discriminator.ema]: an EMA is for the generator only "
                            f"(use [generator.ema])")
        elif isinstance(ema, dict):
            given = [k for k in ("decay", "half_life_images") if k in ema]
            if len(given) != 1:
                problems.append(f"{_origin_of((net, 'ema'), origins, default)}: [generator.ema] "
                                f"needs exactly one of 'decay' and 'half_life_images'"
                                + (" (both given)" if given else ""))
            elif "decay" in ema and isinstance(ema["decay"], (int, float)) \
                    and not 0.0 <= ema["decay"] < 1.0:
                problems.append(f"{_origin_of((net, 'ema', 'decay'), origins, default)}: invalid "
                                f"value at {net}.ema.decay: must be in [0, 1)")
            elif "half_life_images" in ema and isinstance(ema["half_life_images"], (int, float)) \
                    and ema["half_life_images"] <= 0:
                problems.append(f"{_origin_of((net, 'ema', 'half_life_images'), origins, default)}"
                                f": invalid value at {net}.ema.half_life_images: must be > 0")
    if problems:
        raise RecipeError(problems)


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
    elif isinstance(exc, ConfigValueError):  # an attrs validator (core.validators)
        yield _describe_invalid(exc, path, origins, default)
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


def _describe_invalid(exc: ConfigValueError, path: tuple[str, ...], origins: Origins,
                      default: str) -> str:
    """``FILE: invalid value at KEY: REASON``, and where each related key was set."""
    key = (*path, *exc.subpath)
    owner = path[:-1] if exc.attribute and path[-1:] == (exc.attribute,) else path
    line = f"{_origin_of(key, origins, default)}: invalid value at {'.'.join(key)}: {exc.reason}"
    for related in exc.related:
        other = (*owner, *related)
        given = [origin for p, origin in origins.items() if p[: len(other)] == other]
        line += f" [{'.'.join(other)}: {given[0] if given else 'the default'}]"
    return line


def _is_spec_config(cls: Any) -> bool:
    return isinstance(cls, type) and cls.__name__ == "Config"


def _literal_choices(cls: Any) -> tuple | None:
    if typing.get_origin(cls) is Literal:
        return typing.get_args(cls)
    return None
