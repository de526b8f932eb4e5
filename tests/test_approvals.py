"""Approvals instead of PINs in deployment runs: the submission pauses for the UI's
Resume form (Prefect's pause_flow_run with wait_for_input) and is audited either way.

Prefect's test harness (a real API and database); the run is marked as a deployment's
the way tests/test_offpeak_flow.py does it; the approval comes through the API the UI
uses (resume_flow_run with the form's input)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from test_pipeline import SPACE, run_pipeline

from expflow_flows.governance import pin

PIN = "24681357"


@pytest.fixture
def deployment_run(prefect_harness, home, monkeypatch):
    pin.init_pin(PIN)
    monkeypatch.delenv(pin.PIN_ENV, raising=False)
    monkeypatch.setattr("prefect.runtime.deployment.get_id", lambda: "a-deployment")
    return home


def start(tmp_path, **changes):
    """The pipeline in a thread; returns (thread, box with its final state)."""
    box: dict = {}

    def go():
        from expflow_flows.flows.pipeline import pipeline
        from expflow_flows.settings.base import deep_merge

        settings = {
            "experiment": "approve",
            "train": {"target": "sample_trainables:quadratic", "budget": {"epochs": 2}},
            "evaluate": "sample_trainables:evaluate_with_pred",
            "space": SPACE,
            "params": {},
            "objective": "loss",
            "hpo": {"n_trials": 2, "pruner": "none", "storage": str(tmp_path / "j.log")},
            "cluster": {"kind": "threads", "workers": 2},
            "gates": ["test_loss:lt:100"],
            "submit": {"to": str(tmp_path / "submissions"), "name": "approve-1"},
        }
        # force ticked, as any UI user could: it must not skip the approval
        box["state"] = pipeline(
            settings=deep_merge(settings, changes), force=True, return_state=True
        )

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, box


def paused_run(timeout: float = 120.0):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state={"type": {"any_": ["PAUSED"]}})
            )
            if runs:
                return runs[0]
            time.sleep(0.5)
    raise AssertionError("the run never paused for approval")


def audit_lines(home) -> list[dict]:
    return [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]


def test_a_deployment_run_waits_for_approval_with_the_pin_and_then_submits(
    deployment_run, tmp_path
):
    from prefect.flow_runs import resume_flow_run

    thread, box = start(tmp_path)
    run = paused_run()
    # the UI's form: the schema Prefect stored for the Resume dialog asks for both
    assert run.state.state_details.run_input_keyset
    resume_flow_run(run.id, run_input={"approve": True, "pin": PIN})
    thread.join(180)
    state = box["state"]
    assert state.is_completed(), state.message
    bundle = state.result()["bundle"]
    assert bundle and (tmp_path / "submissions").exists()
    submits = [a for a in audit_lines(deployment_run) if a["action"] == "submit"]
    assert [a["outcome"] for a in submits] == ["allowed"]
    assert PIN not in (deployment_run / "audit.log").read_text()


def test_a_wrong_pin_refuses_counts_and_is_audited(deployment_run, tmp_path):
    from prefect.flow_runs import resume_flow_run

    thread, box = start(tmp_path)
    run = paused_run()
    resume_flow_run(run.id, run_input={"approve": True, "pin": "11111111"})
    thread.join(180)
    state = box["state"]
    assert state.is_failed() and "wrong PIN for submit" in state.message
    assert pin.pin_status()["failures"] == 1
    assert not (tmp_path / "submissions").exists()
    assert [a["outcome"] for a in audit_lines(deployment_run) if a["action"] == "submit"] == [
        "refused"
    ]


def test_no_answer_in_time_submits_nothing_and_says_so(deployment_run, tmp_path):
    thread, box = start(tmp_path, submit={"approval_timeout": 3, "to": str(tmp_path / "subs")})
    thread.join(180)
    state = box["state"]
    assert state.is_failed()
    assert "submit was not approved within" in state.message and "nothing was done" in state.message
    assert not (tmp_path / "subs").exists()
    refused = [a for a in audit_lines(deployment_run) if a["outcome"] == "refused"]
    assert refused and "not approved" in refused[-1]["reason"]


def test_outside_a_deployment_a_missing_pin_is_refused_up_front_and_audited(
    prefect_harness, home, monkeypatch, tmp_path
):
    pin.init_pin(PIN)
    monkeypatch.delenv(pin.PIN_ENV, raising=False)
    state = run_pipeline(tmp_path, hpo={"n_trials": 1}, return_state=True)
    assert state.is_failed() and "no PIN was given" in state.message
    assert any(a["action"] == "submit" and a["outcome"] == "refused" for a in audit_lines(home))
