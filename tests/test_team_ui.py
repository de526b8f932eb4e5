"""The team's UI path: `expflow server start` on a port of one's own, a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_deployment import free_port
from test_sweep_report import needs_chromium

EXPFLOW = str(Path(sys.executable).with_name("expflow"))


@pytest.fixture(scope="module")
def own_port_server(tmp_path_factory):
    """`expflow server start --port N` with its own homes, stopped afterwards."""
    root = tmp_path_factory.mktemp("ui")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect"),
        "EXPFLOW_HOME": str(root / "expflow"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_UI_API_URL", None)
    started = subprocess.run(
        [EXPFLOW, "server", "start", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    yield {"port": port, "env": env, "root": root, "out": started.stdout}
    subprocess.run(
        [EXPFLOW, "server", "stop", "--port", str(port)], env=env, capture_output=True, timeout=60
    )


def test_the_ui_on_another_port_talks_to_its_own_server(own_port_server):
    """The UI reads its API address from /ui-settings: it must be this server's, not
    the default port's (where another server may run)."""
    port = own_port_server["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:
        settings = json.load(resp)
    assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
    assert f"UI: http://127.0.0.1:{port}" in own_port_server["out"]


def test_the_server_also_serves_the_homes_reports_read_only(own_port_server):
    port = own_port_server["port"]
    assert f"Reports: http://127.0.0.1:{port + 1}/" in own_port_server["out"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/", timeout=10) as resp:
        assert resp.status == 200 and b"expflow reports" in resp.read()
    recorded = own_port_server["root"] / "expflow" / "server" / "reports-server.json"
    assert json.loads(recorded.read_text())["url"] == f"http://127.0.0.1:{port + 1}"


GATE_SCRIPT = """
import json, sys
from prefect import flow
from prefect.events import emit_event
from expflow_flows.flows.events import GATE_FAILED, metric_resource
from expflow_flows.server import ensure_gate_automation

@flow
def nightly():
    pass

automation = ensure_gate_automation()
deployment_id = str(nightly.to_deployment(name="nightly-gate").apply())
emit_event(
    event=GATE_FAILED,
    resource={"prefect.resource.id": "expflow.experiment.nightly", "prefect.resource.name": "nightly"},
    related=[
        {"prefect.resource.id": f"prefect.deployment.{deployment_id}", "prefect.resource.role": "deployment"},
        metric_resource("nrmse", 0.12, "lt", 0.05),
    ],
    payload={"message": "nrmse 0.12 is not lt 0.05"},
)
print(json.dumps({"automation": automation, "deployment": deployment_id}))
"""


def test_a_failed_gate_pauses_its_deployment_through_the_automation(own_port_server, tmp_path):
    """The event a failed gate emits, and the automation `make deploy` installs, on a real
    server: the deployment whose run failed its gate ends up paused."""
    import time

    port = own_port_server["port"]
    api = f"http://127.0.0.1:{port}/api"
    script = tmp_path / "gate_event.py"
    script.write_text(GATE_SCRIPT)
    env = {**own_port_server["env"], "PREFECT_API_URL": api}
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 90
    paused = False
    while time.monotonic() < deadline and not paused:
        with urllib.request.urlopen(f"{api}/deployments/{ids['deployment']}", timeout=10) as r:
            paused = json.load(r)["paused"]
        time.sleep(1)
    assert paused, "the deployment was not paused after its gate failed"


PAUSE_SCRIPT = """
from prefect import flow
import prefect.runtime.deployment as deployment
deployment.get_id = lambda: "ui-test"  # as a deployment's run
from expflow_flows.flows import approval
from expflow_flows.governance import pin
pin.init_pin("24681357")

@flow(name="approval-ui")
def submit_like():
    approval.approve("submit", "/data/submissions/entry", timeout_s=300, log=print)
    return "submitted"

submit_like()
print("SUBMITTED")
"""


def _api(port: int, method: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as resp:
        text = resp.read()
        return json.loads(text) if text else None


@needs_chromium
def test_the_approval_form_in_the_ui_asks_for_approval_and_the_pin(own_port_server, tmp_path):
    """A deployment run with a PIN set pauses at the submission; the Prefect UI (on its
    own port) shows the Resume form with the approval box and the PIN field."""
    import base64
    import time

    from test_sweep_report import _Cdp

    port = own_port_server["port"]
    script = tmp_path / "pause.py"
    script.write_text(PAUSE_SCRIPT)
    env = {**own_port_server["env"], "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("EXPFLOW_PIN", None)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        paused = []
        while not paused and time.monotonic() < deadline:
            paused = _api(
                port,
                "POST",
                "/flow_runs/filter",
                {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}},
            )
            time.sleep(1)
        assert paused, "the run never paused for approval"
        run_id = paused[0]["id"]
        cdp = _Cdp(timeout_s=150)
        try:
            cdp.call(
                "Page.navigate",
                {"url": f"http://127.0.0.1:{port}/runs/flow-run/{run_id}"},
                session=True,
            )
            click = (
                "(() => { const b = Array.from(document.querySelectorAll('button'))"
                ".find(b => /Resume/.test(b.innerText)); if (b) { b.click(); return true; }"
                " return false; })()"
            )
            while not cdp.evaluate(click):
                assert time.monotonic() < cdp.deadline, "no Resume button in the UI"
                time.sleep(0.5)
            form = "document.body.innerText"
            while "PIN" not in (cdp.evaluate(form) or ""):
                assert time.monotonic() < cdp.deadline, "the Resume form has no PIN field"
                time.sleep(0.5)
            text = cdp.evaluate(form)
            assert "Approve the act named in the run's logs." in text
            shot = cdp.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
            shots = Path(os.environ.get("EXPFLOW_TEST_SHOTS") or tmp_path / "shots")
            shots.mkdir(parents=True, exist_ok=True)
            (shots / "approval-form.png").write_bytes(base64.b64decode(shot))
        finally:
            cdp.close()
        _api(
            port,
            "POST",
            f"/flow_runs/{run_id}/resume",
            {"run_input": {"approve": True, "pin": "24681357"}},
        )
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "SUBMITTED" in out, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
