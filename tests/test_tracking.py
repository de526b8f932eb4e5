"""The tracking fan-out: what a pipeline run tells each tracking tool, and how a tool
that is missing or breaks is handled (expflow_flows.integrations.tracking).

The run's ``tracking`` settings name the tools the settings model knows (clearml,
langfuse); the tests stand adapters of tests/sample_trackers.py in for them.
"""

from __future__ import annotations

import pytest
import sample_trackers
from prefect.exceptions import ParameterTypeError
from test_pipeline import run_pipeline

from expflow_flows.errors import ExpflowError, GateFailed
from expflow_flows.integrations import tracking
from expflow_flows.settings.pipeline import load_pipeline_settings


@pytest.fixture
def adapters(monkeypatch):
    """``adapters(clearml="Recorder")``: a class of sample_trackers stands in for a tool."""

    def use(**tools: str) -> None:
        for tool, cls in tools.items():
            monkeypatch.setitem(tracking.ADAPTERS, tool, f"sample_trackers:{cls}")

    return use


@pytest.fixture
def recorder(adapters):
    """The events the recording adapter saw; it stands in for ClearML, a broken one for
    Langfuse."""
    adapters(clearml="Recorder", langfuse="Broken")
    sample_trackers.EVENTS.clear()
    return sample_trackers.EVENTS


def test_pipeline_tells_the_tracker_every_stage(prefect_harness, home, tmp_path, recorder):
    summary = run_pipeline(tmp_path, hpo={"n_trials": 4}, tracking={"clearml": {}})
    kinds = [e[0] for e in recorder]
    assert kinds[0] == "started" and kinds[-2:] == ["finished", "closed"]
    context = recorder[0][1]
    assert context.kind == "pipeline" and context.name == "quad"
    assert context.flow_run_id and context.flow_run_url.startswith("http")
    steps = [e[1] for e in recorder if e[0] == "record"]
    trials = [s for s in steps if s.kind == "trial"]
    assert sorted(s.number for s in trials) == [0, 1, 2, 3]
    assert all(s.status == "ok" and "loss" in s.metrics and s.run_dir for s in trials)
    train, evaluate = steps[-2:]
    assert (train.kind, evaluate.kind) == ("train", "evaluate")
    assert evaluate.metrics["test_loss"] == summary["metrics"]["test_loss"]
    assert evaluate.artifacts["pred.hdf5"].is_file()
    status, metrics, artifacts, _ = recorder[-2][1]
    assert status == "ok" and metrics == summary["metrics"]
    assert artifacts["submission"].name == "quad-1" and artifacts["report"].is_file()


def test_a_failed_gate_is_reported_once_with_the_metrics(prefect_harness, home, tmp_path, recorder):
    with pytest.raises(GateFailed):
        run_pipeline(
            tmp_path, hpo={"n_trials": 2}, gates=["test_loss:lt:-1"], tracking={"clearml": {}}
        )
    finished = [e[1] for e in recorder if e[0] == "finished"]
    assert len(finished) == 1
    status, metrics, _, message = finished[0]
    assert status == "gate-failed" and "test_loss" in metrics and "test_loss" in message


def test_a_breaking_tool_is_switched_off_and_the_run_goes_on(
    prefect_harness, home, tmp_path, recorder, adapters
):
    adapters(clearml="Broken", langfuse="Recorder")
    summary = run_pipeline(
        tmp_path,
        hpo={"n_trials": 2},
        submit={"enabled": False},
        tracking={"clearml": {}, "langfuse": {}},
    )
    assert summary["metrics"]["test_loss"] >= 0
    assert len(summary["tracking_warnings"]) == 1
    assert "broken tracking failed in record" in summary["tracking_warnings"][0]
    assert "tracking server went away" in summary["tracking_warnings"][0]
    # The other tool saw the whole run.
    assert [e[0] for e in recorder][-2:] == ["finished", "closed"]


def test_unknown_tool_or_bad_settings_stop_the_run_before_any_work(
    prefect_harness, home, tmp_path, recorder
):
    # The flow's settings parameter is checked before the run starts.
    with pytest.raises(ParameterTypeError, match=r"settings\.tracking\.mlflow: Extra inputs"):
        run_pipeline(tmp_path, tracking={"mlflow": {}})
    with pytest.raises(ParameterTypeError, match=r"settings\.tracking\.clearml\.colour: Extra"):
        run_pipeline(tmp_path, tracking={"clearml": {"colour": "red"}})
    # The same from a config file or --set: one line naming the tool and what is accepted.
    with pytest.raises(
        ExpflowError,
        match="pipeline setting 'tracking.mlflow' is not known; accepted: clearml, langfuse",
    ):
        load_pipeline_settings(None, {"tracking": {"mlflow": {}}})
    with pytest.raises(ExpflowError, match="'tracking.clearml.colour' is not known; accepted:"):
        load_pipeline_settings(None, {"tracking": {"clearml": {"colour": "red"}}})
    # Settings the tool's adapter refuses stop the run before any work, too.
    with pytest.raises(ExpflowError, match="tracking.clearml: .*unexpected keyword"):
        run_pipeline(tmp_path, tracking={"clearml": {"project": "p"}})
    assert recorder == []
    assert not (tmp_path / "journal.log").exists()


def test_missing_sdk_names_the_extra(monkeypatch):
    with pytest.raises(ExpflowError) as err:
        tracking.require_sdk("no_such_sdk_xyz", "clearml", "ClearML tracking")
    assert str(err.value) == (
        "ClearML tracking needs the no_such_sdk_xyz package: pip install 'expflow-flows[clearml]'"
    )


def run_sweep(**changes):
    """The grid sweep of test_sweep_flow; ``changes`` are sweep settings over it."""
    from test_sweep_flow import GRID

    from expflow_flows.flows.sweep import sweep

    settings = {"name": "grid", "trainable": "sample_trainables:sweep_square", "space": GRID}
    return sweep(settings={**settings, **changes})


def test_sweep_reports_start_end_and_combinations_only_when_asked(
    prefect_harness, home, recorder, adapters
):
    adapters(clearml="Recorder", langfuse="ComboRecorder")
    summary = run_sweep(name="tracked", tracking={"clearml": {}})
    kinds = [e[0] for e in recorder]
    assert kinds == ["started", "finished", "closed"]  # no combination by default
    assert recorder[0][1].kind == "sweep" and recorder[0][1].name == "tracked"
    status, metrics, artifacts, _ = recorder[1][1]
    assert status == "ok" and metrics["combinations"] == 12 and metrics["n_ok"] == 12
    assert metrics["best_value"] == summary["best"][0]["metric:value"]
    assert artifacts["results.csv"].is_file() and artifacts["dashboard"].is_file()

    recorder.clear()
    run_sweep(name="tracked", tracking={"langfuse": {}})  # all cached: still reported
    combos = [e[1] for e in recorder if e[0] == "record"]
    assert len(combos) == 12 and all(c.kind == "combination" for c in combos)
    assert {(c.params["x"], c.params["y"]) for c in combos} == {
        (x, y) for x in (1, 2, 3, 4) for y in (0.0, 0.5, 1.0)
    }
    assert all(c.metrics["value"] == (c.params["x"] - 3) ** 2 + c.params["y"] for c in combos)


def test_settings_are_checked_without_building_any_client(monkeypatch):
    """What the CLI checks before it starts a flow: names, shapes, installed SDKs."""
    import importlib.util

    tracking.check_settings({})
    tracking.check_settings({"clearml": {"project": "p"}})  # installed here
    with pytest.raises(ExpflowError, match="tracking tool 'wandb' is not known"):
        tracking.check_settings({"wandb": {}})
    with pytest.raises(ExpflowError, match="tracking.clearml must be a mapping"):
        tracking.check_settings({"clearml": ["p"]})
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "langfuse" else real(name)
    )
    with pytest.raises(ExpflowError) as err:
        tracking.check_settings({"langfuse": {}})
    assert str(err.value) == (
        "Langfuse tracking needs the langfuse package: pip install 'expflow-flows[langfuse]'"
    )
    tracking.check_settings({"langfuse": {"enabled": False}})  # off: no SDK needed
