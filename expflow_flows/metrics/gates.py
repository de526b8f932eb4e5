"""Metric gates: ``metric:op:value`` checks that decide whether a result may go on.

``nrmse:lt:0.05`` passes when the metric ``nrmse`` is strictly below 0.05;
``le``/``ge`` are inclusive, ``eq``/``ne`` compare floats exactly. A metric may
carry a group prefix (``PDE/nrmse``): when the metrics lack the full name, the
part after the last ``/`` is looked up. Gates fail closed: a missing metric or
a value that is not a finite number never passes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from expflow_flows.errors import ExpflowError, GateFailed
from expflow_flows.metrics.rules import OPS, RULE_FORM, parse_rule

__all__ = [
    "OPS",
    "Gate",
    "GateResult",
    "evaluate_gates",
    "parse_gates",
    "require_gates",
]

_FORMAT = f"expected {RULE_FORM}"


def _num(x: float) -> str:
    # repr is the shortest text that round-trips, so a value just past the
    # threshold never prints as equal to it.
    return repr(float(x))


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate on one set of metrics."""

    gate: str
    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """A parsed ``metric:op:value`` gate."""

    metric: str
    op: str
    threshold: float
    text: str

    @classmethod
    def parse(cls, text: str, known_metrics: set[str] | None = None) -> Gate:
        """Parse ``metric:op:value``; with ``known_metrics``, an unknown metric is an error too."""
        rule = parse_rule(text, what="gate")
        metric = rule.metric
        if known_metrics is not None and not (
            metric in known_metrics or _short(metric) in known_metrics
        ):
            known = ", ".join(sorted(known_metrics)) or "(none)"
            raise ExpflowError(
                f"gate {text.strip()!r}: unknown metric {metric!r}; known metrics: {known}"
            )
        op, threshold = rule.condition.op, rule.condition.value
        return cls(metric=metric, op=op, threshold=threshold, text=rule.text)

    def __str__(self) -> str:
        return self.text

    def lookup(self, metrics: Mapping[str, Any]) -> tuple[bool, Any]:
        """Find this gate's metric: the full name first, then the part after the last ``/``."""
        if self.metric in metrics:
            return True, metrics[self.metric]
        short = _short(self.metric)
        if short != self.metric and short in metrics:
            return True, metrics[short]
        return False, None

    def evaluate(self, metrics: Mapping[str, Any] | None) -> GateResult:
        """Check the gate against ``metrics``; missing or non-finite values fail."""
        metrics = metrics if metrics is not None else {}
        found, raw = self.lookup(metrics)
        head = f"gate {self.text} failed:"

        def fail(message: str, value: float | None = None) -> GateResult:
            return GateResult(
                self.text, self.metric, self.op, self.threshold, value, False, message
            )

        if not found:
            available = ", ".join(sorted(map(str, metrics))) or "(none)"
            return fail(f"{head} metric {self.metric!r} is missing; metrics available: {available}")
        if raw is None:
            return fail(f"{head} {self.metric} has no value (None)")
        if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
            return fail(f"{head} {self.metric} = {raw!r} ({type(raw).__name__}) is not a number")
        value = float(raw)
        if math.isnan(value):
            return fail(f"{head} {self.metric} is NaN, not a usable number")
        if math.isinf(value):
            return fail(f"{head} {self.metric} = {_num(value)}, not a finite number", value)
        compare, symbol = OPS[self.op]
        shown = f"{self.metric} = {_num(value)}"
        if compare(value, self.threshold):
            return GateResult(
                self.text,
                self.metric,
                self.op,
                self.threshold,
                value,
                True,
                f"gate {self.text} passed: {shown} {symbol} {_num(self.threshold)}",
            )
        return fail(f"{head} {shown}, needs {symbol} {_num(self.threshold)}", value)


def _short(metric: str) -> str:
    return metric.rsplit("/", 1)[-1]


def parse_gates(
    items: str | Gate | Iterable[str | Gate] | None,
    known_metrics: set[str] | None = None,
) -> list[Gate]:
    """Parse gates from a comma-separated string or a list of them; None gives no gates."""
    if items is None:
        return []
    if isinstance(items, (str, Gate)):
        items = [items]
    gates: list[Gate] = []
    for item in items:
        if isinstance(item, Gate):
            gates.append(item)
            continue
        if not isinstance(item, str):
            raise ExpflowError(f"gate {item!r} is not text; {_FORMAT}")
        # Empty pieces come from trailing commas or blank CLI values; they add no gate.
        gates += [Gate.parse(p, known_metrics) for p in item.split(",") if p.strip()]
    return gates


def evaluate_gates(gates: Iterable[Gate], metrics: Mapping[str, Any]) -> list[GateResult]:
    """Evaluate every gate against ``metrics``, in order."""
    return [gate.evaluate(metrics) for gate in gates]


def require_gates(results: Iterable[GateResult]) -> None:
    """Raise :class:`GateFailed` naming every failed gate, on one line."""
    failed = [r.message for r in results if not r.passed]
    if failed:
        raise GateFailed("; ".join(failed))
