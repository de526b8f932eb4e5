"""Acting on Prefect flow runs (orchestration): used by the CLI and the MCP server alike."""

from __future__ import annotations

from expflow_flows.errors import ExpflowError


def cancel_flow_run(flow_run_id: str, wait: float) -> str:
    """Ask Prefect to cancel a flow run and wait until it is final; returns its state type."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(flow_run_id)
        except Exception as exc:  # noqa: BLE001 - unknown id or unreachable API
            raise ExpflowError(
                f"flow run {flow_run_id} cannot be read from Prefect: {exc}"
            ) from None
        if run.state is not None and run.state.is_final():
            return run.state.type.value
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state.type.value
            time.sleep(1)
        state = client.read_flow_run(flow_run_id).state
        return state.type.value if state else "UNKNOWN"
