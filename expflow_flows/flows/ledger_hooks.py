"""Prefect state hooks that keep the experiment ledger in step with the real flow run.

``on_running`` registers the run (or finds the row a caller registered), and the
end hooks move it to COMPLETED, FAILED or CANCELLED with Prefect's state message.
A ledger problem is logged and never changes the flow run's own outcome.
"""

from __future__ import annotations

import logging
from typing import Any

from expflow_flows.ledger import Ledger

log = logging.getLogger("expflow.ledger")


def _experiment_name(flow: Any, flow_run: Any) -> tuple[str, str, dict[str, Any]]:
    """Name, trainable and params of the run, from its parameters (config file included)."""
    params = dict(flow_run.parameters or {})
    try:
        from expflow_flows.config import build_config

        fields = {k: v for k, v in params.items() if k not in ("config", "force")}
        cfg = build_config(params.get("config"), **fields)
        return cfg.experiment, cfg.train, cfg.to_dict()
    except Exception:  # noqa: BLE001 - a bad config fails the flow itself; the row still exists
        return str(params.get("experiment") or flow.name), str(params.get("train") or ""), params


def _row(flow: Any, flow_run: Any, ledger: Ledger):
    row = ledger.find_by_flow_run(str(flow_run.id))
    if row is None:
        name, trainable, params = _experiment_name(flow, flow_run)
        row = ledger.register(
            name,
            kind=flow.name,
            trainable=trainable,
            params=params,
            flow_run_id=str(flow_run.id),
        )
    return row


def _move(flow: Any, flow_run: Any, state: Any, target: str) -> None:
    try:
        ledger = Ledger()
        row = _row(flow, flow_run, ledger)
        if row.state != target:
            ledger.move_to(row.id, target, message=str(state.message or state.name or ""))
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not break the run
        log.warning("ledger not updated for flow run %s: %s", flow_run.id, exc)


def on_running(flow: Any, flow_run: Any, state: Any) -> None:
    """Register the run in the ledger and mark it RUNNING."""
    _move(flow, flow_run, state, "RUNNING")


def on_completion(flow: Any, flow_run: Any, state: Any) -> None:
    """Mark the run COMPLETED."""
    _move(flow, flow_run, state, "COMPLETED")


def on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Mark the run FAILED with Prefect's message (a gate, a stage, no trial succeeded)."""
    _move(flow, flow_run, state, "FAILED")


def on_crashed(flow: Any, flow_run: Any, state: Any) -> None:
    """A crashed run (killed process, lost infrastructure) is FAILED in the ledger."""
    _move(flow, flow_run, state, "FAILED")


def on_cancellation(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect confirmed the cancellation: CANCELLED."""
    _move(flow, flow_run, state, "CANCELLED")


def record_outputs(flow_run_id: str, *, params: dict, metrics: dict, run_dir: str) -> str | None:
    """Store a finished run's parameters, metrics and folder on its ledger row; returns its id."""
    if not flow_run_id:
        return None
    try:
        ledger = Ledger()
        row = ledger.find_by_flow_run(flow_run_id)
        if row is not None:
            ledger.update(row.id, params=params, metrics=metrics, run_dir=run_dir)
            return row.id
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not break the run
        log.warning("ledger not updated for flow run %s: %s", flow_run_id, exc)
    return None


HOOKS: dict[str, list[Any]] = {
    "on_running": [on_running],
    "on_completion": [on_completion],
    "on_failure": [on_failure],
    "on_crashed": [on_crashed],
    "on_cancellation": [on_cancellation],
}
