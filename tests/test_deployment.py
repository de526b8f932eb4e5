"""Deployments for real: `prefect server start`, `prefect deploy --all`, a process worker,
and `prefect deployment run` with a parameter override, all as a user would type them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on a free loopback port with its own SQLite database."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect"),
        "EXPFLOW_HOME": str(root / "expflow"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 150
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(
                f"prefect server did not start: {(root / 'server.log').read_text()[-2000:]}"
            )
        time.sleep(0.5)
    env["PREFECT_API_URL"] = url
    yield {"url": url, "env": env, "root": root}
    stop(proc)
    log.close()


def prefect(server, *args: str, timeout: float = 180) -> str:
    out = subprocess.run(
        [PREFECT, *args],
        cwd=REPO,
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def deployed(server):
    """The work pool and every deployment of prefect.yaml, registered as `make deploy` does."""
    prefect(server, "work-pool", "create", "expflow-local", "--type", "process")
    prefect(server, "work-pool", "create", "expflow-slurm", "--type", "slurm")
    prefect(server, "work-pool", "create", "expflow-clearml", "--type", "clearml")
    prefect(server, "deploy", "--all")
    return server


def test_deployment_run_from_prefect_yaml_completes(deployed):
    server = deployed
    names = {d["name"] for d in api(server, "POST", "/deployments/filter", {})}
    assert {"pde-advection", "pde-advection-nightly-hpo"} <= names

    worker_log = open(server["root"] / "worker.log", "wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "expflow-local", "--type", "process"],
        cwd=REPO,
        env=server["env"],
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        overrides = {
            "n_trials": 3,
            "hpo_budget": {"epochs": 5},
            "final_budget": {"epochs": 10},
            "gates": ["nrmse:lt:1.0"],
            "submission_name": "deployed-1",
        }
        out = prefect(
            server,
            "deployment",
            "run",
            "pipeline/pde-advection",
            "--params",
            json.dumps(overrides),
        )
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        flow_run_id = match.group(1)
        state = wait_for_terminal(server, flow_run_id, timeout=400)
        assert state["type"] == "COMPLETED", (
            f"{state}\nworker log:\n{(server['root'] / 'worker.log').read_text()[-4000:]}"
        )
    finally:
        stop(worker)
        worker_log.close()

    # The parameter override reached the run: exactly 3 trials in its table.
    artifacts = api(server, "POST", "/artifacts/filter", {})
    keys = {a["key"] for a in artifacts if a.get("key")}
    assert {
        "pde-advection-trials",
        "pde-advection-best-params",
        "pde-advection-eval-metrics",
        "pde-advection-gates",
        "pde-advection-outputs",
    } <= keys
    trials = next(a for a in artifacts if a["key"] == "pde-advection-trials")
    rows = json.loads(trials["data"]) if isinstance(trials["data"], str) else trials["data"]
    assert len(rows) == 3
    bundle = server["root"] / "expflow" / "submissions" / "deployed-1"
    assert (bundle / "pred.hdf5").exists() and (bundle / "manifest.json").exists()


def test_nightly_deployment_has_an_off_peak_cron_with_timezone(deployed):
    deployments = api(deployed, "POST", "/deployments/filter", {})
    nightly = [d for d in deployments if d["name"] == "pde-advection-nightly-hpo"]
    assert len(nightly) == 1
    assert nightly[0]["parameters"]["config"] == "deployments/pde-advection-nightly.yaml"
    assert nightly[0]["parameters"]["offpeak"]["windows"] == ["22:00-06:00"]
    schedules = nightly[0]["schedules"]
    assert schedules[0]["schedule"]["cron"] == "30 2 * * *"
    assert schedules[0]["schedule"]["timezone"] == "Europe/Berlin"
    assert schedules[0]["active"] is True
    by_name = {d["name"]: d for d in deployments}
    sweep = by_name["advection-sweep-nightly"]
    assert sweep["entrypoint"] == "expflow_flows/flows/sweep.py:sweep"
    assert sweep["schedules"][0]["schedule"]["cron"] == "0 1 * * *"
    audit = by_name["daily-audit"]
    assert audit["schedules"][0]["schedule"]["timezone"] == "Europe/Berlin"


def api(server, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(
        server["url"] + path,
        method=method,
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_for_terminal(server, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api(server, "GET", f"/flow_runs/{flow_run_id}")
        state = run.get("state") or {}
        if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")


def expflow_cli(server, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("expflow")), *args],
        cwd=REPO,
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_cancel_a_running_deployment_run_through_the_ledger(deployed):
    server = deployed
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "expflow-local", "--type", "process"],
        cwd=REPO,
        env=server["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        long_run = {
            "experiment": "to-cancel",
            "n_trials": 2,
            "runner": "threads",
            "hpo_budget": {"epochs": 1000000},
            "submit": False,
        }
        out = prefect(
            server, "deployment", "run", "pipeline/pde-advection", "--params", json.dumps(long_run)
        )
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        # The on_running hook registers the run in the ledger.
        exp_id = None
        deadline = time.monotonic() + 180
        while exp_id is None and time.monotonic() < deadline:
            listed = expflow_cli(server, "runs", "list", "--json")
            rows = json.loads(listed.stdout or "[]")
            mine = [r for r in rows if r["flow_run_id"] == flow_run_id and r["state"] == "RUNNING"]
            exp_id = mine[0]["id"] if mine else None
            time.sleep(1)
        assert exp_id, f"the run never showed as RUNNING in the ledger: {rows}"
        assert mine[0]["name"] == "to-cancel"
        t_cancel = time.monotonic()
        cancelled = expflow_cli(server, "runs", "cancel", exp_id)  # no PIN set: allowed, audited
        print(f"expflow runs cancel took {time.monotonic() - t_cancel:.1f} s")
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"cancelled {exp_id}" in cancelled.stdout
        state = wait_for_terminal(server, flow_run_id, timeout=60)
        assert state["type"] == "CANCELLED"
        shown = json.loads(expflow_cli(server, "runs", "show", exp_id).stdout)
        assert shown["state"] == "CANCELLED"
        assert [h["to"] for h in shown["history"]][-2:] == ["CANCEL_PENDING", "CANCELLED"]
    finally:
        stop(worker)
