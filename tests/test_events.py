"""Prefect events for a failed gate and a sweep above its failure ratio, read back from
the API (Prefect's test harness, a real server and database)."""

from __future__ import annotations

import time

from test_pipeline import run_pipeline


def events_named(name: str, timeout: float = 60.0) -> list[dict]:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            resp = client.request(
                "POST", "/events/filter", json={"filter": {"event": {"name": [name]}}}
            )
            found = resp.json().get("events", [])
            if found or time.monotonic() > deadline:
                return found
            time.sleep(1)


def test_a_failed_gate_emits_an_event_with_the_metric_value_and_threshold(
    prefect_harness, home, tmp_path
):
    state = run_pipeline(
        tmp_path,
        experiment="quad-gate-event",
        hpo={"n_trials": 2},
        gates=["test_loss:lt:0.0"],
        return_state=True,
    )
    assert state.is_failed()
    found = events_named("expflow.gate.failed")
    assert found, "no gate event"
    event = found[0]
    assert event["resource"]["prefect.resource.id"] == "expflow.experiment.quad-gate-event"
    metric = next(r for r in event["related"] if r["prefect.resource.role"] == "metric")
    assert metric["prefect.resource.name"] == "test_loss"
    assert metric["expflow.op"] == "lt" and metric["expflow.threshold"] == "0"
    assert float(metric["expflow.value"]) > 0
    assert any(r["prefect.resource.role"] == "flow-run" for r in event["related"])


def test_a_sweep_above_its_failure_ratio_emits_an_event(prefect_harness, home):
    from expflow_flows.flows.sweep import sweep

    state = sweep(
        settings={
            "name": "mostly-failing",
            "trainable": "sample_trainables:raises",
            "space": {"grid": {"x": [1, 2]}},
            "max_failure_ratio": 0.1,
        },
        return_state=True,
    )
    assert state.is_failed()
    found = events_named("expflow.sweep.failure-ratio-exceeded")
    assert found and found[0]["resource"]["prefect.resource.name"] == "mostly-failing"
    metric = next(r for r in found[0]["related"] if r["prefect.resource.role"] == "metric")
    assert metric["prefect.resource.name"] == "failure_ratio" and metric["expflow.value"] == "1"


def test_a_sweep_whose_every_combination_failed_says_so(prefect_harness, home):
    """Before: with an objective set, it ended 'objective 'loss' is not a metric of this
    sweep; metrics: none', which hides that nothing ran successfully."""
    from expflow_flows.flows.sweep import sweep

    state = sweep(
        settings={
            "name": "all-failing",
            "trainable": "sample_trainables:raises",
            "space": {"grid": {"x": [1, 2]}},
            "objective": "loss",
        },
        return_state=True,
    )
    assert state.is_failed()
    assert "all 2 combinations of sweep 'all-failing' failed" in state.message, state.message
