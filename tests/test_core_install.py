"""The core package with none of its optional SDKs: a fresh venv holding only
`pip install expflow-flows` (no extras) runs the CLI and the demo pipeline, and a
command that needs a missing SDK says which extra to install, in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).with_name("uv")
OPTIONAL = ("clearml", "clearml_agent", "langfuse", "mcp", "dask_jobqueue", "psycopg")


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    """A venv with the core install only (uv's cache makes this a few seconds)."""
    root = tmp_path_factory.mktemp("core")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    out = subprocess.run(
        [
            str(UV), "pip", "install", "--quiet", "--python", str(py),
            "--override", str(REPO / "constraints" / "overrides.txt"), "-e", str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PYTHONPATH"))}
    env.update(
        EXPFLOW_HOME=str(root / "home"),
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return {"py": py, "bin": venv / "bin", "env": env, "root": root}


def run(
    core, *argv: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(core["bin"] / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env={**core["env"], **(env or {})},
        cwd=core["root"],
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_no_optional_sdk_is_installed_or_imported(core):
    installed = run(core, "python", "-m", "pip", "list", "--format=json")
    names = {p["name"].lower().replace("-", "_") for p in json.loads(installed.stdout)}
    assert not names & set(OPTIONAL), names & set(OPTIONAL)
    probe = (
        "import sys, expflow_flows, expflow_flows.cli.app, expflow_flows.flows.pipeline, "
        "expflow_flows.flows.sweep, expflow_flows.workers, expflow_flows.integrations.tracking; "
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    out = run(core, "python", "-c", probe)
    assert out.returncode == 0, out.stderr
    assert not set(eval(out.stdout)) & set(OPTIONAL)  # noqa: S307 - our own printed list


def test_cli_and_demo_pipeline_run_on_the_core(core):
    helped = run(core, "expflow", "--help")
    assert helped.returncode == 0 and "pipeline" in helped.stdout and "sweep" in helped.stdout
    out = run(
        core,
        "expflow", "pipeline", "run",
        "--config", str(REPO / "deployments" / "pde-advection.yaml"),
        "--n-trials", "3", "--cluster", "threads", "--workers", "1",
        "--set", "hpo.budget={epochs: 3}", "--set", "train.budget={epochs: 5}",
        "--gate", "nrmse:lt:1.0", "--no-submit", "--json",
        timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 3
    assert summary["metrics"]["nrmse"] < 1.0


def test_a_command_needing_a_missing_sdk_names_the_extra(core):
    out = run(
        core,
        "expflow", "pipeline", "run", "--n-trials", "1", "--cluster", "threads",
        "--set", "tracking={langfuse: {}}",
    )  # fmt: skip
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: Langfuse tracking needs the langfuse package: pip install 'expflow-flows[langfuse]'"
    ], out.stderr[-3000:]
    mcp = run(core, "expflow", "mcp")
    assert mcp.returncode == 2
    assert mcp.stderr.strip() == (
        "error: expflow mcp needs the mcp package: pip install 'expflow-flows[mcp]'"
    )
    clearml = run(
        core, "expflow", "compare", "--source", "clearml", "--project", "p", "--metric", "nrmse"
    )
    assert clearml.returncode == 2
    assert clearml.stderr.strip().endswith("pip install 'expflow-flows[clearml]'"), clearml.stderr


def test_system_status_shows_whole_install_hints_on_the_core(core):
    out = run(core, "expflow", "system", "status", env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for extra in ("clearml", "langfuse", "mcp"):
        assert f"pip install 'expflow-flows[{extra}]'" in out.stdout, out.stdout
