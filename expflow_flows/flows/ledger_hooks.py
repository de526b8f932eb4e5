"""Prefect state hooks that keep the experiment ledger in step with the real flow run.

``on_running`` registers the run (or finds the row a caller registered), and the
end hooks move it to COMPLETED, FAILED or CANCELLED with Prefect's state message.
A ledger problem is logged and never changes the flow run's own outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from expflow_flows.governance.ledger import Ledger
from expflow_flows.secrets import scrub

log = logging.getLogger("expflow.ledger")


Describe = Callable[[dict[str, Any]], tuple[str, str, dict[str, Any]]]


def describe_pipeline(parameters: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Name, trainable and settings of a pipeline run (its config file included)."""
    from expflow_flows.settings.pipeline import load_pipeline_settings

    settings = load_pipeline_settings(parameters.get("config"), parameters.get("settings"))
    return settings.experiment, settings.train.label, settings.to_dict()


def describe_sweep(parameters: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Name, trainable (or chain) and settings of a sweep run (its config file included)."""
    from expflow_flows.settings.sweep import load_sweep_settings

    settings = load_sweep_settings(parameters.get("config"), parameters.get("settings"))
    return settings.name, settings.label, settings.to_dict()


def _row(flow: Any, flow_run: Any, ledger: Ledger, describe: Describe):
    row = ledger.find_by_flow_run(str(flow_run.id))
    if row is None:
        params = dict(flow_run.parameters or {})
        try:
            name, trainable, settings = describe(params)
        except Exception:  # noqa: BLE001 - bad settings fail the flow itself; the row still exists
            given = params.get("settings") if isinstance(params.get("settings"), dict) else {}
            name = str(given.get("experiment") or given.get("name") or flow.name)
            trainable, settings = "", params
        row = ledger.register(
            name,
            kind=flow.name,
            trainable=trainable,
            params=scrub(settings),
            flow_run_id=str(flow_run.id),
        )
    return row


def _mover(target: str, describe: Describe) -> Callable[[Any, Any, Any], None]:
    def hook(flow: Any, flow_run: Any, state: Any) -> None:
        try:
            ledger = Ledger()
            row = _row(flow, flow_run, ledger, describe)
            if row.state != target:
                ledger.move_to(row.id, target, message=str(state.message or state.name or ""))
            if target == "RUNNING":
                ledger.claim(row.id)  # so a run whose process dies is found and failed
                ledger.reconcile()  # and those of earlier runs that died are failed now
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not break the run
            log.warning("ledger not updated for flow run %s: %s", flow_run.id, exc)

    hook.__name__ = f"ledger_{target.lower()}"
    return hook


def record_outputs(flow_run_id: str, *, params: dict, metrics: dict, run_dir: str) -> str | None:
    """Store a finished run's parameters, metrics and folder on its ledger row; returns its id."""
    if not flow_run_id:
        return None
    try:
        ledger = Ledger()
        row = ledger.find_by_flow_run(flow_run_id)
        if row is not None:
            ledger.update(row.id, params=scrub(params), metrics=metrics, run_dir=run_dir)
            return row.id
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not break the run
        log.warning("ledger not updated for flow run %s: %s", flow_run_id, exc)
    return None


def forget_flow_run(flow_run_id: str) -> None:
    """Remove the ledger row of a flow run that did no work (it deferred itself)."""
    if not flow_run_id:
        return
    try:
        ledger = Ledger()
        row = ledger.find_by_flow_run(flow_run_id)
        if row is not None and not row.metrics:
            ledger.delete(row.id)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not break the run
        log.warning("ledger row of flow run %s not removed: %s", flow_run_id, exc)


def hooks_for(describe: Describe) -> dict[str, list[Any]]:
    """State hooks for a flow: register on running; completed, failed (crashed too), cancelled."""
    return {
        "on_running": [_mover("RUNNING", describe)],
        "on_completion": [_mover("COMPLETED", describe)],
        "on_failure": [_mover("FAILED", describe)],
        "on_crashed": [_mover("FAILED", describe)],
        "on_cancellation": [_mover("CANCELLED", describe)],
    }
