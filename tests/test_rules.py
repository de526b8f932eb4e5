"""The one threshold grammar: gates, registry thresholds and audit rules read rule text alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.governance.audit import audit_experiment
from expflow_flows.metrics.gates import Gate
from expflow_flows.metrics.registry import MetricsRegistry
from expflow_flows.metrics.rules import RuleSyntaxError, parse_condition, parse_rule


def registry_threshold(tmp_path: Path, threshold: str) -> MetricsRegistry:
    path = tmp_path / "metrics.yaml"
    path.write_text(
        f"- {{name: Score/x, direction: maximize, threshold: '{threshold}'}}\n", encoding="utf-8"
    )
    return MetricsRegistry.from_yaml(path)


def audit_rule(rule: object):
    return audit_experiment(
        "exp",
        {"sub_step": 2},
        {"nrmse": 0.1},
        registry=MetricsRegistry.builtin(),
        primary="nrmse",
        required_params={"sub_step": rule},
    )


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("lt", ["'lt'", "1 part(s), not 2", "'op:value'"]),
        ("lt:1:2", ["'lt:1:2'", "3 part(s), not 2"]),
        ("below:1", ["'below:1'", "unknown op 'below'", "lt, le, gt, ge, eq, ne"]),
        ("lt:abc", ["'lt:abc'", "threshold 'abc' is not a number", "'op:value'"]),
        ("lt:nan", ["'lt:nan'", "NaN"]),
        ("lt:inf", ["'lt:inf'", "not finite"]),
        ("ge:-Infinity", ["not finite"]),
    ],
)
def test_bad_conditions_are_one_line_naming_text_and_accepted_form(
    text: str, fragments: list[str]
) -> None:
    with pytest.raises(RuleSyntaxError) as err:
        parse_condition(text)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("nrmse:lt", "2 part(s), not 3"),
        (":lt:1", "empty metric name"),
        ("nrmse:<:1", "unknown op '<'"),
        ("nrmse:lt:", "threshold '' is not a number"),
    ],
)
def test_bad_rules_name_the_text_and_the_metric_op_value_form(text: str, fragment: str) -> None:
    with pytest.raises(RuleSyntaxError) as err:
        parse_rule(text, what="gate")
    message = str(err.value)
    assert message.startswith(f"gate {text!r}") and fragment in message
    assert "lt, le, gt, ge, eq, ne" in message or "'metric:op:value'" in message


def test_one_text_means_one_thing_in_gates_registry_and_audits(tmp_path: Path) -> None:
    gate = Gate.parse(" x : GE : 0.5 ")
    assert (gate.op, gate.threshold, gate.text) == ("ge", 0.5, "x:ge:0.5")
    assert registry_threshold(tmp_path, " GE : 0.5 ").get("Score/x").threshold == ("ge", 0.5)
    assert audit_rule(" GE : 2 ").passed
    assert not audit_rule("GT:2").passed


@pytest.mark.parametrize("threshold", ["inf", "-inf", "nan"])
def test_non_finite_thresholds_are_refused_everywhere(tmp_path: Path, threshold: str) -> None:
    # 'lt:inf' would pass every finite value: a gate that cannot fail is refused.
    with pytest.raises(ExpflowError, match="gate 'x:lt:"):
        Gate.parse(f"x:lt:{threshold}")
    with pytest.raises(ExpflowError, match="threshold .* is not accepted"):
        registry_threshold(tmp_path, f"lt:{threshold}")
    with pytest.raises(ExpflowError, match="required param rule sub_step="):
        audit_rule(f"lt:{threshold}")
