"""The study file: which recipe runs under which overrides (arms), with which seeds, and what the
report compares. A TOML file validated like a recipe (one line per problem, exit status 2)::

    description = "Does SR prevent the collapse SN suffers at small width and large batch?"
    recipe = "../quickstart.toml"      # every arm's recipe unless it names its own (relative to
    seeds = [0, 1, 2]                  # this file, like ``extends``)
    output_dir = "runs/studies"        # the study folder is output_dir/NAME (NAME: the file stem)

    [arms.sn]
    set = ["discriminator.regularizer.name=\"sn\""]
    [arms.sr_dynamic]
    set = ["discriminator.regularizer.name=\"sr_dynamic\""]

    [compare]
    metrics = ["modes.modes", "modes.rejected"]   # evaluation keys METRIC.VALUE
    iterations = [1000, 2000]                     # [] = each run's last evaluation
    baseline = "sn"                               # the arm the others are tested against
    test = "welch"                                # "welch" (t-test) or "mannwhitney"

    [collapse]                                    # the rule that calls a run collapsed
    metric = "modes.modes"
    below = 100          # its last value is below 100 ...
    drop = 0.5           # ... or below 0.5 x its best value so far

``extends = "other_study.toml"`` inherits another study file; ``set`` entries are ``--set``
overrides (``KEY=VALUE``, the value read as TOML), applied after the seed (``seed=N``): a
top-level ``set`` to every arm, then the arm's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs

from core.errors import SpecregError
from core.validators import fail, int_at_least, number_in, positive_int

__all__ = ["Arm", "Compare", "Collapse", "Slurm", "Study", "StudyError", "load_study"]


class StudyError(SpecregError):
    """A study file is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _metric_key(instance, attribute, value) -> None:
    keys = value if isinstance(value, list) else [value]
    for key in keys:
        if key and (not isinstance(key, str) or key.count(".") != 1 or key.startswith(".")
                    or key.endswith(".")):
            fail(instance, attribute, f"metric keys are METRIC.VALUE (e.g. 'modes.modes'), "
                                      f"got {key!r}")


def _unique_ints(instance, attribute, value) -> None:
    if len(set(value)) != len(value):
        fail(instance, attribute, f"must not repeat a value, got {value}")
    if any(v < 0 for v in value):
        fail(instance, attribute, f"must be >= 0, got {value}")


@attrs.define
class Arm:
    """One arm: a recipe and the ``--set`` overrides that make it this arm."""

    #: the arm's recipe (relative to the study file); "" = the study's ``recipe``.
    recipe: str = ""
    #: ``--set``-style overrides, ``KEY=VALUE`` (the value read as TOML).
    set: list[str] = attrs.field(factory=list)
    description: str = ""


@attrs.define
class Compare:
    """What the report tabulates and tests."""

    #: evaluation keys ``METRIC.VALUE`` (as in ``evaluations.jsonl``), e.g. ``modes.modes``.
    metrics: list[str] = attrs.field(factory=list, validator=_metric_key)
    #: iterations at which to compare; [] = each run's last evaluation.
    iterations: list[int] = attrs.field(factory=list, validator=_unique_ints)
    #: the arm the others are tested against; "" = the first arm.
    baseline: str = ""
    #: the test of the difference to the baseline: Welch's t-test or the Mann-Whitney U test.
    test: Literal["welch", "mannwhitney"] = "welch"
    #: the confidence level of the interval around each mean.
    confidence: float = attrs.field(default=0.95, validator=number_in(0, 1, low_open=True,
                                                                      high_open=True))


@attrs.define
class Collapse:
    """The rule that calls a run collapsed: its last value of ``metric`` is below ``below``, or
    below ``drop`` times the best value it had (either that is given)."""

    metric: str = attrs.field(default="", validator=_metric_key)
    below: float | None = None
    drop: float | None = attrs.field(default=None, validator=attrs.validators.optional(
        number_in(0, 1, low_open=True)))

    def describe(self) -> str:
        if not self.metric or (self.below is None and self.drop is None):
            return "no collapse rule"
        parts = []
        if self.below is not None:
            parts.append(f"its last {self.metric} is below {self.below:g}")
        if self.drop is not None:
            parts.append(f"its last {self.metric} is below {self.drop:g} x its best so far")
        return "a run is collapsed when " + " or ".join(parts)


@attrs.define
class Slurm:
    """The ``slurm`` executor's job parameters (submitit's ``AutoExecutor``)."""

    #: submitit's cluster: "slurm"; "local" (subprocesses) and "debug" (in this process) run here.
    cluster: Literal["slurm", "local", "debug"] = "slurm"
    partition: str = ""
    timeout_min: int = attrs.field(default=240, validator=positive_int)
    cpus_per_task: int = attrs.field(default=2, validator=positive_int)
    gpus_per_node: int = attrs.field(default=0, validator=int_at_least(0))
    mem_gb: int = attrs.field(default=0, validator=int_at_least(0))
    #: at most this many jobs at once (0: no limit).
    array_parallelism: int = attrs.field(default=0, validator=int_at_least(0))
    #: more ``slurm_*`` parameters for submitit, e.g. ``{ account = "gan" }``.
    extra: dict[str, str] = attrs.field(factory=dict)


def _arms_valid(study: "Study", attribute, arms: dict) -> None:
    if not arms:
        fail(study, attribute, "a study needs at least one arm ([arms.NAME] tables)")
    for name in arms:
        if not name.replace("_", "").replace("-", "").isalnum():
            fail(study, attribute, f"arm names are letters, digits, '_' and '-' (they name run "
                                   f"folders), got {name!r}")


def _baseline_is_an_arm(study: "Study", attribute, compare: Compare) -> None:
    if compare.baseline and compare.baseline not in study.arms:
        fail(study, attribute, f"baseline {compare.baseline!r} is not an arm "
                               f"(arms: {', '.join(study.arms)})", subpath=("baseline",))


@attrs.define
class Study:
    """A study file (see the module docstring)."""

    arms: dict[str, Arm] = attrs.field(factory=dict, validator=_arms_valid)
    description: str = ""
    #: the recipe of every arm that names none (relative to the study file).
    recipe: str = ""
    seeds: list[int] = attrs.field(factory=lambda: [0, 1, 2], validator=[
        _unique_ints, attrs.validators.min_len(1)])
    #: ``--set`` overrides for every arm, applied before the arm's own (``train.iterations=1600``
    #: lengthens every run: re-running the study resumes the finished ones to the new end).
    set: list[str] = attrs.field(factory=list)
    #: the study folder is ``output_dir/NAME``; NAME = ``name`` or the study file's stem.
    output_dir: str = "runs/studies"
    name: str = ""
    #: where the report goes; "" = ``STUDY_FOLDER/report``.
    report_dir: str = ""
    executor: Literal["local", "slurm"] = "local"
    #: the local executor's runs at a time (``--jobs`` overrides); threads are split between them.
    jobs: int = attrs.field(default=1, validator=positive_int)
    #: processes per run: > 1 launches each run with ``accelerate launch --multi_gpu``.
    processes: int = attrs.field(default=1, validator=positive_int)
    compare: Compare = attrs.field(factory=Compare, validator=_baseline_is_an_arm)
    collapse: Collapse = attrs.field(factory=Collapse)
    slurm: Slurm = attrs.field(factory=Slurm)

    @property
    def baseline(self) -> str:
        return self.compare.baseline or next(iter(self.arms))


@attrs.frozen
class LoadedStudy:
    """A validated study and where it came from."""

    study: Study
    path: Path

    @property
    def name(self) -> str:
        return self.study.name or self.path.stem

    @property
    def folder(self) -> Path:
        return Path(self.study.output_dir) / self.name

    @property
    def report_dir(self) -> Path:
        return Path(self.study.report_dir) if self.study.report_dir else self.folder / "report"

    def recipe_of(self, arm: str) -> Path:
        own = self.study.arms[arm].recipe or self.study.recipe
        return (self.path.parent / own).resolve()


def load_study(path: str | Path, check_recipes: bool = True) -> LoadedStudy:
    """Read (``extends`` included) and validate a study file; with ``check_recipes`` every arm's
    recipe must load with its overrides and each seed. Raises :class:`StudyError`."""
    from core.recipe import RecipeError, _describe, _read_toml, converter, load_recipe

    path = Path(path)
    shown = str(path)
    try:
        table, origins = _read_toml(path)
    except RecipeError as exc:
        raise StudyError([p.replace("recipe file not found", "study file not found")
                          for p in exc.problems]) from None
    try:
        study = converter.structure(table, Study)
    except Exception as exc:  # noqa: BLE001 - every structuring problem becomes a line
        problems = list(_describe(exc, (), Study, origins, shown)) or [f"{shown}: {exc}"]
        raise StudyError(problems) from None
    loaded = LoadedStudy(study, path)
    problems = []
    for arm, spec in study.arms.items():
        recipe = loaded.recipe_of(arm)
        where = f"{shown}: arms.{arm}"
        if not (spec.recipe or study.recipe):
            problems.append(f"{where}: no recipe (set 'recipe' at the top level or in the arm)")
            continue
        if not recipe.is_file():
            key = "recipe" if spec.recipe else "recipe (top level)"
            problems.append(f"{where}.{key}: recipe file not found: {recipe}")
            continue
        if check_recipes:
            try:
                load_recipe(recipe, [f"seed={study.seeds[0]}", *study.set, *spec.set])
            except RecipeError as exc:
                problems += [f"{where}: {p}" for p in exc.problems]
    if problems:
        raise StudyError(problems)
    return loaded
