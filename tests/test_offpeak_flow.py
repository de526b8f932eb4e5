"""Off-peak deferral with Prefect: a deployment run triggered at 14:00 becomes a run at 22:00.

The clock is simulated; the deployment, the flow runs and their schedules are real
(Prefect's test harness)."""

from __future__ import annotations

import datetime as dt

import pytest

from expflow_flows.governance.offpeak import OffPeakPolicy

BERLIN = dt.timezone(dt.timedelta(hours=1))
POLICY = {"windows": ["22:00-08:00"], "timezone": "Europe/Berlin", "weekends": False}


def at(hour: int) -> dt.datetime:
    return dt.datetime(2026, 11, 23, hour, 0, tzinfo=BERLIN)


@pytest.fixture
def deployment_id(prefect_harness):
    from expflow_flows.flows.sweep import sweep

    return str(sweep.to_deployment(name="offpeak-test").apply())


def test_a_deployment_run_triggered_at_14_is_deferred_to_22(deployment_id, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from expflow_flows.flows import offpeak

    policy = OffPeakPolicy.from_dict(POLICY, clock=lambda: at(14))
    seen = {}

    # The probe flow stands in for a run of the deployment, as a worker would start it.
    monkeypatch.setattr("prefect.runtime.deployment.get_id", lambda: deployment_id)

    @flow
    def probe():
        seen["result"] = offpeak.hold_for_offpeak(None, policy=policy)

    probe()
    result = seen["result"]
    assert result["deferred_to"] == at(22).isoformat()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(result["flow_run_id"])
    assert run.state.is_scheduled()
    assert run.state.state_details.scheduled_time == at(22)
    assert str(run.deployment_id) == deployment_id
    assert any(t.startswith("offpeak-triggered:") for t in run.tags)


def test_inside_the_window_the_flow_runs_at_once(prefect_harness):
    from prefect import flow

    from expflow_flows.flows import offpeak

    policy = OffPeakPolicy.from_dict(POLICY, clock=lambda: at(23))

    @flow
    def probe():
        return offpeak.hold_for_offpeak(None, policy=policy)

    assert probe() is None


def test_past_the_maximum_wait_a_failing_policy_fails_the_flow(prefect_harness, home):
    from expflow_flows.flows.sweep import sweep

    now = dt.datetime.now(dt.UTC)
    closed = f"{now + dt.timedelta(hours=2):%H:%M}-{now + dt.timedelta(hours=3):%H:%M}"
    state = sweep(
        settings={
            "name": "never",
            "trainable": "sample_trainables:sweep_square",
            "space": {"grid": {"x": [1]}},
            "offpeak": {
                "windows": [closed],
                "weekends": False,
                "max_wait_hours": 1,
                "on_timeout": "fail",
            },
        },
        return_state=True,
    )
    assert state.is_failed()
    assert "off-peak policy" in state.message and "maximum wait" in state.message
    assert not (home / "runs" / "never").exists()  # nothing ran


def test_a_deferred_deployment_run_is_no_experiment_and_says_when_in_the_policys_zone(
    deployment_id, home, monkeypatch
):
    """Before: the deferring run ended Completed (green, 0 task runs) with a COMPLETED
    ledger row and no metrics, which the next audit failed; its time was in UTC."""
    from zoneinfo import ZoneInfo

    from prefect.client.orchestration import get_client

    from expflow_flows.flows.sweep import sweep
    from expflow_flows.governance.ledger import Ledger

    monkeypatch.setattr("prefect.runtime.deployment.get_id", lambda: deployment_id)
    local = dt.datetime.now(ZoneInfo("America/New_York"))
    opens = local + dt.timedelta(hours=2)
    window = f"{opens:%H:%M}-{opens + dt.timedelta(hours=1):%H:%M}"
    state = sweep(
        settings={
            "name": "tonight",
            "trainable": "sample_trainables:sweep_square",
            "space": {"grid": {"x": [1]}},
            "offpeak": {"windows": [window], "timezone": "America/New_York", "weekends": False},
        },
        return_state=True,
    )
    assert state.type.value == "CANCELLED" and state.name == "Deferred"
    assert f"off-peak from {opens:%Y-%m-%d %H:%M} America/New_York" in state.message
    new_id = state.message.rsplit("flow run ", 1)[1]
    with get_client(sync_client=True) as client:
        scheduled = client.read_flow_run(new_id)
    assert scheduled.state.is_scheduled()
    assert Ledger().list() == []  # no experiment until the scheduled run starts
