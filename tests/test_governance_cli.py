"""Governance through the `expflow` CLI: PIN, runs, compare, audit, system status.

Commands run both in-process through Typer's CliRunner and as real subprocesses
(the way a terminal or CI runs them, with no TTY on stdin).
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import expflow_flows
from expflow_flows.cli.app import app
from expflow_flows.governance.ledger import Ledger

EXPFLOW = str(Path(sys.executable).with_name("expflow"))
runner = CliRunner()


def cli(*args: str, env: dict | None = None):
    return subprocess.run(
        [EXPFLOW, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("error: ")
    return lines[0]


def finished(ledger: Ledger, name: str, metrics: dict, params: dict | None = None, run_dir=None):
    row = ledger.register(name, trainable="pkg.mod:train", params=params or {}, run_dir=run_dir)
    ledger.move_to(row.id, "RUNNING")
    ledger.update(row.id, metrics=metrics)
    return ledger.move_to(row.id, "COMPLETED")


# --- PIN -----------------------------------------------------------------------------


def test_pin_lifecycle_from_the_command_line(home):
    assert cli("pin", "init", "--new-pin", "2468").returncode == 0
    pin_file = home / "pin.json"
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
    assert "2468" not in pin_file.read_text()

    assert cli("pin", "check", "--pin", "2468").returncode == 0
    wrong = cli("pin", "check", "--pin", "1111")
    assert wrong.returncode == 1 and "wrong" in wrong.stdout

    # Replacing or clearing needs the current PIN; without a terminal nothing is asked.
    line = error_line(cli("pin", "init", "--new-pin", "1357"))
    assert "current pin" in line.lower()
    assert cli("pin", "change", "--pin", "2468", "--new-pin", "1357").returncode == 0
    assert cli("pin", "check", "--pin", "1357").returncode == 0
    error_line(cli("pin", "clear", "--pin", "2468"))
    assert cli("pin", "clear", "--pin", "1357").returncode == 0
    status = json.loads(cli("pin", "status").stdout)
    assert status["set"] is False

    # No PIN in any field of the audit records (a pid such as 31111 is not a PIN).
    records = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    text = json.dumps([{k: v for k, v in r.items() if k not in ("pid", "ts")} for r in records])
    for secret in ("2468", "1357", "1111"):
        assert secret not in text


def test_bad_new_pin_is_refused_in_one_line(home):
    line = error_line(cli("pin", "init", "--new-pin", "12ab"))
    assert "4" in line and "12" in line  # says what is accepted: 4 to 12 digits


# --- runs -----------------------------------------------------------------------------


def test_runs_list_and_show(home):
    ledger = Ledger()
    done = finished(ledger, "fno-a", {"nrmse": 0.02})
    draft = ledger.register("fno-b")
    result = runner.invoke(app, ["runs", "list", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == [draft.id, done.id]  # newest first
    only = json.loads(runner.invoke(app, ["runs", "list", "--state", "COMPLETED", "--json"]).stdout)
    assert [r["name"] for r in only] == ["fno-a"]
    shown = json.loads(runner.invoke(app, ["runs", "show", done.id]).stdout)
    assert shown["metrics"] == {"nrmse": 0.02}
    assert [h["to"] for h in shown["history"]] == ["DRAFT", "RUNNING", "COMPLETED"]


def test_runs_list_keeps_each_id_whole_on_one_line_at_80_columns(home):
    ledger = Ledger()
    ids = [
        finished(ledger, "a-rather-long-experiment-name", {"nrmse": 0.02}).id,
        ledger.register("fno-b", flow_run_id="5d184b8a-2b6a-4d38-b417-bf56664d565a").id,
    ]
    out = cli("runs", "list", env={"COLUMNS": "80"}).stdout
    assert all(len(line) <= 80 for line in out.splitlines())
    for exp_id in ids:
        assert any(exp_id in line for line in out.splitlines()), (exp_id, out)
    # the id copied from the table is one `runs show` takes
    assert json.loads(cli("runs", "show", ids[0]).stdout)["id"] == ids[0]


def test_runs_show_unknown_id_and_bad_state(home):
    assert "424242" in error_line(cli("runs", "show", "424242"))
    assert "RUNING" in error_line(cli("runs", "list", "--state", "RUNING"))


def invoked_error(*args: str) -> str:
    """The one error line of an in-process `expflow` command that must fail with status 2."""
    result = runner.invoke(app, list(args))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output)
    assert lines[0].startswith("error: ")
    return lines[0]


def audit_entries(home: Path, action: str) -> list[dict]:
    lines = (home / "audit.log").read_text().splitlines() if (home / "audit.log").exists() else []
    return [e for e in map(json.loads, lines) if e["action"] == action]


def scheduled_flow_run() -> str:
    """A flow run waiting for a worker on the test harness's Prefect API, as a queued run does."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    @flow(name="long-job")
    def long_job() -> None:
        """Never runs: its run only waits to be cancelled."""

    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(long_job, state=Scheduled()).id)


def prefect_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def test_an_unreachable_prefect_changes_nothing_and_asks_no_pin(home):
    from expflow_flows.governance import pin

    pin.init_pin("9753")
    row = Ledger().register("long", flow_run_id="00000000-0000-4000-8000-000000000000")
    Ledger().move_to(row.id, "RUNNING")
    dead = {"PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_CLIENT_MAX_RETRIES": "0"}
    line = error_line(cli("runs", "cancel", row.id, "--pin", "9753", env=dead))
    assert "does not answer" in line and "127.0.0.1:9" in line
    assert Ledger().get(row.id).state == "RUNNING"
    assert audit_entries(home, "cancel") == []


def test_cancel_is_pin_guarded_and_ends_in_prefect_and_the_ledger(prefect_harness, home):
    from expflow_flows.governance import pin

    pin.init_pin("9753")
    run_id = scheduled_flow_run()
    row = Ledger().register("long", flow_run_id=run_id, state="ENQUEUED")
    line = invoked_error("runs", "cancel", row.id)
    assert "PIN" in line and "--force" in line
    assert "wrong PIN" in invoked_error("runs", "cancel", row.id, "--pin", "0000")
    assert Ledger().get(row.id).state == "ENQUEUED" and prefect_state(run_id) == "SCHEDULED"

    # By its flow run id as well as by its experiment id.
    done = runner.invoke(app, ["runs", "cancel", run_id, "--pin", "9753"])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == f"cancelled {row.id} (long), flow run {run_id}"
    assert prefect_state(run_id) == "CANCELLED"
    history = Ledger().history(row.id)
    assert [(h["event"], h["to"]) for h in history[1:]] == [
        ("request_cancel", "CANCEL_PENDING"),
        ("cancel", "CANCELLED"),
    ]
    assert "already CANCELLED" in invoked_error("runs", "cancel", row.id, "--pin", "9753")

    # A run that no deployment made cannot be retried here; nothing changes.
    assert "did not run from a deployment" in invoked_error("runs", "retry", row.id)
    assert Ledger().get(row.id).state == "CANCELLED" and prefect_state(run_id) == "CANCELLED"

    cancels = audit_entries(home, "cancel")
    assert [e["outcome"] for e in cancels] == ["refused", "refused", "allowed"]
    assert {e["target"] for e in cancels} == {f"{row.id} (long), flow run {run_id} via cli"}


# --- compare ------------------------------------------------------------------------


@pytest.fixture
def three(home):
    ledger = Ledger()
    return [
        finished(ledger, "a", {"nrmse": 0.03, "train_time_min": 12.0}),
        finished(ledger, "b", {"nrmse": 0.01, "train_time_min": 75.0}),
        finished(ledger, "c", {"nrmse": 0.02, "train_time_min": 5.0}),
        finished(ledger, "d", {"val_nrmse": 0.5}),
    ]


def test_compare_ranks_by_the_registry_direction(three):
    out = json.loads(runner.invoke(app, ["compare", "--metric", "nrmse", "--json"]).stdout)
    assert out["direction"] == "minimize"
    assert [r["name"] for r in out["rows"]] == ["b", "c", "a"]
    assert [e["name"] for e in out["excluded"]] == ["d"]
    desc = json.loads(
        runner.invoke(app, ["compare", "--metric", "PDE/nrmse", "--desc", "--json"]).stdout
    )
    assert [r["name"] for r in desc["rows"]] == ["a", "c", "b"]


def test_compare_filters_by_gates_and_exports_csv(three):
    result = runner.invoke(app, ["compare", "--gate", "train_time_min:lt:60", "--csv"])
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("rank,id,name,state,value")
    assert [ln.split(",")[2] for ln in lines[1:]] == ["c", "a"]


def test_compare_unknown_metric_lists_the_known_ones(three):
    line = error_line(cli("compare", "--metric", "nrsme"))
    assert "'nrsme'" in line and "PDE/nrmse" in line


def test_a_gate_on_a_metric_no_experiment_reports_is_an_error_naming_it(three):
    result = cli("compare", "--metric", "nrmse", "--gate", "no_such_metric:lt:1")
    assert result.returncode == 2
    line = error_line(result)
    assert "'no_such_metric'" in line and "nrmse" in line and "train_time_min" in line


# --- audit -------------------------------------------------------------------------


def bundle_run(tmp_path: Path, metrics: dict) -> Path:
    """A pipeline run folder whose summary.json points at a real bundle."""
    from expflow_flows.bundles.submission import write_bundle

    pred = tmp_path / "pred.hdf5"
    pred.write_bytes(b"predictions")
    bundle = write_bundle(tmp_path / "subs", "b1", {"pred.hdf5": pred}, metrics=metrics, params={})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"bundle": str(bundle)}))
    return run_dir


def test_audit_validate_passes_a_good_experiment_and_fails_a_broken_one(home, tmp_path):
    metrics = {"nrmse": 0.02, "train_time_min": 3.0}
    good = finished(
        Ledger(), "good", metrics, {"sub_step": 2}, run_dir=str(bundle_run(tmp_path, metrics))
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text("primary: nrmse\nrequired_params: {sub_step: 'gt:0'}\n")
    ok = cli("audit", "validate", good.id, "--rules", str(rules))
    assert ok.returncode == 0, ok.stdout
    assert "PASSED" in ok.stdout and "sub_step" in ok.stdout

    bad = finished(Ledger(), "bad", {"nrmse": math.nan, "train_time_min": 90.0}, {"sub_step": 0})
    result = cli("audit", "validate", bad.id, "--rules", str(rules), "--json")
    assert result.returncode == 1
    checks = {c["name"]: c["outcome"] for c in json.loads(result.stdout)[0]["checks"]}
    assert list(checks.values()).count("fail") >= 3


def test_audit_dataset_and_report(home, tmp_path):
    from expflow_flows.pde.generate import generate

    good = generate(
        "advection", tmp_path / "1D_Advection_Sols_beta0.4.hdf5", n_samples=4, nx=16, nt=5
    )
    assert cli("audit", "dataset", str(good)).returncode == 0
    renamed = tmp_path / "1D_Advection_Sols_beta9.9.hdf5"
    renamed.write_bytes(good.read_bytes())
    bad = cli("audit", "dataset", str(good), str(renamed))
    assert bad.returncode == 1 and "FAILED" in bad.stdout

    finished(Ledger(), "fine", {"nrmse": 0.01})
    finished(Ledger(), "broken", {"rmse": 0.01})  # no primary score
    report = cli("audit", "report", "--out", str(tmp_path / "audits"))
    assert report.returncode == 1
    assert "2 audited, 1 failed" in report.stdout
    html_files = list((tmp_path / "audits").glob("audit-*.html"))
    md_files = list((tmp_path / "audits").glob("audit-*.md"))
    assert len(html_files) == 1 and len(md_files) == 1
    assert "broken" in md_files[0].read_text() and "<table>" in html_files[0].read_text()


def test_audit_flow_posts_a_table_and_fails_on_a_failing_check(prefect_harness, home):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from expflow_flows.flows.audit import audit_flow

    finished(Ledger(), "fine", {"nrmse": 0.01})
    assert audit_flow()["audited"] == 1
    finished(Ledger(), "broken", {"rmse": 0.01})
    state = audit_flow(return_state=True)
    assert state.is_failed() and "1 of 2 experiments failed the audit" in state.message
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["audit-checks"]))
        )
    assert any("broken" in json.dumps(a.data) for a in arts)


# --- system ------------------------------------------------------------------------


def test_system_status_and_version(home):
    rows = json.loads(cli("system", "status", "--json").stdout)
    parts = [r["part"] for r in rows]
    for part in (
        "Prefect API",
        "Dask",
        "Optuna storage",
        "Ledger",
        "PIN guard",
        "ClearML",
        "Langfuse",
        "MCP server",
        "Worker types",
        "Slurm",
    ):
        assert part in parts
    assert all(r["state"] for r in rows)
    by_part = {r["part"]: r for r in rows}
    assert by_part["Worker types"]["state"] == "ok"  # the entry point is installed
    assert "slurm" in by_part["Worker types"]["detail"]
    version = cli("version")
    assert (
        version.returncode == 0 and f"expflow-flows {expflow_flows.__version__}" in version.stdout
    )


def test_system_status_says_in_one_line_why_slurm_is_unreachable(home, tmp_path):
    bad = tmp_path / "slurm.conf"
    bad.write_text("ClusterName=x\nSlurmctldHost=localhost\nSlurmctldPort=1\n")
    for conf in (str(bad), str(tmp_path / "missing.conf")):
        rows = json.loads(cli("system", "status", "--json", env={"SLURM_CONF": conf}).stdout)
        slurm = next(r for r in rows if r["part"] == "Slurm")
        assert slurm["state"] == "unreachable"
        assert "\n" not in slurm["detail"] and "Command '[" not in slurm["detail"]
        assert "slurmctld" in slurm["detail"], slurm["detail"]


def test_deleting_ledger_entries_and_studies_is_guarded(home, tmp_path):
    from expflow_flows.governance import pin
    from expflow_flows.hpo.study import open_storage, open_study

    row = finished(Ledger(), "old", {"nrmse": 0.5})
    journal = str(tmp_path / "journal.log")
    open_study(journal, "old-study").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    pin.init_pin("8642")

    error_line(cli("runs", "delete", row.id))
    error_line(cli("pipeline", "delete-study", "old-study", "--storage", journal))
    assert Ledger().get(row.id).name == "old"
    assert [s.study_name for s in open_storage(journal).get_all_studies()] == ["old-study"]

    assert cli("runs", "delete", row.id, "--pin", "8642").returncode == 0
    assert (
        cli("pipeline", "delete-study", "old-study", "--storage", journal, "--force").returncode
        == 0
    )
    assert Ledger().list() == []
    assert open_storage(journal).get_all_studies() == []
    assert "no-such" in error_line(cli("pipeline", "delete-study", "no-such", "--storage", journal))
    outcomes = {
        (e["action"], e["outcome"])
        for e in map(json.loads, (home / "audit.log").read_text().splitlines())
    }
    assert ("delete-ledger-entry", "allowed") in outcomes
    assert ("delete-study", "forced") in outcomes
