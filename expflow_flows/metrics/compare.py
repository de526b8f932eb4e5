"""Rank experiments by a metric, keeping only those that pass the gates.

Works on anything with ``id``, ``name``, ``state``, ``params`` and ``metrics``
(ledger experiments today, tracked tasks from other sources later).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.metrics.gates import Gate
from expflow_flows.metrics.registry import MetricsRegistry


@dataclass
class Ranking:
    """Ranked rows (best first) and the experiments left out, with why."""

    metric: str
    direction: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)

    def to_csv(self) -> str:
        """The ranked rows as CSV (rank, id, name, state, metric, then every other metric)."""
        columns = _columns(self.rows)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        return buf.getvalue()


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    fixed = ["rank", "id", "name", "state", "value"]
    extra = sorted({k for r in rows for k in r} - set(fixed))
    return fixed + extra


def _metric_value(metrics: dict[str, Any], metric: str) -> float | None:
    """A metric by full name or by the part after its group (``PDE/nrmse`` → ``nrmse``),
    and a bare name finds the one grouped key that ends in it (ClearML's ``Group/Metric``)."""
    short = metric.rsplit("/", 1)[-1]
    grouped = [k for k in metrics if "/" not in metric and k.rsplit("/", 1)[-1] == short]
    for key in (metric, short, *(grouped if len(grouped) == 1 else [])):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def rank(
    experiments: Iterable[Any],
    metric: str,
    *,
    registry: MetricsRegistry,
    direction: str | None = None,
    gates: Iterable[Gate] = (),
) -> Ranking:
    """Rank by ``metric`` (direction from the registry unless given); gates filter, failing closed."""
    experiments = list(experiments)
    seen = {k for e in experiments for k in (e.metrics or {})}
    seen |= {k.rsplit("/", 1)[-1] for k in seen}
    short = metric.rsplit("/", 1)[-1]
    # With no experiments at all there is nothing to check the name against.
    if experiments and metric not in registry and short not in seen and metric not in seen:
        known = sorted(set(registry.names()) | seen)
        raise ExpflowError(f"metric {metric!r} is not known; known metrics: {', '.join(known)}")
    if direction is None:
        direction = registry.direction(metric) if metric in registry else "minimize"
    if direction not in ("minimize", "maximize"):
        raise ExpflowError(f"direction {direction!r}: expected minimize or maximize")
    gates = list(gates)
    for gate in gates:
        # A gate no experiment can pass because none reports its metric is a typo or the
        # wrong metric, not a filter: say so instead of returning an empty table.
        if experiments and gate.metric not in seen and gate.metric.rsplit("/", 1)[-1] not in seen:
            raise ExpflowError(
                f"gate {gate.text!r}: no compared experiment reports {gate.metric!r}; "
                f"they report: {', '.join(sorted(k for k in seen if '/' not in k))}"
            )
    ranking = Ranking(metric=metric, direction=direction)
    for exp in experiments:
        metrics = dict(exp.metrics or {})
        value = _metric_value(metrics, metric)
        if value is None or not math.isfinite(value):
            ranking.excluded.append({"id": exp.id, "name": exp.name, "why": f"no finite {metric}"})
            continue
        failed = [r.message for r in (g.evaluate(metrics) for g in gates) if not r.passed]
        if failed:
            ranking.excluded.append({"id": exp.id, "name": exp.name, "why": "; ".join(failed)})
            continue
        ranking.rows.append(
            {"id": exp.id, "name": exp.name, "state": exp.state, "value": value, **metrics}
        )
    ranking.rows.sort(key=lambda r: r["value"], reverse=direction == "maximize")
    for i, row in enumerate(ranking.rows, 1):
        row["rank"] = i
    return ranking
