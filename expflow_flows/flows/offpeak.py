"""Off-peak deferral for flows: a run triggered in peak hours moves itself to the window.

A deployment run that should wait schedules a new run of the same deployment,
with the same parameters, at the window's start, and ends at once: it holds no
worker slot while it waits. A run started outside a deployment (Python, CLI)
has no deployment to hand over to, so it waits in its own process.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelled, Scheduled

from expflow_flows.errors import ExpflowError
from expflow_flows.flows.ledger_hooks import forget_flow_run
from expflow_flows.governance.offpeak import OffPeakPolicy

TRIGGER_TAG = "offpeak-triggered:"


def defer(
    deployment_id: str, parameters: dict[str, Any], start_at: dt.datetime, triggered_at: dt.datetime
) -> str:
    """Schedule a run of ``deployment_id`` at ``start_at``; returns the new flow run's id."""
    with get_client(sync_client=True) as client:
        new = client.create_flow_run_from_deployment(
            deployment_id,
            parameters=parameters,
            state=Scheduled(scheduled_time=start_at),
            tags=["offpeak-deferred", f"{TRIGGER_TAG}{triggered_at.isoformat()}"],
        )
    return str(new.id)


def _triggered_at(now: dt.datetime) -> dt.datetime:
    """When the user first triggered this run (kept across deferrals in a tag)."""
    for tag in flow_run.get_tags() or []:
        if tag.startswith(TRIGGER_TAG):
            return dt.datetime.fromisoformat(tag.removeprefix(TRIGGER_TAG))
    return now


def hold_for_offpeak(
    spec: dict[str, Any] | None, policy: OffPeakPolicy | None = None
) -> dict | None:
    """At a flow's start: None to go on now, or the deferral's summary for the flow to return."""
    if not spec and policy is None:
        return None
    policy = policy or OffPeakPolicy.from_dict(spec or {})
    logger = get_run_logger()
    now = policy.clock()
    decision = policy.decide(triggered_at=_triggered_at(now))
    if decision.action == "run":
        logger.info("off-peak policy: running now (%s)", decision.reason)
        return None
    if decision.action == "fail":
        raise ExpflowError(f"off-peak policy: {decision.reason}")
    deployment_id = deployment.get_id()
    if deployment_id:
        new_id = defer(
            str(deployment_id),
            dict(flow_run.get_parameters() or {}),
            decision.start_at,
            _triggered_at(now),
        )
        logger.info("off-peak policy: %s; deferred as flow run %s", decision.reason, new_id)
        # Not an experiment yet: the run that does the work registers itself when it starts.
        forget_flow_run(str(flow_run.get_id() or ""))
        return {
            "deferred_to": decision.start_at.isoformat(),
            "flow_run_id": new_id,
            "reason": decision.reason,
        }
    wait = (decision.start_at - now).total_seconds()
    logger.info("off-peak policy: %s; waiting %.0f s in this process", decision.reason, wait)
    time.sleep(max(0.0, wait))
    return None


def deferred_state(deferred: dict[str, Any]) -> Any:
    """How a deferred run ends: not Completed (it produced nothing), but 'Deferred', saying
    when and as which flow run the work happens."""
    return Cancelled(
        name="Deferred",
        message=f"off-peak policy: {deferred['reason']}; the work runs as flow run "
        f"{deferred['flow_run_id']}",
    )
