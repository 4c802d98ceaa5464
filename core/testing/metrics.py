"""The metric checks, on a tiny generator and the stacked digits: a finite primary score with a
JSON-ready protocol record, deterministic in the context's seed (each metric evaluated twice)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from core.errors import SpecregError
from core.interfaces import EvaluationContext, MetricResult
from core.testing.kit import SEED, Case, conformance_check, fail, small_architecture


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
            fail(case, f"compute failed with a user-facing error (does the case need a "
                       f"Case(prepare=...) that provides files under the data root?): {exc}")
        case._evaluations.append((record, results[0]))
    return case._evaluations[:count]


@conformance_check("metrics", covers=("compute", "primary", "higher_is_better"))
def check_metric_protocol_record(case: Case) -> None:
    """On a tiny generator and the stacked digits: float values (NaN for an undefined score, never
    infinite), a finite one under ``primary``, ``higher_is_better`` a bool, and a non-empty
    protocol that the evaluation record (JSON) carries."""
    metric = case.create()
    ((record, direct),) = _evaluations(case, 1)
    if not isinstance(direct, MetricResult) or not isinstance(direct.values, dict) \
            or not direct.values:
        fail(case, f"compute must return a MetricResult with values, got {direct!r:.100}")
    if not isinstance(direct.protocol, dict) or not direct.protocol:
        fail(case, "the MetricResult's protocol is empty: record what produced the numbers "
                   "(samples, reference data, network and its hash, ...)")
    values = record["values"]
    bad = {k: v for k, v in values.items() if not isinstance(k, str) or math.isinf(v)}
    if bad:
        fail(case, f"infinite values or non-string keys: {bad}")
    primary = type(metric).primary
    if not primary or primary not in values:
        fail(case, f"primary = {primary!r} is not one of the values {sorted(values)}")
    if not math.isfinite(values[primary]):
        fail(case, f"the primary score {primary} = {values[primary]} is not finite")
    if not isinstance(type(metric).higher_is_better, bool):
        fail(case, "higher_is_better must be a bool")
    try:
        json.dumps(record)
    except (TypeError, ValueError) as exc:
        fail(case, f"the evaluation record is not JSON-ready: {exc}")


@conformance_check("metrics", covers=("compute",))
def check_metric_deterministic(case: Case) -> None:
    """The same context seed gives the same values twice, whatever the global random state (a
    metric draws its randomness from ``context.seed``)."""
    (first, _), (second, _) = _evaluations(case, 2)
    first, second = first["values"], second["values"]

    def same(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)

    if first.keys() != second.keys() or not all(same(first[k], second[k]) for k in first):
        fail(case, f"two evaluations with the same seed differ: {first} vs {second}")
