"""Metric gates: strict vs inclusive ops, fail-closed evaluation, clear parse errors."""

from __future__ import annotations

import math

import pytest

from expflow_flows.errors import ExpflowError, GateFailed
from expflow_flows.metrics.gates import Gate, evaluate_gates, parse_gates, require_gates

# (op, value below / equal to / above the threshold 1.0 -> passed)
BOUNDARY = {
    "lt": (True, False, False),
    "le": (True, True, False),
    "gt": (False, False, True),
    "ge": (False, True, True),
    "eq": (False, True, False),
    "ne": (True, False, True),
}


@pytest.mark.parametrize("op", sorted(BOUNDARY))
def test_each_op_at_and_around_the_boundary(op: str) -> None:
    gate = Gate.parse(f"loss:{op}:1.0")
    below, equal, above = BOUNDARY[op]
    assert gate.evaluate({"loss": 0.999}).passed is below
    assert gate.evaluate({"loss": 1.0}).passed is equal
    assert gate.evaluate({"loss": 1.001}).passed is above


def test_eq_compares_floats_exactly() -> None:
    assert not Gate.parse("x:eq:0.3").evaluate({"x": 0.1 + 0.2}).passed
    assert Gate.parse("x:ne:0.3").evaluate({"x": 0.1 + 0.2}).passed


def test_fail_message_names_metric_value_and_threshold() -> None:
    result = Gate.parse("nrmse:lt:0.05").evaluate({"nrmse": 0.0712})
    assert not result.passed
    assert result.value == 0.0712
    assert result.message == "gate nrmse:lt:0.05 failed: nrmse = 0.0712, needs < 0.05"


def test_pass_message_names_metric_value_and_threshold() -> None:
    result = Gate.parse("pde_mean:lt:18.09").evaluate({"pde_mean": 17.5})
    assert result.passed
    assert result.message == "gate pde_mean:lt:18.09 passed: pde_mean = 17.5 < 18.09"


def test_value_just_past_threshold_is_not_printed_as_equal() -> None:
    result = Gate.parse("nrmse:lt:0.05").evaluate({"nrmse": 0.05000001})
    assert not result.passed
    assert "0.05000001" in result.message


def test_missing_metric_fails_and_lists_available() -> None:
    result = Gate.parse("nrmse:lt:0.05").evaluate({"mse": 1.0, "mae": 2.0})
    assert not result.passed
    assert result.value is None
    assert "'nrmse' is missing" in result.message
    assert "metrics available: mae, mse" in result.message


def test_missing_metric_with_no_metrics_at_all() -> None:
    for metrics in ({}, None):
        result = Gate.parse("nrmse:lt:0.05").evaluate(metrics)
        assert not result.passed and "(none)" in result.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (math.nan, "NaN"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (None, "no value"),
        ("0.01", "is not a number"),
        (True, "is not a number"),
        ([0.01], "is not a number"),
    ],
)
def test_unusable_values_fail_closed(value: object, fragment: str) -> None:
    # ne would pass for almost anything, so it shows the check is not the comparison.
    for text in ("nrmse:lt:0.05", "nrmse:ne:0.05"):
        result = Gate.parse(text).evaluate({"nrmse": value})
        assert not result.passed, (text, value)
        assert fragment in result.message
        assert "nrmse" in result.message


def test_integer_and_numpy_like_values_are_numbers() -> None:
    assert Gate.parse("epochs:ge:3").evaluate({"epochs": 3}).passed


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("nrmse:lt", ["2 part(s), not 3", "metric:op:value"]),
        ("nrmse:lt:0.05:extra", ["4 part(s), not 3"]),
        ("nrmse", ["1 part(s)"]),
        (":lt:0.05", ["empty metric name"]),
        ("nrmse:less:0.05", ["unknown op 'less'", "lt, le, gt, ge, eq, ne"]),
        ("nrmse:<:0.05", ["unknown op '<'"]),
        ("nrmse:lt:abc", ["threshold 'abc' is not a number"]),
        ("nrmse:lt:", ["threshold '' is not a number"]),
        ("nrmse:lt:nan", ["threshold is NaN"]),
    ],
)
def test_malformed_gate_texts(text: str, fragments: list[str]) -> None:
    with pytest.raises(ExpflowError) as info:
        Gate.parse(text)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_parse_tolerates_spaces_and_op_case() -> None:
    gate = Gate.parse("  nrmse : LT : 0.05 ")
    assert (gate.metric, gate.op, gate.threshold) == ("nrmse", "lt", 0.05)
    assert str(gate) == "nrmse:lt:0.05"


def test_group_prefix_falls_back_to_short_name() -> None:
    gate = Gate.parse("PDE/nrmse:lt:0.05")
    assert gate.evaluate({"nrmse": 0.01}).passed
    # The full name wins when present.
    assert not gate.evaluate({"PDE/nrmse": 0.5, "nrmse": 0.01}).passed
    assert not gate.evaluate({"other": 0.01}).passed


def test_known_metrics_rejects_unknown_at_parse_time() -> None:
    known = {"nrmse", "mse"}
    assert Gate.parse("nrmse:lt:1", known_metrics=known).metric == "nrmse"
    assert Gate.parse("PDE/mse:lt:1", known_metrics=known).metric == "PDE/mse"
    with pytest.raises(ExpflowError, match=r"unknown metric 'nrsme'; known metrics: mse, nrmse"):
        Gate.parse("nrsme:lt:1", known_metrics=known)


def test_parse_gates_accepts_string_list_and_none() -> None:
    assert parse_gates(None) == []
    assert parse_gates("") == []
    from_string = parse_gates("nrmse:lt:0.05, mse:le:1e-3,")
    assert [g.text for g in from_string] == ["nrmse:lt:0.05", "mse:le:1e-3"]
    from_list = parse_gates(["nrmse:lt:0.05", "mse:le:1e-3,mae:gt:0"])
    assert [g.metric for g in from_list] == ["nrmse", "mse", "mae"]
    with pytest.raises(ExpflowError, match="unknown op 'lte'"):
        parse_gates("nrmse:lt:0.05,mse:lte:1")


def test_require_gates_raises_one_line_with_all_failures() -> None:
    gates = parse_gates("nrmse:lt:0.05,mse:lt:1,missing:gt:0")
    results = evaluate_gates(gates, {"nrmse": 0.0712, "mse": 0.5})
    assert [r.passed for r in results] == [False, True, False]
    with pytest.raises(GateFailed) as info:
        require_gates(results)
    message = str(info.value)
    assert "\n" not in message
    assert "nrmse = 0.0712, needs < 0.05" in message
    assert "'missing' is missing" in message
    assert "mse:lt:1" not in message


def test_require_gates_passes_when_all_pass_or_none() -> None:
    require_gates([])
    require_gates(evaluate_gates(parse_gates("a:ge:1"), {"a": 1}))


def test_result_to_dict_is_json_friendly() -> None:
    d = Gate.parse("a:lt:1").evaluate({"a": 0.5}).to_dict()
    assert d == {
        "gate": "a:lt:1",
        "metric": "a",
        "op": "lt",
        "threshold": 1.0,
        "value": 0.5,
        "passed": True,
        "message": "gate a:lt:1 passed: a = 0.5 < 1.0",
    }
