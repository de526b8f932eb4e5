"""The one grammar of threshold rules: ``metric:op:value`` (gates) and ``op:value`` (conditions).

``op`` is one of ``lt le gt ge eq ne`` in any case; ``value`` is a finite number. Spaces
around the parts are ignored. Gates, metric-registry thresholds and audit rules all parse
through here, so the same text means the same thing everywhere. A bad text raises
:class:`RuleSyntaxError`, one line naming the text and what is accepted.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

from expflow_flows.errors import ExpflowError

# op name -> (comparison, symbol used in messages)
OPS: dict[str, tuple[Callable[[float, float], bool], str]] = {
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "eq": (operator.eq, "=="),
    "ne": (operator.ne, "!="),
}
OPS_TEXT = ", ".join(OPS)
RULE_FORM = "'metric:op:value' such as 'nrmse:lt:0.05'"
CONDITION_FORM = "'op:value' such as 'lt:0.05'"


class RuleSyntaxError(ExpflowError):
    """A rule text that does not follow the grammar; the message is one line."""


@dataclass(frozen=True)
class Condition:
    """``op value``: a comparison against a finite threshold."""

    op: str
    value: float

    @property
    def symbol(self) -> str:
        """The comparison as a symbol (``<``, ``>=`` ...)."""
        return OPS[self.op][1]

    def holds(self, x: float) -> bool:
        """True when ``x op value``."""
        return OPS[self.op][0](x, self.value)

    def __str__(self) -> str:
        # repr round-trips the float, so the text states the exact threshold.
        return f"{self.op}:{self.value!r}"


@dataclass(frozen=True)
class Rule:
    """``metric:op:value``; ``raw`` keeps the value as it was written (``1e-3``)."""

    metric: str
    condition: Condition
    raw: str

    @property
    def text(self) -> str:
        """The normalised text: parts stripped, op in lower case, the value as written."""
        return f"{self.metric}:{self.condition.op}:{self.raw}"


def parse_op(op: object, text: str, what: str) -> str:
    """``op`` in lower case; anything but one of :data:`OPS` is a RuleSyntaxError."""
    if not isinstance(op, str) or op.strip().lower() not in OPS:
        raise RuleSyntaxError(f"{what} {text!r}: unknown op {op!r}; expected one of {OPS_TEXT}")
    return op.strip().lower()


def parse_value(raw: object, text: str, what: str, form: str) -> float:
    """``raw`` (text or a number) as a finite float; a bool, NaN or infinity is refused."""
    if isinstance(raw, bool):
        raise RuleSyntaxError(f"{what} {text!r}: threshold {raw!r} is not a number; {form}")
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RuleSyntaxError(
            f"{what} {text!r}: threshold {raw!r} is not a number; {form}"
        ) from None
    if math.isnan(value):
        raise RuleSyntaxError(f"{what} {text!r}: threshold is NaN; expected a number")
    if math.isinf(value):
        # lt:inf always passes and gt:inf never does: a typo, not a threshold.
        raise RuleSyntaxError(f"{what} {text!r}: threshold {raw!r} is not finite; {form}")
    return value


def condition(op: object, value: object, *, what: str = "condition") -> Condition:
    """A condition from its two parts (``'lt'``, ``0.05`` or ``'0.05'``)."""
    text = f"{op}:{value}"
    return Condition(
        parse_op(op, text, what), parse_value(value, text, what, f"expected {CONDITION_FORM}")
    )


def _split(text: object, parts: int, what: str, form: str) -> tuple[str, list[str]]:
    if not isinstance(text, str):
        raise RuleSyntaxError(f"{what} {text!r} is not text; expected {form}")
    text = text.strip()
    pieces = [p.strip() for p in text.split(":")]
    if len(pieces) != parts:
        raise RuleSyntaxError(
            f"{what} {text!r} has {len(pieces)} part(s), not {parts}; expected {form}"
        )
    return text, pieces


def parse_condition(text: object, *, what: str = "condition") -> Condition:
    """Parse ``op:value`` (``lt:0.05``)."""
    form = f"expected {CONDITION_FORM}"
    text, (op, raw) = _split(text, 2, what, CONDITION_FORM)
    return Condition(parse_op(op, text, what), parse_value(raw, text, what, form))


def parse_rule(text: object, *, what: str = "rule") -> Rule:
    """Parse ``metric:op:value`` (``nrmse:lt:0.05``); the metric may carry a group (``PDE/nrmse``)."""
    form = f"expected {RULE_FORM}"
    text, (metric, op, raw) = _split(text, 3, what, RULE_FORM)
    if not metric:
        raise RuleSyntaxError(f"{what} {text!r} has an empty metric name; {form}")
    op = parse_op(op, text, what)
    return Rule(metric, Condition(op, parse_value(raw, text, what, form)), raw)
