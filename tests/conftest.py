"""Test setup: an isolated expflow home and Prefect home, and one Prefect harness per session.

The environment is set before anything imports Prefect, so no test touches the
user's ~/.expflow or ~/.prefect, and Dask worker processes inherit it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="expflow-test-"))
os.environ["EXPFLOW_HOME"] = str(_SESSION_HOME / "expflow")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.3"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("EXPFLOW_PIN", None)
os.environ.pop("EXPFLOW_PIN_HASH", None)
TESTS_DIR = Path(__file__).parent
# Dask worker processes import the test trainables by module name.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a real API on a temporary SQLite database), once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh expflow home for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("EXPFLOW_HOME", str(h))
    monkeypatch.delenv("EXPFLOW_RUNS_ROOT", raising=False)
    monkeypatch.delenv("EXPFLOW_DATA_DIR", raising=False)
    return h


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm (scripts/slurm-up.sh), shared by the session and
    stopped at its end; SLURM_CONF set for this process and its children."""
    t0 = time.monotonic()
    up = subprocess.run(
        [str(TESTS_DIR.parent / "scripts" / "slurm-up.sh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = up.stdout.strip().splitlines()
    skip = [line for line in out if line.startswith("SKIP:")]
    conf = [line for line in out if line.startswith("export SLURM_CONF=")]
    if up.returncode != 0 or skip or not conf:
        reason = skip[0] if skip else (up.stderr.strip().splitlines() or ["slurm-up.sh failed"])[-1]
        pytest.skip(f"no Slurm: {reason}")
    print(f"slurm-up.sh took {time.monotonic() - t0:.1f} s")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf[-1].split("=", 1)[1]
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        subprocess.run(
            [str(TESTS_DIR.parent / "scripts" / "slurm-down.sh")], capture_output=True, timeout=60
        )
