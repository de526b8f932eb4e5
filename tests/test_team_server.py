"""A team server: Prefect's server on the machine's PostgreSQL, two workers on one pool,
and two pipeline runs sharing one Optuna study that lives in PostgreSQL too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_deployment import PREFECT, REPO, api, free_port, stop, wait_for_terminal

PG = "postgres@127.0.0.1:5432"


def psql(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"postgresql://{PG}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


@pytest.fixture(scope="module")
def databases():
    """Two fresh databases on the local PostgreSQL: Prefect's and Optuna's."""
    pytest.importorskip("psycopg")
    suffix = uuid.uuid4().hex[:8]
    names = {"prefect": f"expflow_prefect_{suffix}", "optuna": f"expflow_optuna_{suffix}"}
    try:
        for name in names.values():
            psql(f"CREATE DATABASE {name}")
    except Exception as exc:  # noqa: BLE001 - no PostgreSQL on this machine
        pytest.skip(f"no PostgreSQL at {PG}: {exc}")
    yield names
    for name in names.values():
        try:
            psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except Exception:  # noqa: BLE001, S110 - best effort cleanup
            pass


@pytest.fixture(scope="module")
def team_server(databases, tmp_path_factory):
    """`expflow server start --database-url postgresql+asyncpg://…` on a free port."""
    root = tmp_path_factory.mktemp("team")
    port = free_port()
    env = {
        **os.environ,
        "EXPFLOW_HOME": str(root / "expflow"),
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    env.pop("PREFECT_API_URL", None)
    expflow = str(Path(sys.executable).with_name("expflow"))
    db_url = f"postgresql+asyncpg://{PG}/{databases['prefect']}"
    out = subprocess.run(
        [expflow, "server", "start", "--port", str(port), "--database-url", db_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    yield {"url": env["PREFECT_API_URL"], "env": env, "root": root, "port": port}
    subprocess.run([expflow, "server", "stop", "--port", str(port)], env=env, timeout=60)


def test_two_workers_two_runs_one_study_on_postgresql(team_server, databases):
    from expflow_flows.hpo.study import open_study

    env = team_server["env"]

    def prefect(*args: str) -> str:
        out = subprocess.run(
            [PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    # The server's own tables are in PostgreSQL.
    import psycopg

    with psycopg.connect(f"postgresql://{PG}/{databases['prefect']}", connect_timeout=5) as conn:
        tables = {
            r[0] for r in conn.execute("select tablename from pg_tables where schemaname='public'")
        }
    assert "flow_run" in tables

    storage = f"postgresql+psycopg://{PG}/{databases['optuna']}"
    open_study(storage, "team-study")  # create it once, before two runs load it at the same time
    prefect("work-pool", "create", "expflow-local", "--type", "process")
    prefect("deploy", "--name", "pde-advection")
    logs = [open(team_server["root"] / f"worker-{i}.log", "wb") for i in range(2)]
    workers = [
        subprocess.Popen(
            [
                PREFECT,
                "worker",
                "start",
                "--pool",
                "expflow-local",
                "--type",
                "process",
                "--limit",
                "1",
                "--name",
                f"worker-{i}",
            ],
            cwd=REPO,
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for i in range(2)
    ]
    try:
        params = {
            "settings": {
                "experiment": "team",
                "hpo": {
                    "study_name": "team-study",
                    "storage": storage,
                    "n_trials": 4,
                    "budget": {"epochs": 4},
                },
                "train": {"budget": {"epochs": 6}},
                "cluster": {"workers": 2},
                "gates": ["nrmse:lt:1.0"],
                "submit": {"enabled": False},
            }
        }
        ids = []
        for _ in range(2):
            out = prefect(
                "deployment", "run", "pipeline/pde-advection", "--params", json.dumps(params)
            )
            ids.append(re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1))
        states = [wait_for_terminal(team_server, i, timeout=400) for i in ids]
        assert [s["type"] for s in states] == ["COMPLETED", "COMPLETED"], states
    finally:
        for w in workers:
            stop(w)
        for log in logs:
            log.close()
    # Each worker took one of the runs (each may hold one run at a time).
    runs = [api(team_server, "GET", f"/flow_runs/{i}") for i in ids]
    assert {r["work_pool_name"] for r in runs} == {"expflow-local"}
    worker_logs = [(team_server["root"] / f"worker-{i}.log").read_text() for i in range(2)]
    assert all(any(i in text for i in ids) for text in worker_logs), "one worker ran both"
    # The study lives in PostgreSQL; its trials ran in more than one Dask worker process.
    import optuna

    study = optuna.load_study(study_name="team-study", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) >= 4
    pids = {
        json.loads((Path(t.user_attrs["run_dir"]) / "metadata.json").read_text())["pid"]
        for t in complete
    }
    assert len(pids) >= 2
