"""The training-callback checks, in the real :class:`core.train.Trainer` on a tiny recipe: the
hooks run in the loop's order (``on_start`` once, ``on_iteration_end`` once per iteration with
that iteration, ``on_end`` once); ``state_dict`` is plain JSON that ``load_state_dict`` takes
back (and ``{}``, a checkpoint without the callback); ``default_enabled`` decides whether a
recipe that does not mention the callback gets it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from core.interfaces import Callback
from core.testing.kit import Case, conformance_check, fail, registered

ITERATIONS = 3


def _recorded_run(case: Case, run_dir: Path) -> tuple[Callback, list[tuple[str, int]]]:
    """Train a tiny recipe for :data:`ITERATIONS` iterations with a fresh instance of the case's
    callback; return it and its hook calls as (hook, trainer.iteration) in order."""
    from core.registry import get_registry
    from core.testing.steps import small_trainer, trainer_recipe

    sn = get_registry().regularizers["sn"]
    recipe = trainer_recipe("sn", sn.Config(), iterations=ITERATIONS)
    callback = case.create()
    calls: list[tuple[str, int]] = []

    def recording(hook: str):
        original = getattr(callback, hook)

        def call(trainer: Any, *args: Any) -> None:
            if hook == "on_iteration_end" and args[0] != trainer.iteration:
                fail(case, f"on_iteration_end got iteration {args[0]}, the trainer is at "
                           f"{trainer.iteration}")
            calls.append((hook, trainer.iteration))
            original(trainer, *args)
        return call

    for hook in ("on_start", "on_iteration_end", "on_end"):
        setattr(callback, hook, recording(hook))
    trainer = small_trainer(recipe, run_dir, callbacks=[callback])
    trainer.fit()
    return callback, calls


@conformance_check("callbacks", covers=("on_start", "on_iteration_end", "on_end"))
def check_callback_hooks_run_in_the_loops_order(case: Case) -> None:
    """In a 3-iteration run: ``on_start`` at iteration 0, ``on_iteration_end`` after each
    iteration 1..3 with that iteration, ``on_end`` after the last; no hook raises."""
    with registered(case.cls), tempfile.TemporaryDirectory(prefix="specreg-callback-") as tmp:
        _, calls = _recorded_run(case, Path(tmp) / "run")
    expected = [("on_start", 0), *(("on_iteration_end", i) for i in range(1, ITERATIONS + 1)),
                ("on_end", ITERATIONS)]
    if calls != expected:
        fail(case, f"hooks ran as {calls}, expected {expected}")


@conformance_check("callbacks", covers=("state_dict", "load_state_dict"))
def check_callback_state_round_trips_through_json(case: Case) -> None:
    """After a run, ``state_dict()`` is a dict of plain JSON values; a fresh instance given it
    (as a checkpoint hands it back, through JSON) reports the same state; ``load_state_dict({})``
    (a checkpoint without this callback) is accepted."""
    with registered(case.cls), tempfile.TemporaryDirectory(prefix="specreg-callback-") as tmp:
        callback, _ = _recorded_run(case, Path(tmp) / "run")
    state = callback.state_dict()
    if not isinstance(state, dict):
        fail(case, f"state_dict() must return a dict, got {type(state).__name__}")
    try:
        text = json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as exc:
        fail(case, f"state_dict() is not plain JSON: {exc}")
    fresh = case.create()
    fresh.load_state_dict(json.loads(text))
    again = fresh.state_dict()
    if json.dumps(again, sort_keys=True) != json.dumps(json.loads(text), sort_keys=True):
        fail(case, f"load_state_dict(state) then state_dict() gives {again!r:.200}, "
                   f"not {state!r:.200}")
    case.create().load_state_dict({})


@conformance_check("callbacks", covers=("default_enabled",))
def check_callback_default_enabled_decides_a_bare_recipe(case: Case) -> None:
    """``default_enabled`` is a bool; a recipe without the callback's table gets it exactly when
    it is True (with the default Config), and a recipe that names it always gets it."""
    from core.recipe import structure_recipe

    flag = case.cls.default_enabled
    if not isinstance(flag, bool):
        fail(case, f"default_enabled must be a bool, got {flag!r}")
    with registered(case.cls) as name:
        minimal = {"dataset": {"name": "stacked_digits"}, "architecture": {"name": "resnet32"}}
        bare = structure_recipe(minimal)
        named = structure_recipe({**minimal, "callbacks": {name: {}}})
    if (name in bare.callbacks) != flag:
        fail(case, f"default_enabled = {flag}, but a recipe without [callbacks.{name}] "
                   f"{'lacks' if flag else 'has'} it")
    if name not in named.callbacks:
        fail(case, f"a recipe with [callbacks.{name}] does not list it")
