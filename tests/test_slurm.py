"""Dask on a real single-node Slurm (scripts/slurm-up.sh): sbatch, a sweep with
cluster.kind 'slurm' and the pipeline with cluster.kind 'slurm'. Skipped when Slurm cannot start."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError

ROOT = Path(__file__).resolve().parents[1]


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return "UNKNOWN"


def _no_jobs_left(timeout: float = 20) -> None:
    """Dask workers' Slurm jobs are cancelled when the cluster closes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.3)
    raise AssertionError("Slurm jobs still queued: " + subprocess.getoutput("squeue"))


def test_unknown_slurm_setting_is_one_line_error():
    from expflow_flows.flows.clusters import slurm_cluster_kwargs
    from expflow_flows.settings.pipeline import load_pipeline_settings

    with pytest.raises(ExpflowError) as err:
        load_pipeline_settings(None, {"cluster": {"kind": "slurm", "slurm": {"bogus": 1}}})
    msg = str(err.value)
    assert "cluster.slurm.bogus" in msg and "accepted:" in msg and "cores" in msg
    assert "\n" not in msg
    with pytest.raises(ExpflowError) as err:
        slurm_cluster_kwargs({"bogus": 1})
    msg = str(err.value)
    assert "bogus" in msg and "accepted:" in msg and "cores" in msg and "\n" not in msg


def test_missing_dask_jobqueue_names_the_extra(monkeypatch):
    import sys

    from expflow_flows.flows.clusters import dask_client, task_runner
    from expflow_flows.settings.common import ClusterSettings

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    cluster = ClusterSettings(kind="slurm", workers=2)
    with pytest.raises(ExpflowError, match=r"expflow-flows\[slurm\]"):
        task_runner(cluster)  # the pipeline's HPO stage
    with pytest.raises(ExpflowError, match=r"expflow-flows\[slurm\]"):
        with dask_client(cluster, {}):  # the sweep
            pass


def test_sweep_settings_reject_unknown_cluster():
    from expflow_flows.settings.sweep import load_sweep_settings

    base = {"trainable": "m:f", "space": {"grid": {"x": [1]}}}
    with pytest.raises(ExpflowError) as err:
        load_sweep_settings(None, {**base, "cluster": {"kind": "pbs"}})
    msg = str(err.value)
    assert "cluster.kind='pbs'" in msg and "'slurm'" in msg and "\n" not in msg
    with pytest.raises(ExpflowError, match=r"'cluster\.slurm\.bogus' is not known"):
        load_sweep_settings(None, {**base, "cluster": {"kind": "slurm", "slurm": {"bogus": 1}}})


def test_sbatch_job_completes(slurm, tmp_path):
    t0 = time.monotonic()
    job = (
        subprocess.run(
            ["sbatch", "--parsable", "-o", str(tmp_path / "out.txt"), "--wrap", "echo hi"],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        )
        .stdout.strip()
        .split(";")[0]
    )
    running = None
    deadline = time.monotonic() + 30
    while (state := _job_state(job)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        if state == "RUNNING" and running is None:
            running = time.monotonic() - t0
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(0.1)
    print(f"sbatch -> running {running} s, -> {state} {time.monotonic() - t0:.2f} s")
    assert state == "COMPLETED"
    assert (tmp_path / "out.txt").read_text().strip() == "hi"


def test_sweep_on_slurm(slurm, prefect_harness, home, tmp_path, monkeypatch):
    from expflow_flows.flows.sweep import sweep

    monkeypatch.chdir(tmp_path)  # the workers' Slurm job logs land here
    t0 = time.monotonic()
    summary = sweep(
        settings={
            "name": "slurm-grid",
            "trainable": "sample_trainables:sweep_square",
            "space": {"grid": {"x": [1, 2, 3], "y": [0.0, 1.0]}},
            "cluster": {
                "kind": "slurm",
                "workers": 2,
                "slurm": {"cores": 1, "memory": "1GB", "walltime": "00:10:00"},
            },
        }
    )
    wall = time.monotonic() - t0
    print(f"sweep of 6 on Slurm: {wall:.1f} s")
    assert summary["combinations"] == 6 and summary["counts"] == {"ok": 6}
    from expflow_flows.sweep.results import SweepResults

    rows = SweepResults.load(Path(summary["sweep_dir"])).rows
    workers = {r["worker"] for r in rows}
    jobs = {w.split(":")[2] for w in workers if w.count(":") == 2}
    assert len(jobs) >= 1 and all(w.count(":") == 2 for w in workers), workers
    assert str(os.getpid()) not in {w.split(":")[1] for w in workers}
    _no_jobs_left()


def test_pipeline_on_slurm(slurm, prefect_harness, home, tmp_path, monkeypatch):
    import json

    from test_pipeline import load_study, run_pipeline

    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    summary = run_pipeline(
        tmp_path,
        hpo={"n_trials": 2},
        cluster={"kind": "slurm", "workers": 2, "slurm": {"cores": 1, "memory": "1GB"}},
        submit={"enabled": False},
    )
    print(f"pipeline with 2 trials on Slurm: {time.monotonic() - t0:.1f} s")
    assert summary["trials"]["complete"] == 2
    pids = {
        json.loads((Path(t.user_attrs["run_dir"]) / "metadata.json").read_text())["pid"]
        for t in load_study(tmp_path).trials
    }
    assert os.getpid() not in pids
    _no_jobs_left()
