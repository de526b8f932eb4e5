"""The `clearml` worker type for real: `prefect server start`, `prefect worker start --type
clearml`, a real `clearml-agent daemon` and the real ClearML SDK.

The ClearML side is tests/clearml_api.py: a loopback HTTP server (stdlib, in this test
process) that speaks the part of ClearML's REST API that the SDK and the agent call,
with projects, tasks, queues, workers and events in memory. A real ClearML server needs
MongoDB, Elasticsearch and Redis and cannot run on this machine. Every ClearML client
here reads a clearml.conf with zero HTTP retries: with the SDK's defaults a client that
cannot reach its server retries for hours.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from uuid import uuid4

import pytest
import test_deployment
from clearml_api import ClearMLApiServer
from test_deployment import PREFECT, REPO, api, stop, wait_for_terminal

# A real `prefect server start`, one for this module (test_deployment's fixture).
prefect_server = test_deployment.server

PYTHON = sys.executable
QUEUE = "expflow-test"
POOL = "clearml-e2e"
# Stand-ins for credentials that must never reach ClearML.
WORKER_SECRET = "pnu_worker-secret-" + uuid4().hex
DEPLOYMENT_SECRET = "deployment-token-" + uuid4().hex

FLOWS = '''\
"""Flows deployed to the clearml work pool by tests/test_clearml_worker.py."""

import os
import time

from prefect import flow


@flow(name="clearml-quick", log_prints=True)
def quick(x: int = 3) -> int:
    greeting, task = os.environ.get("EXPFLOW_GREETING"), os.environ.get("CLEARML_TASK_ID")
    print(f"greeting={greeting} in task {task}")
    return x * x


@flow(name="clearml-fails")
def fails() -> None:
    raise ValueError("this flow fails on purpose")


@flow(name="clearml-sleeper", log_prints=True)
def sleeper(seconds: float = 600) -> None:
    print(f"sleeping {seconds} s")
    time.sleep(seconds)
'''

PREFECT_YAML = f"""\
name: clearml-worker-tests
prefect-version: 3.9.1
deployments:
  - name: quick
    entrypoint: flows.py:quick
    work_pool:
      name: {POOL}
      job_variables:
        tags: [e2e]
        env:
          EXPFLOW_GREETING: hello-from-prefect
          EXPFLOW_TEST_TOKEN: {DEPLOYMENT_SECRET}
  - name: fails
    entrypoint: flows.py:fails
    work_pool:
      name: {POOL}
  - name: sleeper
    entrypoint: flows.py:sleeper
    work_pool:
      name: {POOL}
  - name: lost
    entrypoint: flows.py:quick
    work_pool:
      name: {POOL}
      job_variables:
        queue: no-such-queue
"""


# ------------------------------------------------------------------------- helpers


def run_cli(env: dict, *args: str, cwd: Path = REPO, timeout: float = 180) -> str:
    out = subprocess.run(
        [PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def wait_for(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def flow_run(server, flow_run_id: str) -> dict:
    return api(server, "GET", f"/flow_runs/{flow_run_id}")


def start_run(stack, deployment: str) -> str:
    out = run_cli(stack["env"], "deployment", "run", deployment)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def task_of(stack, flow_run_id: str, timeout: float = 60) -> dict:
    """The ClearML task the worker made for a flow run (its infrastructure_pid)."""
    task_id = wait_for(
        lambda: flow_run(stack["server"], flow_run_id).get("infrastructure_pid"),
        timeout,
        f"flow run {flow_run_id} to get a ClearML task\n{stack['logs']()}",
    )
    return stack["clearml"].task(task_id)


def flow_run_logs(server, flow_run_id: str) -> str:
    logs = api(server, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
    return "\n".join(entry["message"] for entry in logs)


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clearml(tmp_path_factory):
    """The loopback ClearML API, with the queue the agent serves."""
    with ClearMLApiServer() as api_server:
        api_server.create_queue(QUEUE)
        yield api_server


@pytest.fixture(scope="module")
def clearml_conf(clearml, tmp_path_factory) -> Path:
    """A clearml.conf for the worker and the agent: the loopback server, zero retries, and
    the agent's folders in a temporary directory."""
    root = tmp_path_factory.mktemp("clearml")
    agent = textwrap.dedent(
        f"""\
        agent {{
          venvs_dir: "{root}/venvs"
          vcs_cache {{ enabled: false, path: "{root}/vcs" }}
          pip_download_cache {{ enabled: false, path: "{root}/pip" }}
          docker_pip_cache: "{root}/docker-pip"
          docker_apt_cache: "{root}/docker-apt"
        }}
        sdk {{ storage {{ cache {{ default_base_dir: "{root}/cache" }} }} }}
        """
    )
    conf = root / "clearml.conf"
    conf.write_text(clearml.config_text(agent))
    return conf


@pytest.fixture(scope="module")
def stack(prefect_server, clearml, clearml_conf, tmp_path_factory):
    """Deployments on a `clearml` pool, a clearml worker and a clearml-agent serving the
    pool's queue; both processes are stopped at the end, whatever happened."""
    root = tmp_path_factory.mktemp("clearml-stack")
    server = prefect_server
    env = dict(server["env"])

    template = json.loads(
        run_cli(env, "work-pool", "get-default-base-job-template", "--type", "clearml")
    )
    defaults = template["variables"]["properties"]
    defaults["queue"]["default"] = QUEUE
    defaults["poll_interval"]["default"] = 1
    defaults["cancel_grace_seconds"]["default"] = 30
    defaults["clearml_config_file"]["default"] = str(clearml_conf)
    (root / "template.json").write_text(json.dumps(template))
    run_cli(
        env,
        "work-pool",
        "create",
        POOL,
        "--type",
        "clearml",
        "--base-job-template",
        str(root / "template.json"),
    )
    flows = root / "flows"
    flows.mkdir()
    (flows / "flows.py").write_text(FLOWS)
    (flows / "prefect.yaml").write_text(PREFECT_YAML)
    run_cli(env, "deploy", "--all", cwd=flows)

    agent_home = root / "agent-home"
    (agent_home / "tmp").mkdir(parents=True)
    agent_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CLEARML", "PREFECT_API"))},
        "HOME": str(agent_home),
        "TMPDIR": str(agent_home / "tmp"),
        "CLEARML_CONFIG_FILE": str(clearml_conf),
        "CLEARML_AGENT_SKIP_PIP_VENV_INSTALL": PYTHON,
        "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL": "1",
        "CLEARML_AGENT_QUEUE_POLL_FREQ_SEC": "1",
        "CLEARML_WORKER_ID": "expflow-test-agent",
    }
    worker_env = {
        **env,
        "PREFECT_API_KEY": WORKER_SECRET,  # any secret in the worker's environment
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    }
    worker_env = {k: v for k, v in worker_env.items() if not k.startswith("CLEARML")}
    agent_log, worker_log = root / "agent.log", root / "worker.log"
    procs: list[subprocess.Popen] = []
    try:
        with open(agent_log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        str(Path(PYTHON).with_name("clearml-agent")),
                        "--config-file",
                        str(clearml_conf),
                        "daemon",
                        "--queue",
                        QUEUE,
                        "--foreground",
                    ],
                    cwd=agent_home,
                    env=agent_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        with open(worker_log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", POOL, "--type", "clearml"],
                    cwd=root,
                    env=worker_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def logs() -> str:
            return f"worker log:\n{tail(worker_log)}\nagent log:\n{tail(agent_log)}"

        wait_for(lambda: clearml.workers, 60, f"the agent to register\n{logs()}")
        yield {"server": server, "env": env, "clearml": clearml, "logs": logs, "root": root}
    finally:
        for proc in reversed(procs):
            stop(proc)


# ---------------------------------------------------------------- unit level tests


def test_worker_type_is_registered_and_pool_has_the_variables(prefect_server):
    server = prefect_server
    out = run_cli(server["env"], "work-pool", "create", "clearml-registered", "--type", "clearml")
    assert "clearml-registered" in out
    pool = api(server, "GET", "/work_pools/clearml-registered")
    assert pool["type"] == "clearml"
    variables = pool["base_job_template"]["variables"]["properties"]
    assert {
        "queue",
        "project",
        "task_type",
        "tags",
        "poll_interval",
        "cancel_grace_seconds",
        "working_dir",
        "requirements",
        "clearml_config_file",
        "env",
        "command",
    } <= set(variables)
    assert variables["queue"]["default"] == "default"
    assert variables["project"]["default"] == "expflow"
    assert "training" in variables["task_type"]["enum"]
    job = pool["base_job_template"]["job_configuration"]
    assert (
        job["queue"] == "{{ queue }}" and job["clearml_config_file"] == "{{ clearml_config_file }}"
    )


def test_job_variables_become_the_configuration(prefect_server):
    server = prefect_server
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from pydantic import ValidationError

    from expflow_flows.workers.clearml import ClearMLJobConfiguration, ClearMLWorker

    template = ClearMLWorker.get_default_base_job_template()

    async def configure(values: dict) -> ClearMLJobConfiguration:
        return await ClearMLJobConfiguration.from_template_and_values(template, values)

    with temporary_settings({PREFECT_API_URL: server["url"]}):
        default = asyncio.run(configure({}))
        assert (default.queue, default.project, default.task_type) == (
            "default",
            "expflow",
            "custom",
        )
        assert default.tags == [] and default.poll_interval == 5 and default.command is None
        chosen = asyncio.run(
            configure(
                {
                    "queue": "gpu",
                    "project": "pde/advection",
                    "task_type": "training",
                    "tags": ["nightly", "pde"],
                    "poll_interval": 0.5,
                    "working_dir": "/shared/expflow",
                    "requirements": ["prefect==3.9.1"],
                    "clearml_config_file": "/etc/clearml.conf",
                    "env": {"EXPFLOW_HOME": "/shared/expflow-home"},
                }
            )
        )
        with pytest.raises(ValidationError, match="task_type"):
            asyncio.run(configure({"task_type": "sweeping"}))
    assert chosen.queue == "gpu" and chosen.project == "pde/advection"
    assert chosen.task_type == "training" and chosen.tags == ["nightly", "pde"]
    assert chosen.poll_interval == 0.5 and chosen.working_dir == "/shared/expflow"
    assert chosen.requirements == ["prefect==3.9.1"]
    assert chosen.clearml_config_file == "/etc/clearml.conf"
    assert chosen.env == {"EXPFLOW_HOME": "/shared/expflow-home"}


def test_task_carries_prefect_environment_but_no_secret():
    from prefect.client.schemas.objects import FlowRun

    from expflow_flows.workers.clearml import ClearMLJobConfiguration, task_fields

    run = FlowRun(id=uuid4(), name="brave-otter", flow_id=uuid4())
    config = ClearMLJobConfiguration(
        queue="gpu",
        tags=["nightly"],
        env={
            "PREFECT_API_URL": "http://prefect.internal:4200/api",
            "PREFECT__FLOW_RUN_ID": str(run.id),
            "EXPFLOW_HOME": "/shared/expflow",
            "PREFECT_API_KEY": "pnu_secret-1",
            "HF_TOKEN": "hf_secret-2",
            "PREFECT_API_AUTH_STRING": "admin:secret-3",
            "DATABASE_URL": "postgresql://expflow:secret-4@db/expflow",
            "UNSET": None,
        },
    )
    config.prepare_for_flow_run(run)
    fields, left_out = task_fields(run, config)

    text = json.dumps(fields)
    for secret in ("secret-1", "secret-2", "secret-3", "secret-4"):
        assert secret not in text
    assert left_out == ["DATABASE_URL", "HF_TOKEN", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY"]
    assert fields["name"] == "brave-otter" and fields["tags"] == ["prefect", "nightly"]
    assert fields["hyperparams"]["Prefect"]["flow_run_id"]["value"] == str(run.id)
    script = fields["script"]
    assert script["entry_point"] == "prefect_flow_run.py" and script["repository"] == ""
    launcher = script["diff"]
    compile(launcher, "prefect_flow_run.py", "exec")  # the agent runs it as a Python file
    for kept in ("http://prefect.internal:4200/api", str(run.id), "/shared/expflow"):
        assert kept in launcher
    assert "prefect flow-run execute" in launcher


def test_importing_the_workers_does_not_import_the_clearml_sdk():
    code = (
        "import sys, expflow_flows.workers\n"
        "from expflow_flows.workers import ClearMLWorker\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('clearml', 'clearml_agent')))"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_sdk_is_one_line(monkeypatch):
    from expflow_flows.workers.clearml import ClearMLApi, ClearMLError

    for name in [m for m in sys.modules if m == "clearml" or m.startswith("clearml.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.setitem(sys.modules, "clearml", None)
    with pytest.raises(ClearMLError) as err:
        ClearMLApi()
    assert str(err.value) == (
        "the clearml worker needs the ClearML SDK: pip install 'expflow-flows[clearml]'"
    )


def test_kill_infrastructure_dequeues_and_stops_a_pending_task(clearml, clearml_conf):
    """What Prefect calls for a pending flow run: its queued task must never run."""
    from prefect.exceptions import InfrastructureNotFound

    from expflow_flows.workers.clearml import ClearMLApi, ClearMLJobConfiguration, ClearMLWorker

    client = ClearMLApi(str(clearml_conf))
    queue = clearml.create_queue("kill-test")
    task_id, _ = client.create_task({"name": "pending", "type": "custom"}, "expflow")
    client.enqueue(task_id, queue)
    worker = ClearMLWorker(work_pool_name="unused")
    config = ClearMLJobConfiguration(clearml_config_file=str(clearml_conf))
    asyncio.run(worker.kill_infrastructure(task_id, config))
    assert clearml.statuses(task_id) == ["created", "queued", "created", "stopped"]
    assert clearml.queues[queue]["entries"] == []
    with pytest.raises(InfrastructureNotFound):
        asyncio.run(worker.kill_infrastructure("no-such-task", config))


def test_configuration_errors_name_what_is_missing(clearml, tmp_path):
    """No server, no credentials, a dead server and wrong keys: one line each, in seconds."""
    dead_conf = tmp_path / "dead.conf"
    dead = ClearMLApiServer().start()
    dead_url = dead.url
    dead.stop()  # nothing listens on its port now
    dead_conf.write_text(clearml.config_text().replace(clearml.url, dead_url))
    wrong_conf = tmp_path / "wrong.conf"
    wrong_conf.write_text(clearml.config_text().replace(clearml.secret_key, "not-the-secret"))
    good_conf = tmp_path / "good.conf"
    good_conf.write_text(clearml.config_text())
    code = textwrap.dedent(
        f"""\
        import json, os, sys, time
        from expflow_flows.workers.clearml import ClearMLApi, ClearMLError

        def attempt(config_file=None):
            t0 = time.monotonic()
            try:
                api = ClearMLApi(config_file)
                return {{"ok": api.queue_id({QUEUE!r}), "s": time.monotonic() - t0}}
            except ClearMLError as exc:
                return {{"error": str(exc), "s": time.monotonic() - t0}}

        out = {{"no_server": attempt()}}
        os.environ["CLEARML_API_HOST"] = "http://127.0.0.1:9"
        out["no_keys"] = attempt()
        del os.environ["CLEARML_API_HOST"]
        out["missing_file"] = attempt({str(tmp_path / "nope.conf")!r})
        out["dead"] = attempt({str(dead_conf)!r})
        out["wrong"] = attempt({str(wrong_conf)!r})
        out["good"] = attempt({str(good_conf)!r})
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML", "TRAINS"))}
    env["HOME"] = str(tmp_path)  # no ~/clearml.conf
    run = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])

    for case in ("no_server", "no_keys", "missing_file", "dead", "wrong"):
        assert "\n" not in out[case]["error"], out[case]
        assert out[case]["s"] < 20, out[case]
    assert "no API server" in out["no_server"]["error"]
    assert "CLEARML_API_HOST" in out["no_server"]["error"]
    assert "no API credentials" in out["no_keys"]["error"]
    assert "CLEARML_API_ACCESS_KEY" in out["no_keys"]["error"]
    assert "nope.conf" in out["missing_file"]["error"]
    assert "does not exist" in out["missing_file"]["error"]
    assert f"cannot reach the ClearML API server at {dead_url}" in out["dead"]["error"]
    assert "refused the credentials" in out["wrong"]["error"]
    assert out["good"]["ok"] == clearml.queue_id(QUEUE)


# ------------------------------------------------------------------ end to end tests


def test_deployment_run_completes_through_clearml_agent(stack):
    server, clearml = stack["server"], stack["clearml"]
    t0 = time.monotonic()
    flow_run_id = start_run(stack, "clearml-quick/quick")
    state = wait_for_terminal(server, flow_run_id, timeout=240)
    assert state["type"] == "COMPLETED", f"{state}\n{stack['logs']()}"

    task = task_of(stack, flow_run_id)
    # The agent reports the task completed once the launcher exits, just after the flow run.
    wait_for(
        lambda: clearml.task(task["id"])["status"] == "completed",
        30,
        f"task {task['id']} to complete: {clearml.statuses(task['id'])}\n{stack['logs']()}",
    )
    times = clearml.status_times(task["id"])
    statuses = [s for s, _ in times]
    assert statuses[:2] == ["created", "queued"], statuses
    assert statuses.index("queued") < statuses.index("in_progress") < statuses.index("completed")
    assert statuses[-1] == "completed"
    queued = next(t for s, t in times if s == "queued")
    running = next(t for s, t in times if s == "in_progress")
    print(
        f"deployment run -> task queued {queued - t0:.1f} s, in_progress {running - t0:.1f} s "
        f"(queued -> in_progress {running - queued:.1f} s), "
        f"completed {times[-1][1] - t0:.1f} s"
    )

    # The task: where the worker said, named after the flow run, with its id.
    assert task["execution"]["queue"] == clearml.queue_id(QUEUE)
    assert clearml.projects[task["project"]]["name"] == "expflow"
    assert "e2e" in task["tags"] and "prefect" in task["tags"]
    assert task["hyperparams"]["Prefect"]["flow_run_id"]["value"] == flow_run_id
    # Prefect's environment reached the flow run inside the agent's process ...
    console = "\n".join(clearml.logs(task["id"]))
    assert f"greeting=hello-from-prefect in task {task['id']}" in console, console[-3000:]
    # ... and no secret reached ClearML: not the worker's API key, not the deployment's token.
    stored = clearml.dump()
    assert WORKER_SECRET not in stored and DEPLOYMENT_SECRET not in stored
    # The flow run's log names the task, its web page and what was left out.
    logs = flow_run_logs(server, flow_run_id)
    assert f"ClearML task {task['id']} queued on '{QUEUE}'" in logs
    assert f"/experiments/{task['id']}/output/log" in logs
    assert "PREFECT_API_KEY" in logs and "EXPFLOW_TEST_TOKEN" in logs
    assert clearml.unknown_endpoints == []


def test_failing_flow_fails_and_so_does_its_task(stack):
    flow_run_id = start_run(stack, "clearml-fails/fails")
    state = wait_for_terminal(stack["server"], flow_run_id, timeout=240)
    assert state["type"] == "FAILED", f"{state}\n{stack['logs']()}"
    assert "this flow fails on purpose" in state["message"]
    task = task_of(stack, flow_run_id)
    wait_for(
        lambda: stack["clearml"].task(task["id"])["status"] == "failed",
        30,
        f"task {task['id']} to fail: {stack['clearml'].statuses(task['id'])}",
    )


def _running_sleeper(stack) -> tuple[str, dict]:
    flow_run_id = start_run(stack, "clearml-sleeper/sleeper")
    task = task_of(stack, flow_run_id)
    wait_for(
        lambda: (
            (flow_run(stack["server"], flow_run_id)["state"] or {}).get("type") == "RUNNING"
            and stack["clearml"].task(task["id"])["status"] == "in_progress"
        ),
        180,
        f"the sleeper to run\n{stack['logs']()}",
    )
    return flow_run_id, task


def test_cancelling_flow_runs_aborts_their_tasks_queued_or_running(stack):
    """A queued task is dequeued and stopped (the agent never runs it); a running one is
    stopped by its agent. Both flow runs end Cancelled."""
    server, clearml = stack["server"], stack["clearml"]
    running_id, running = _running_sleeper(stack)
    # One agent, busy with the sleeper: the next run's task waits in the queue.
    queued_id = start_run(stack, "clearml-quick/quick")
    queued = task_of(stack, queued_id)
    assert clearml.task(queued["id"])["status"] == "queued"

    run_cli(stack["env"], "flow-run", "cancel", queued_id)
    state = wait_for_terminal(server, queued_id, timeout=120)
    assert state["type"] == "CANCELLED", f"{state}\n{stack['logs']()}"
    wait_for(
        lambda: clearml.task(queued["id"])["status"] == "stopped",
        30,
        f"queued task {queued['id']} to stop: {clearml.statuses(queued['id'])}",
    )
    assert clearml.queues[clearml.queue_id(QUEUE)]["entries"] == []

    t0 = time.monotonic()
    run_cli(stack["env"], "flow-run", "cancel", running_id)
    state = wait_for_terminal(server, running_id, timeout=120)
    assert state["type"] == "CANCELLED", f"{state}\n{stack['logs']()}"
    wait_for(
        lambda: clearml.task(running["id"])["status"] == "stopped",
        60,
        f"task {running['id']} to stop: {clearml.statuses(running['id'])}",
    )
    stopped_at = next(t for s, t in clearml.status_times(running["id"]) if s == "stopped")
    print(f"prefect flow-run cancel -> running ClearML task stopped in {stopped_at - t0:.1f} s")
    assert clearml.statuses(running["id"])[-1] == "stopped"
    # The agent, free again, polls its queue and does not find the cancelled run's task.
    polls = clearml.calls.count("queues.get_next_task")
    wait_for(
        lambda: clearml.calls.count("queues.get_next_task") >= polls + 2,
        30,
        f"the agent to poll its queue again\n{stack['logs']()}",
    )
    assert "in_progress" not in clearml.statuses(queued["id"])
    assert clearml.task(queued["id"])["status"] == "stopped"


def test_aborting_the_task_in_clearml_cancels_the_flow_run(stack):
    server, clearml = stack["server"], stack["clearml"]
    flow_run_id, task = _running_sleeper(stack)
    t0 = time.monotonic()
    clearml.abort(task["id"])  # the web UI's Abort button
    state = wait_for_terminal(server, flow_run_id, timeout=120)
    print(f"ClearML abort -> flow run {state['type']} in {time.monotonic() - t0:.1f} s")
    assert state["type"] == "CANCELLED", f"{state}\n{stack['logs']()}"
    assert f"ClearML task {task['id']} was aborted in ClearML" in state["message"]
    assert clearml.task(task["id"])["status"] == "stopped"


def test_unknown_queue_crashes_the_flow_run_naming_the_queue(stack):
    clearml = stack["clearml"]
    before = len(clearml.tasks())
    flow_run_id = start_run(stack, "clearml-quick/lost")
    state = wait_for_terminal(stack["server"], flow_run_id, timeout=120)
    assert state["type"] == "CRASHED", f"{state}\n{stack['logs']()}"
    message = state["message"]
    assert "ClearML queue 'no-such-queue' does not exist" in message
    assert f"known queues: {QUEUE}" in message
    assert len(clearml.tasks()) == before  # nothing was left behind in ClearML
