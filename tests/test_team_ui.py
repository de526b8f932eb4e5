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
