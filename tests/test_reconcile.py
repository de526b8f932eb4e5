"""Runs whose process died are reconciled: the ledger fails them and Prefect marks their flow
runs crashed, the first time anyone lists runs, instead of showing them RUNNING forever."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from typer.testing import CliRunner

from expflow_flows.governance.ledger import Ledger

CHILD = textwrap.dedent(
    """
    import sys, time
    from expflow_flows.governance.ledger import Ledger
    ledger = Ledger()
    row = ledger.register("doomed", kind="pipeline", flow_run_id=sys.argv[1] or None)
    ledger.move_to(row.id, "RUNNING")
    ledger.claim(row.id)  # what the flow's on_running hook does
    print(row.id, flush=True)
    time.sleep(600)
    """
)


async def _running_flow_run() -> str:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="doomed")
    def doomed() -> None: ...

    async with get_client() as client:
        run = await client.create_flow_run(doomed)
        await client.set_flow_run_state(run.id, Running(), force=True)
        return str(run.id)


async def _state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_flow_run(flow_run_id)).state.type.value


def test_a_killed_run_is_failed_in_the_ledger_and_crashed_in_prefect(prefect_harness, home):
    from expflow_flows.cli.app import app

    flow_run_id = asyncio.run(_running_flow_run())
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, flow_run_id], stdout=subprocess.PIPE, text=True
    )
    killed_id = child.stdout.readline().strip()
    # A run that is alive, in this very process, stays RUNNING.
    ledger = Ledger()
    alive = ledger.register("alive", kind="pipeline")
    ledger.move_to(alive.id, "RUNNING")
    ledger.claim(alive.id)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert Ledger().get(killed_id).state == "RUNNING"  # nothing else would ever end it

    listed = CliRunner().invoke(app, ["runs", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["id"]: r for r in json.loads(listed.output)}
    assert rows[killed_id]["state"] == "FAILED"
    assert f"pid {child.pid}" in rows[killed_id]["message"] and "gone" in rows[killed_id]["message"]
    assert rows[alive.id]["state"] == "RUNNING"
    assert asyncio.run(_state(flow_run_id)) == "CRASHED"


def test_a_flow_run_whose_heartbeat_stops_is_crashed_and_its_ledger_row_failed(
    prefect_harness, home
):
    # What `make deploy` ships (expflow server automations), with a short window.
    from prefect.events import emit_event

    from expflow_flows.cli.app import app
    from expflow_flows.server import ensure_zombie_automation

    automation = ensure_zombie_automation(within_s=15)
    assert ensure_zombie_automation(within_s=15) == automation  # created once
    flow_run_id = asyncio.run(_running_flow_run())
    row = Ledger().register("remote", kind="pipeline", flow_run_id=flow_run_id)
    Ledger().move_to(row.id, "RUNNING")  # running on another node: no process here to check
    # One heartbeat from the worker's node, then silence (the node went down).
    emit_event(
        event="prefect.flow-run.heartbeat",
        resource={"prefect.resource.id": f"prefect.flow-run.{flow_run_id}"},
    )
    try:
        deadline = time.monotonic() + 120
        while asyncio.run(_state(flow_run_id)) != "CRASHED":
            assert time.monotonic() < deadline, "the flow run was never marked crashed"
            time.sleep(3)
    finally:
        # The session's server is shared: later tests' long flow runs must not meet it.
        from prefect.automations import Automation

        Automation.read(id=automation).delete()
    listed = CliRunner().invoke(app, ["runs", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["id"]: r for r in json.loads(listed.output)}
    assert rows[row.id]["state"] == "FAILED" and "crashed" in rows[row.id]["message"]
