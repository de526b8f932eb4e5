"""A local Prefect server for the UI: start it once in the background, reuse it after.

The server runs on loopback with SQLite under ``PREFECT_HOME``; its pid and log
live in ``<expflow home>/server/``. Used by ``make demo``/``make server`` and
``expflow server start|stop|status``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.home import expflow_home

DEFAULT_PORT = 4200


def api_url(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> str:
    """The API address a client sets as ``PREFECT_API_URL``."""
    return f"http://{host}:{port}/api"


def is_healthy(port: int = DEFAULT_PORT, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """True when a Prefect server answers its health check on that port."""
    try:
        with urllib.request.urlopen(f"{api_url(port, host)}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _state_dir() -> Path:
    d = expflow_home() / "server"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else (shutil.which("prefect") or "prefect")


def start(
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    wait: float = 120.0,
    database_url: str | None = None,
) -> tuple[str, bool]:
    """Start a server unless one is healthy already; returns (API URL, started_now).

    ``database_url`` (``postgresql+asyncpg://user@host/db``) puts the server on PostgreSQL
    for a team; without it the server keeps SQLite under ``PREFECT_HOME``.
    """
    if is_healthy(port, host):
        return api_url(port, host), False
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)
    # The UI asks the server for its API address (/ui-settings), which Prefect derives
    # from these settings, not from --port: without them a UI on another port talks to
    # whatever server listens on 4200.
    env["PREFECT_SERVER_API_HOST"] = host
    env["PREFECT_SERVER_API_PORT"] = str(port)
    env["PREFECT_UI_API_URL"] = api_url(port, host)
    if database_url:
        if not database_url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ExpflowError(
                f"database URL {database_url.split('@')[-1]!r}: expected postgresql+asyncpg://… "
                "or sqlite+aiosqlite://…"
            )
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    cmd = [
        _prefect_exe(),
        "server",
        "start",
        "--host",
        host,
        "--port",
        str(port),
        "--analytics-off",
    ]
    _spawn_until(
        cmd, f"server-{port}", env, lambda: is_healthy(port, host), wait, "the Prefect server", port
    )
    return api_url(port, host), True


def _spawn_until(
    cmd: list[str],
    name: str,
    env: dict[str, str] | None,
    ready: Callable[[], bool],
    wait: float,
    what: str,
    port: int,
) -> None:
    """Start ``cmd`` detached (log and pid file ``<name>.log/.pid`` in the state folder)
    and wait until ``ready()``; one line when it exits or never gets ready."""
    state = _state_dir()
    log_path = state / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    (state / f"{name}.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ExpflowError(
                f"{what} exited with code {proc.returncode} (port {port} busy?); see {log_path}"
            )
        if ready():
            return
        time.sleep(0.3)
    raise ExpflowError(f"{what} did not become ready in {wait:.0f} s; see {log_path}")


def stop(port: int = DEFAULT_PORT, timeout: float = 15.0) -> bool:
    """Stop the server this package started on ``port``; False when none was running."""
    pid_file = _state_dir() / f"server-{port}.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink()
    if pid <= 0:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
    return True


ZOMBIE_AUTOMATION = "expflow: crash flow runs that stopped their heartbeat"
# Flow runs started by a worker send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY
# seconds (the Makefile sets 60); three missed beats and the run's process is taken for dead.
ZOMBIE_AFTER_S = 180


def ensure_zombie_automation(within_s: int = ZOMBIE_AFTER_S) -> str:
    """The automation that marks a flow run Crashed when its heartbeats stop (its process
    was killed, its node went down): created on the configured Prefect API unless there;
    returns its id. The flow's crash hook then fails its ledger row."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        return str(existing.id)
    automation = Automation(
        name=ZOMBIE_AUTOMATION,
        description="expflow-flows: a flow run whose heartbeat stopped is marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"its heartbeat stopped for {within_s} s: its process is gone",
            )
        ],
    )
    return str(automation.create().id)


# --- reports over HTTP, beside the server ------------------------------------------------


def reports_url(port: int, host: str = "127.0.0.1") -> str:
    """Where the reports server listens."""
    return f"http://{host}:{port}"


def _reports_answer(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=timeout) as resp:
            return resp.status == 200 and resp.headers.get("Server", "").startswith(
                "expflow-reports"
            )
    except (urllib.error.URLError, OSError):
        return False


def start_reports(port: int, host: str = "127.0.0.1", wait: float = 30.0) -> tuple[str, bool]:
    """Serve the expflow home's reports read-only on ``port`` unless that runs already;
    returns (URL, started_now). Flows link reports there from now on."""
    from expflow_flows import reports_server

    url = reports_url(port, host)
    if _reports_answer(url):
        reports_server.record(url)
        return url, False
    cmd = [sys.executable, "-m", "expflow_flows.reports_server", "--port", str(port)]
    _spawn_until(
        [*cmd, "--host", host],
        f"reports-{port}",
        None,
        lambda: _reports_answer(url),
        wait,
        "the reports server",
        port,
    )
    reports_server.record(url)
    return url, True


def stop_reports(port: int) -> bool:
    """Stop the reports server started on ``port``; False when none was."""
    from expflow_flows import reports_server

    pid_file = _state_dir() / f"reports-{port}.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink()
    reports_server.forget()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    return pid > 0


GATE_AUTOMATION = "expflow: pause a deployment whose gate failed"
NOTIFY_BLOCK_ENV = "EXPFLOW_NOTIFY_BLOCK"  # a notification block's name, e.g. slack-webhook/team


def ensure_gate_automation() -> str:
    """The automation that pauses a deployment after one of its runs failed a gate (and
    posts a notification when ``$EXPFLOW_NOTIFY_BLOCK`` names a block); returns its id."""
    from prefect.automations import Automation
    from prefect.events.actions import PauseDeployment, SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    from expflow_flows.flows.events import GATE_FAILED

    try:
        existing = Automation.read(name=GATE_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        return str(existing.id)
    actions: list = [PauseDeployment(source="inferred")]
    block = os.environ.get(NOTIFY_BLOCK_ENV)
    if block:
        actions.append(
            SendNotification(
                block_document_id=_block_id(block),
                subject="expflow: a gate failed; its deployment is paused",
                body="{{ event.resource.name }}: {{ event.payload.message }}",
            )
        )
    automation = Automation(
        name=GATE_AUTOMATION,
        description="expflow-flows: a deployment whose run failed a metric gate is paused "
        "until someone looks (resume it in the UI).",
        trigger=EventTrigger(
            expect={GATE_FAILED},
            match_related=ResourceSpecification({"prefect.resource.role": "deployment"}),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=actions,
    )
    return str(automation.create().id)


def _block_id(name: str) -> Any:
    """A block document's id from its 'type-slug/name'."""
    from prefect.blocks.core import Block

    try:
        return Block.load(name)._block_document_id
    except Exception as exc:  # noqa: BLE001 - any lookup error is the user's name
        raise ExpflowError(
            f"{NOTIFY_BLOCK_ENV}={name!r}: no such block ({exc}); expected 'type-slug/name' "
            "such as 'slack-webhook/team'"
        ) from None
