"""The metrics registry: lookups, YAML extension/override, malformed entries, default gates."""

from __future__ import annotations

from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.metrics.gates import Gate
from expflow_flows.metrics.registry import (
    REGISTRY_ENV,
    MetricSpec,
    MetricsRegistry,
    load_registry,
    parse_gates_strict,
)
from expflow_flows.pde.metrics import METRIC_KEYS


@pytest.fixture
def reg() -> MetricsRegistry:
    return MetricsRegistry.builtin()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "metrics.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_builtins_cover_scores_pdebench_and_trainables(reg: MetricsRegistry) -> None:
    names = reg.names()
    assert names == sorted(names)
    for full in (
        "Score/seg_total",
        "PDE/pde_mean",
        "Time/train_time_min",
        "Loss/val_mse",
        "Loss/train_loss",
        "Loss/val_nrmse",
        "Loss/val_rmse",
        "Time/train_time_s",
        "Time/eval_time_s",
    ):
        assert full in names
    for key in METRIC_KEYS:
        spec = reg.get(f"PDE/{key}")
        assert spec.direction == "minimize" and spec.group == "PDE"


def test_lookup_by_short_and_full_name(reg: MetricsRegistry) -> None:
    assert reg.get("seg_total") is reg.get("Score/seg_total")
    assert reg.get("nrmse").full_name == "PDE/nrmse"
    assert reg.direction("seg_total") == "maximize"
    assert reg.direction("PDE/pde_mean") == "minimize"
    assert "nrmse" in reg and "PDE/nrmse" in reg
    # A full name must match exactly: a wrong group is not the same metric.
    assert "Loss/nrmse" not in reg


def test_unknown_metric_lists_known_sorted(reg: MetricsRegistry) -> None:
    with pytest.raises(ExpflowError) as err:
        reg.get("accuracy")
    message = str(err.value)
    assert "'accuracy'" in message and "\n" not in message
    listed = message.split("known metrics: ", 1)[1].split(", ")
    assert listed == sorted(listed) == reg.names()
    with pytest.raises(ExpflowError, match="not known"):
        reg.get("Loss/nrmse")


def test_thresholds_become_gates(reg: MetricsRegistry) -> None:
    gates = reg.thresholds()
    assert [g.text for g in gates] == ["PDE/pde_mean:lt:18.09", "Time/train_time_min:lt:60.0"]
    pde = gates[0]
    assert pde.evaluate({"pde_mean": 17.0}).passed
    assert not pde.evaluate({"PDE/pde_mean": 18.09}).passed
    assert not pde.evaluate({}).passed  # fail closed


def test_spec_threshold_forms_are_normalised() -> None:
    text = MetricSpec("acc", "Eval", direction="maximize", threshold="ge:0.9")
    named = MetricSpec("acc", "Eval", direction="maximize", threshold="Eval/acc:ge:0.9")
    pair = MetricSpec("acc", "Eval", direction="maximize", threshold=["GE", 0.9])
    assert text.threshold == named.threshold == pair.threshold == ("ge", 0.9)
    assert text.gate() == Gate.parse("Eval/acc:ge:0.9")
    assert MetricSpec("acc", "Eval").gate() is None


def test_yaml_list_extends_and_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
- name: Score/dice
  direction: maximize
  type: float
  threshold: ge:0.5
  description: dice score
- name: pde_mean
  threshold: lt:17.5
- name: train_time_min
  threshold: null
""",
    )
    reg = MetricsRegistry.from_yaml(path)
    dice = reg.get("dice")
    assert (dice.group, dice.direction, dice.threshold) == ("Score", "maximize", ("ge", 0.5))
    pde = reg.get("pde_mean")
    # Fields not named keep their built-in values.
    assert pde.threshold == ("lt", 17.5) and pde.group == "PDE" and pde.description
    assert reg.get("train_time_min").threshold is None
    assert [g.text for g in reg.thresholds()] == ["PDE/pde_mean:lt:17.5", "Score/dice:ge:0.5"]
    assert len(reg) == len(MetricsRegistry.builtin()) + 1


def test_yaml_mapping_form(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
Custom/iou: {direction: maximize, threshold: [gt, 0.3]}
latency_ms: {group: Time, direction: minimize, type: int}
PDE/nrmse: {threshold: "lt:0.05"}
""",
    )
    reg = MetricsRegistry.from_yaml(path)
    assert reg.get("Custom/iou").threshold == ("gt", 0.3)
    assert reg.get("latency_ms").full_name == "Time/latency_ms"
    assert reg.get("latency_ms").type == "int"
    assert reg.get("nrmse").threshold == ("lt", 0.05)


def test_empty_yaml_gives_builtins(tmp_path: Path) -> None:
    assert (
        MetricsRegistry.from_yaml(write(tmp_path, "")).names() == MetricsRegistry.builtin().names()
    )


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("- {name: Score/x, direction: up}", ["'up'", "minimize, maximize"]),
        ("- {name: Score/x, direction: maximize, type: double}", ["'double'", "float, int"]),
        ("- {name: Score/x, direction: maximize, colour: red}", ["'colour'", "accepted fields"]),
        ("- {name: Score/x, direction: maximize, threshold: below:3}", ["'below:3'", "op:value"]),
        ("- {name: Score/x, direction: maximize, threshold: lt:abc}", ["'lt:abc'", "op:value"]),
        (
            "- {name: Score/x, direction: maximize, threshold: [lt, .nan]}",
            ["threshold", "op:value"],
        ),
        ("- {name: Score/x, direction: maximize, threshold: other:lt:1}", ["other:lt:1"]),
        ("- {name: Score/x, direction: maximize, description: [1]}", ["description", "text"]),
        ("- {name: brand_new, direction: maximize}", ["'brand_new'", "group"]),
        ("- {name: Score/brand_new}", ["'Score/brand_new'", "direction"]),
        ("- {name: Score/x, group: Loss, direction: maximize}", ["'Loss'", "'Score'"]),
        ("- {name: 'Sc:ore/x', direction: maximize}", ["'Sc:ore'", "without"]),
        ("- {direction: maximize}", ["entry 0", "'name'"]),
        ("- just-a-string", ["entry 0", "not a mapping"]),
        ("Score/x: 3", ["'Score/x'", "not a mapping"]),
        ("42", ["int", "list of metric specs"]),
        (
            "- {name: Score/x, direction: maximize}\n- {name: Score/x, direction: minimize}",
            ["twice"],
        ),
        ("- {name: [unclosed", ["not readable YAML"]),
    ],
)
def test_malformed_entries_are_one_line_errors(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ExpflowError) as err:
        MetricsRegistry.from_yaml(path)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ExpflowError, match="does not exist"):
        MetricsRegistry.from_yaml(tmp_path / "nope.yaml")


def test_load_registry_home_env_and_builtin(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert load_registry().names() == MetricsRegistry.builtin().names()
    home.mkdir(parents=True, exist_ok=True)
    (home / "metrics.yaml").write_text("- {name: Score/dice, direction: maximize}\n")
    assert "Score/dice" in load_registry()
    other = tmp_path / "other.yaml"
    other.write_text("- {name: Score/iou, direction: maximize}\n")
    monkeypatch.setenv(REGISTRY_ENV, str(other))
    reg = load_registry()
    assert "Score/iou" in reg and "Score/dice" not in reg
    # A file named by the environment must exist: fail closed, never silently built-ins.
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ExpflowError, match="does not exist"):
        load_registry()


def test_parse_gates_strict(reg: MetricsRegistry) -> None:
    gates = parse_gates_strict("nrmse:lt:0.05, PDE/pde_mean:lt:18", reg)
    assert [g.metric for g in gates] == ["nrmse", "PDE/pde_mean"]
    assert parse_gates_strict(None, reg) == []
    with pytest.raises(ExpflowError) as err:
        parse_gates_strict(["nrmse:lt:0.05", "accuracy:gt:0.9"], reg)
    assert "'accuracy'" in str(err.value) and "known metrics: Data/n_test" in str(err.value)
    with pytest.raises(ExpflowError, match="unknown metric 'Loss/nrmse'"):
        parse_gates_strict("Loss/nrmse:lt:1", reg)


def test_ambiguous_short_name(tmp_path: Path) -> None:
    reg = MetricsRegistry.from_yaml(write(tmp_path, "Custom/nrmse: {direction: minimize}\n"))
    with pytest.raises(ExpflowError, match="ambiguous; use one of: Custom/nrmse, PDE/nrmse"):
        reg.get("nrmse")
    assert reg.get("Custom/nrmse").group == "Custom"
    # A gate on the short name is still a known metric.
    assert parse_gates_strict("nrmse:lt:1", reg)[0].metric == "nrmse"
