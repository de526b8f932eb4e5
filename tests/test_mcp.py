"""`expflow mcp` end to end: the SDK's own client over stdio, as a research agent uses it.

One real `prefect server start` and one `expflow mcp` process serve the whole module.
The server's stdout is teed to a file on its way to the client, so the last test can
check that nothing but JSON-RPC ever went out on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("mcp", reason="the mcp extra is not installed")

from anyio.from_thread import start_blocking_portal  # noqa: E402
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.types import CallToolResult  # noqa: E402
from test_deployment import prefect, server  # noqa: E402, F401 - the module's Prefect server

from expflow_flows.governance.ledger import Ledger  # noqa: E402

EXPFLOW = str(Path(sys.executable).with_name("expflow"))
PIN = "73915824"
WRONG = "40628517"


def finished(name: str, metrics: dict, **kw) -> object:
    ledger = Ledger()
    row = ledger.register(name, trainable="pkg.mod:train", **kw)
    ledger.move_to(row.id, "RUNNING")
    ledger.update(row.id, metrics=metrics)
    return ledger.move_to(row.id, "COMPLETED")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    """This module's expflow home, shared by the test process and the MCP server; a PIN is set."""
    h = tmp_path_factory.mktemp("mcp") / "expflow"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPFLOW_HOME", str(h))
        mp.delenv("EXPFLOW_RUNS_ROOT", raising=False)
        from expflow_flows.governance import pin

        pin.init_pin(PIN)
        yield h


@pytest.fixture(scope="module")
def audit_deployment(server):  # noqa: F811
    """The `daily-audit` deployment of prefect.yaml, registered with `prefect deploy`.

    No worker serves its pool, so a run started from it stays SCHEDULED.
    """
    prefect(server, "work-pool", "create", "expflow-local", "--type", "process")
    prefect(server, "deploy", "--name", "daily-audit")
    return server


class Agent:
    """A blocking handle on an MCP ClientSession that lives in a portal's event loop."""

    def __init__(self, portal, session: ClientSession) -> None:
        self.portal = portal
        self.session = session

    def call(self, tool: str, **arguments) -> CallToolResult:
        return self.portal.call(
            lambda: self.session.call_tool(
                tool, arguments, read_timeout_seconds=timedelta(seconds=120)
            )
        )

    def ok(self, tool: str, **arguments) -> dict:
        result = self.call(tool, **arguments)
        assert not result.isError, result.content[0].text
        return result.structuredContent

    def error(self, tool: str, **arguments) -> str:
        result = self.call(tool, **arguments)
        assert result.isError, result.structuredContent
        (content,) = result.content
        assert "\n" not in content.text, content.text
        return content.text


@asynccontextmanager
async def session(params: StdioServerParameters, errlog):
    async with stdio_client(params, errlog=errlog) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            yield s


@pytest.fixture(scope="module")
def agent(audit_deployment, home, tmp_path_factory) -> Iterator[Agent]:
    """`expflow mcp` spawned by the SDK's stdio client, its stdout teed to a file."""
    logs = tmp_path_factory.mktemp("mcp-logs")
    env = {
        **audit_deployment["env"],
        "EXPFLOW_HOME": str(home),
        # Set for the server on purpose: an agent must still give the PIN itself.
        "EXPFLOW_PIN": PIN,
    }
    command = f"set -o pipefail; {shlex.quote(EXPFLOW)} mcp | tee {shlex.quote(str(logs / 'stdout.jsonl'))}"
    params = StdioServerParameters(command="bash", args=["-c", command], env=env)
    with contextlib.ExitStack() as stack:
        errlog = stack.enter_context(open(logs / "stderr.log", "w"))
        portal = stack.enter_context(start_blocking_portal())
        s = stack.enter_context(portal.wrap_async_context_manager(session(params, errlog)))
        handle = Agent(portal, s)
        handle.logs = logs
        yield handle


# --- the tools an agent sees ------------------------------------------------------------


def test_tools_are_listed_with_typed_schemas(agent):
    tools = {t.name: t for t in agent.portal.call(agent.session.list_tools).tools}
    assert {
        "list_experiments",
        "show_experiment",
        "compare_experiments",
        "list_sweeps",
        "sweep_results",
        "list_reports",
        "read_report",
        "audit_experiment",
        "trace_costs",
        "list_deployments",
        "start_deployment_run",
        "flow_run_status",
        "cancel_flow_run",
        "retry_flow_run",
    } <= set(tools)
    compare = tools["compare_experiments"].inputSchema
    assert compare["required"] == ["metric"]
    assert compare["properties"]["limit"]["type"] == "integer"
    assert compare["properties"]["limit"]["maximum"] == 500
    directions = compare["properties"]["direction"]["anyOf"][0]["enum"]
    assert directions == ["minimize", "maximize"]
    states = tools["list_experiments"].inputSchema["properties"]["state"]["anyOf"][0]["enum"]
    assert "COMPLETED" in states and "CANCEL_PENDING" in states
    cancel = tools["cancel_flow_run"]
    assert cancel.annotations.destructiveHint is True
    assert "PIN" in cancel.description
    assert tools["show_experiment"].outputSchema["properties"]["history"]["type"] == "array"


def test_list_show_and_compare_the_ledger(agent, home):
    a = finished("fno-a", {"nrmse": 0.03, "train_time_min": 12.0}, params={"modes": 8})
    b = finished("fno-b", {"nrmse": 0.01, "train_time_min": 75.0})
    c = finished("fno-c", {"nrmse": 0.02, "train_time_min": 5.0})
    draft = Ledger().register("fno-d")

    listed = agent.ok("list_experiments")
    ids = [e["id"] for e in listed["experiments"]]
    assert ids[:4] == [draft.id, c.id, b.id, a.id]  # newest first
    done = agent.ok("list_experiments", state="COMPLETED", limit=2)
    assert [e["name"] for e in done["experiments"]] == ["fno-c", "fno-b"]

    shown = agent.ok("show_experiment", experiment_id=a.id)
    assert shown["params"] == {"modes": 8} and shown["metrics"]["nrmse"] == 0.03
    assert [h["to"] for h in shown["history"]] == ["DRAFT", "RUNNING", "COMPLETED"]

    ranked = agent.ok("compare_experiments", metric="nrmse")
    assert ranked["direction"] == "minimize"
    assert [r["name"] for r in ranked["rows"]][:3] == ["fno-b", "fno-c", "fno-a"]
    gated = agent.ok(
        "compare_experiments", metric="PDE/nrmse", gates=["train_time_min:lt:60"], limit=1
    )
    assert [r["name"] for r in gated["rows"]] == ["fno-c"] and gated["ranked"] == 2
    assert any(e["name"] == "fno-b" and "train_time_min" in e["why"] for e in gated["excluded"])


def test_mistakes_are_one_line_tool_errors_and_the_server_keeps_answering(agent):
    assert "424242" in agent.error("show_experiment", experiment_id="424242")
    bad_state = agent.error("list_experiments", state="RUNING")
    assert "state" in bad_state and "'COMPLETED'" in bad_state
    assert "'nrsme'" in agent.error("compare_experiments", metric="nrsme")
    gate = agent.error("compare_experiments", metric="nrmse", gates=["nrmse:below:1"])
    assert "below" in gate and "lt" in gate
    assert "limit" in agent.error("list_experiments", limit=0)
    assert "metric" in agent.error("compare_experiments")
    # Still answering, with the same ledger.
    assert agent.ok("list_experiments", limit=1)["count"] == 1


def test_trace_costs_come_from_the_ledger(agent):
    finished("agent-llm", {"nrmse": 0.05, "llm_cost_usd": 0.25, "llm_tokens": 1200})
    again = finished("agent-llm", {"nrmse": 0.04, "llm_cost_usd": 0.5})
    costs = agent.ok("trace_costs", name="agent-llm")
    assert costs["total_usd"] == pytest.approx(0.75)
    assert costs["with_cost"] == 2 and costs["by_name"] == {"agent-llm": pytest.approx(0.75)}
    assert costs["experiments"][1]["llm_metrics"]["llm_tokens"] == 1200
    one = agent.ok("trace_costs", experiment_id=again.id)
    assert [e["llm_cost_usd"] for e in one["experiments"]] == [0.5]
    everyone = agent.ok("trace_costs")
    assert everyone["without_cost"] >= 3  # the fno-* experiments have no LLM cost


def test_audit_an_experiment(agent):
    good = finished("audited-good", {"nrmse": 0.02})
    bad = finished("audited-bad", {"rmse": 0.02})  # no primary score
    passed = agent.ok("audit_experiment", experiment_id=good.id)
    assert passed["passed"] is True and "PASSED" in passed["markdown"]
    failed = agent.ok("audit_experiment", experiment_id=bad.id)
    assert failed["passed"] is False and failed["counts"]["fail"] >= 1
    assert "FAILED" in failed["summary"]


# --- sweeps and reports ---------------------------------------------------------------


def sweep_row(i: int, lr: float, seed: int, loss: float, status: str = "ok") -> dict:
    return {
        "key": f"k{i}",
        "combo_id": f"lr={lr},seed={seed}",
        "combo_index": i,
        "params": {"lr": lr, "seed": seed},
        "metrics": {"loss": loss},
        "status": status,
        "reason": "" if status == "ok" else "diverged",
    }


@pytest.fixture(scope="module")
def sweep(home) -> Path:
    from expflow_flows.sweep.store import ResultStore

    folder = home / "runs" / "tiny-sweep"
    store = ResultStore.for_sweep_dir(folder)
    store.record_many(
        [
            sweep_row(0, 0.1, 0, 1.0),
            sweep_row(1, 0.1, 1, 3.0),
            sweep_row(2, 0.01, 0, 0.5),
            sweep_row(3, 0.01, 1, 0.7),
            sweep_row(4, 0.001, 0, 0.1, status="failed"),
        ]
    )
    (folder / "metadata.json").write_text(json.dumps({"combinations": 6}))
    (folder / "status.html").write_text(
        "<html><head><script>var secret = 'not text';</script><style>td{}</style></head>"
        "<body><h1>tiny-sweep</h1><table><tr><th>status</th><th>n</th></tr>"
        "<tr><td>ok</td><td>4</td></tr></table></body></html>"
    )
    return folder


def test_sweep_results(agent, sweep):
    listed = agent.ok("list_sweeps")["sweeps"]
    assert [(s["name"], s["combinations"]) for s in listed] == [("tiny-sweep", 6)]
    assert listed[0]["counts"]["ok"] == 4 and listed[0]["counts"]["failed"] == 1

    best = agent.ok("sweep_results", name="tiny-sweep", metric="loss", top=2)
    assert best["params"] == ["lr", "seed"] and best["metrics"] == ["loss"]
    # The failed row has the lowest loss but never ranks.
    assert [r["metric:loss"] for r in best["best"]] == [0.5, 0.7]
    stats = agent.ok("sweep_results", name="tiny-sweep", metric="loss", by=["lr"])
    by_lr = {r["param:lr"]: r for r in stats["summary"]}
    assert by_lr[0.1]["n"] == 2 and by_lr[0.1]["mean"] == pytest.approx(2.0)
    assert by_lr[0.001]["n"] == 0

    assert "tiny-sweep" in agent.error("sweep_results", name="tiny-swep")
    assert "not valid" in agent.error("sweep_results", name="../tiny-sweep")
    assert "'acc'" in agent.error("sweep_results", name="tiny-sweep", metric="acc")


def test_reports_are_read_from_the_home_only(agent, home, sweep, tmp_path):
    audits = home / "audits"
    audits.mkdir(exist_ok=True)
    (audits / "audit-20260101-000000.md").write_text("# Audit report\n\n" + "x" * 5000)
    run_dir = home / "runs" / "fno-e" / "pipeline-1"
    run_dir.mkdir(parents=True)
    summary = {"experiment": "fno-e", "best_value": 0.1, "params": {"hf_token": "hf_abc123"}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    exp = finished("fno-e", {"nrmse": 0.1}, run_dir=str(run_dir))

    kinds = {r["kind"] for r in agent.ok("list_reports")["reports"]}
    assert {"audit", "sweep-status", "pipeline-summary"} <= kinds

    md = agent.ok("read_report", path="audits/audit-20260101-000000.md", max_chars=100)
    assert md["format"] == "markdown" and md["truncated"] is True
    assert md["text"].startswith("# Audit report") and len(md["text"]) == 100
    page = agent.ok("read_report", path=str(sweep / "status.html"))
    assert page["format"] == "html-as-text"
    assert "tiny-sweep" in page["text"] and "ok | 4" in page["text"]
    assert "not text" not in page["text"]
    shown = json.loads(agent.ok("read_report", experiment_id=exp.id)["text"])
    assert shown["best_value"] == 0.1 and shown["params"]["hf_token"] == "***"

    outside = tmp_path / "elsewhere.md"
    outside.write_text("private")
    assert "outside the expflow home" in agent.error("read_report", path=str(outside))
    assert "outside the expflow home" in agent.error("read_report", path="../../../etc/passwd")
    (home / "audits" / "link.md").symlink_to(outside)
    assert "outside the expflow home" in agent.error("read_report", path="audits/link.md")
    refused = agent.error("read_report", path="pin.json")
    assert "not a report" in refused and "scrypt" not in refused
    assert "exactly one" in agent.error("read_report")


# --- deployment runs, followed and cancelled --------------------------------------------


def audit_lines(home: Path) -> list[dict]:
    return [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]


def test_start_follow_and_cancel_a_deployment_run(agent, home):
    deployments = {d["name"]: d for d in agent.ok("list_deployments")["deployments"]}
    assert "audit/daily-audit" in deployments
    assert deployments["audit/daily-audit"]["work_pool"] == "expflow-local"

    refused = agent.error("start_deployment_run", deployment="audit/no-such")
    assert "audit/no-such" in refused and "audit/daily-audit" in refused
    assert "limit" in agent.error(
        "start_deployment_run", deployment="audit/daily-audit", parameters={"limit": "lots"}
    )

    unknown = "00000000-0000-4000-8000-000000000000"
    assert unknown in agent.error("flow_run_status", flow_run=unknown)

    started = agent.ok(
        "start_deployment_run", deployment="audit/daily-audit", parameters={"limit": 5}
    )
    run_id = started["flow_run_id"]
    assert re.fullmatch(r"[0-9a-f-]{36}", run_id) and started["state"] == "SCHEDULED"
    assert started["parameters"] == {"state": "COMPLETED", "limit": 5}
    status = agent.ok("flow_run_status", flow_run=run_id)
    assert status["state"] == "SCHEDULED" and status["deployment"] == "audit/daily-audit"
    assert status["parameters"]["limit"] == 5

    # The ledger tracks the run, so an agent can name it by experiment id too.
    exp = Ledger().register("agent-run", flow_run_id=run_id, state="ENQUEUED")
    assert agent.ok("flow_run_status", flow_run=exp.id)["experiment_id"] == exp.id

    # EXPFLOW_PIN is set in the server's environment, yet no PIN means no cancel.
    assert "needs the PIN" in agent.error("cancel_flow_run", flow_run=run_id)
    wrong = agent.error("cancel_flow_run", flow_run=run_id, pin=WRONG)
    assert "wrong PIN" in wrong and WRONG not in wrong
    assert agent.ok("flow_run_status", flow_run=run_id)["state"] == "SCHEDULED"
    assert Ledger().get(exp.id).state == "ENQUEUED"

    cancelled = agent.ok("cancel_flow_run", flow_run=exp.id, pin=PIN)
    assert cancelled["state"] == "CANCELLED" and cancelled["experiment_id"] == exp.id
    assert agent.ok("flow_run_status", flow_run=run_id)["state"] == "CANCELLED"
    assert Ledger().get(exp.id).state == "CANCELLED"
    assert "already CANCELLED" in agent.error("cancel_flow_run", flow_run=run_id, pin=PIN)

    cancels = [e for e in audit_lines(home) if e["action"] == "cancel"]
    assert [e["outcome"] for e in cancels] == ["refused", "refused", "allowed"]
    assert all(run_id in e["target"] and "via mcp" in e["target"] for e in cancels)
    log = (home / "audit.log").read_text()
    assert PIN not in log and WRONG not in log


def test_the_lockout_holds_for_agents(agent, home):
    run_id = agent.ok("start_deployment_run", deployment="audit/daily-audit")["flow_run_id"]
    for _ in range(4):
        assert "wrong PIN" in agent.error("cancel_flow_run", flow_run=run_id, pin=WRONG)
    assert "locked for 30 s" in agent.error("cancel_flow_run", flow_run=run_id, pin=WRONG)
    # Even the right PIN waits out the lockout.
    assert "locked until" in agent.error("cancel_flow_run", flow_run=run_id, pin=PIN)
    assert agent.ok("flow_run_status", flow_run=run_id)["state"] == "SCHEDULED"
    # Rather than wait 30 s: deleting the state file alone would not lift the lockout,
    # the ledger database keeps it too.
    (home / "pin_state.json").unlink()
    with sqlite3.connect(home / "ledger.sqlite") as db:
        db.execute("UPDATE pin_state SET failures = 0, lockouts = 0, locked_until = NULL")
    assert agent.ok("cancel_flow_run", flow_run=run_id, pin=PIN)["state"] == "CANCELLED"


def expflow_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`expflow` in a terminal-less shell, on the same Prefect server and expflow home."""
    return subprocess.run(
        [EXPFLOW, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_the_cli_and_an_agent_cancel_and_retry_alike(agent, audit_deployment, home):
    env = {**audit_deployment["env"], "EXPFLOW_HOME": str(home)}
    env.pop("EXPFLOW_PIN", None)
    out = expflow_cli(env, "runs", "start", "audit/daily-audit", "--param", "limit=5", "--json")
    assert out.returncode == 0, out.stderr
    started = {
        "cli": json.loads(out.stdout),
        "mcp": agent.ok(
            "start_deployment_run", deployment="audit/daily-audit", parameters={"limit": 5}
        ),
    }
    drop = ("flow_run_id", "flow_run_name", "ui_url")
    assert [{k: v for k, v in s.items() if k not in drop} for s in started.values()] == [
        {
            "deployment": "audit/daily-audit",
            "state": "SCHEDULED",
            "parameters": {"state": "COMPLETED", "limit": 5},
        }
    ] * 2
    runs = {}
    for via, run in started.items():
        run_id = run["flow_run_id"]
        runs[via] = (run_id, Ledger().register(f"twin-{via}", flow_run_id=run_id, state="ENQUEUED"))
    (cli_run, cli_exp), (mcp_run, mcp_exp) = runs["cli"], runs["mcp"]
    seen = len(audit_lines(home))

    def same(text: object, via: str) -> str:
        """Text with the run's own ids and the front end's name taken out."""
        run_id, exp = runs[via]
        out = str(text).replace(run_id, "<run>").replace(exp.id, "<exp>")
        return out.replace(f"twin-{via}", "<name>").replace(via, "<via>")

    def where(via: str) -> tuple:
        """What a user can look at: Prefect's state, the ledger row and its history."""
        run_id, exp = runs[via]
        row = Ledger().get(exp.id)
        history = [(h["event"], h["to"], same(h["message"], via)) for h in Ledger().history(exp.id)]
        status = agent.ok("flow_run_status", flow_run=run_id)["state"]
        return status, row.state, row.flow_run_id == run_id, history

    out = expflow_cli(env, "runs", "cancel", cli_exp.id, "--pin", PIN, "--wait", "30")
    assert out.returncode == 0, out.stderr
    cancelled = agent.ok("cancel_flow_run", flow_run=mcp_exp.id, pin=PIN)
    assert same(out.stdout.strip(), "cli") == same(cancelled["message"], "mcp")
    assert cancelled["message"] == f"cancelled {mcp_exp.id} (twin-mcp), flow run {mcp_run}"
    assert where("cli") == where("mcp")
    assert where("mcp")[:2] == ("CANCELLED", "CANCELLED")
    entries = audit_lines(home)[seen:]
    assert [e["target"] for e in entries] == [
        f"{cli_exp.id} (twin-cli), flow run {cli_run} via cli",
        f"{mcp_exp.id} (twin-mcp), flow run {mcp_run} via mcp",
    ]
    (by_cli, by_agent) = (
        {k: same(v, via) for k, v in e.items() if k in ("action", "outcome", "target", "reason")}
        for e, via in zip(entries, ("cli", "mcp"), strict=True)
    )
    assert by_cli == by_agent and by_cli["outcome"] == "allowed"

    # A second cancel is refused alike, before any PIN is checked or audited.
    again = expflow_cli(env, "runs", "cancel", cli_exp.id, "--pin", PIN)
    assert again.returncode == 2 and "already CANCELLED" in again.stderr
    refused = agent.error("cancel_flow_run", flow_run=mcp_exp.id, pin=PIN)
    assert same(refused, "mcp").endswith(same(again.stderr.strip(), "cli").removeprefix("error: "))
    assert len(audit_lines(home)) == seen + 2

    # Retried: the same flow run is scheduled again and the ledger row is queued again.
    out = expflow_cli(env, "runs", "retry", cli_exp.id)
    assert out.returncode == 0, out.stderr
    retried = agent.ok("retry_flow_run", flow_run=mcp_exp.id)
    assert same(out.stdout.strip(), "cli") == same(retried["message"], "mcp")
    assert retried["state"] == "SCHEDULED" and retried["ledger_state"] == "ENQUEUED"
    assert where("cli") == where("mcp")
    assert where("mcp")[:3] == ("SCHEDULED", "ENQUEUED", True)
    assert where("mcp")[3][-1] == ("retry", "ENQUEUED", "retry requested via <via>")

    # A queued run cannot be retried again: the same refusal from both.
    again = expflow_cli(env, "runs", "retry", cli_exp.id)
    refused = agent.error("retry_flow_run", flow_run=mcp_exp.id)
    assert again.returncode == 2 and "cannot retry an experiment in state ENQUEUED" in refused
    assert same(refused, "mcp").endswith(same(again.stderr.strip(), "cli").removeprefix("error: "))


def test_stdout_carries_only_json_rpc_and_no_pin_leaks(agent):
    # A tool that imports Prefect and logs, then one that fails: neither may write to stdout.
    run_id = agent.ok("start_deployment_run", deployment="audit/daily-audit")["flow_run_id"]
    agent.ok("flow_run_status", flow_run=run_id)
    agent.error("show_experiment", experiment_id="999999")
    lines = (agent.logs / "stdout.jsonl").read_text().splitlines()
    assert len(lines) > 20
    for line in lines:
        message = json.loads(line)
        assert message["jsonrpc"] == "2.0" and ("result" in message or "error" in message), line
    for name in ("stdout.jsonl", "stderr.log"):
        text = (agent.logs / name).read_text()
        assert PIN not in text and WRONG not in text


# --- without the extra ------------------------------------------------------------------


def test_without_the_mcp_package_expflow_mcp_says_how_to_install_it(tmp_path):
    code = (
        "import sys; sys.modules['mcp'] = None\n"
        "import expflow_flows.cli, expflow_flows.governance.ledger, expflow_flows.metrics.compare\n"
        "sys.argv = ['expflow', 'mcp']\n"
        "expflow_flows.cli.main()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EXPFLOW_HOME": str(tmp_path)},
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: expflow mcp needs the mcp package: pip install 'expflow-flows[mcp]'"
    ]
