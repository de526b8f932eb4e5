"""Prefect events for outcomes that automations act on.

A failed gate, a sweep above its failure ratio and a failed audit each emit an event
whose resource is the experiment and whose related resources carry the metric, its
value and the threshold (role ``metric``) and the flow run and deployment (Prefect's
own resource ids), so an automation can pause that deployment or notify someone.
``expflow server automations`` (run by ``make deploy``) installs the one that pauses
a deployment whose gate failed.
"""

from __future__ import annotations

import logging
from typing import Any

GATE_FAILED = "expflow.gate.failed"
SWEEP_FAILURES = "expflow.sweep.failure-ratio-exceeded"
AUDIT_FAILED = "expflow.audit.failed"

log = logging.getLogger("expflow.events")


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def metric_resource(metric: str, value: Any, op: str, threshold: Any) -> dict[str, str]:
    """A related resource naming a metric, its value and the threshold it was held to."""
    return {
        "prefect.resource.id": f"expflow.metric.{metric}",
        "prefect.resource.role": "metric",
        "prefect.resource.name": metric,
        "expflow.value": _number(value),
        "expflow.op": str(op),
        "expflow.threshold": _number(threshold),
    }


def _run_resources() -> list[dict[str, str]]:
    """This flow run and its deployment, as Prefect names them."""
    from prefect.runtime import deployment, flow_run

    out = []
    run_id = flow_run.get_id()
    if run_id:
        out.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.role": "flow-run",
            }
        )
    deployment_id = deployment.get_id()
    if deployment_id:
        out.append(
            {
                "prefect.resource.id": f"prefect.deployment.{deployment_id}",
                "prefect.resource.role": "deployment",
            }
        )
    return out


def emit(event: str, subject: str, related: list[dict[str, str]], payload: dict[str, Any]) -> None:
    """Emit ``event`` about experiment ``subject``; a failure to emit is logged, never raised."""
    try:
        from prefect.events import emit_event

        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"expflow.experiment.{subject}",
                "prefect.resource.name": subject,
            },
            related=[*related, *_run_resources()],
            payload=payload,
        )
    except Exception as exc:  # noqa: BLE001 - an event must not change the run's outcome
        log.warning("event %s not emitted: %s", event, exc)
