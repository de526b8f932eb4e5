"""Checkpoints that survive a killed process, a lost Dask worker and a job's end.

A training script that checkpoints each step into $EXPFLOW_CHECKPOINT_DIR
(tests/foreign/checkpointing/train.py) is killed with SIGKILL mid-training; the HPO
stage retries it as a new trial with the same parameters and the sweep retries the
combination, and either way the retry resumes: its first reported step comes after the
checkpoint, and the killed attempt counts once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from expflow_flows.runs import trainable as trainable_mod
from expflow_flows.runs.trainable import request_checkpoint, run_trainable

SCRIPT = Path(__file__).parent / "foreign" / "checkpointing" / "train.py"


def kill_at_step(root: Path, step: int, *, worker: bool = False, timeout: float = 120) -> dict:
    """In the background: once a checkpoint under ``root`` reaches ``step``, SIGKILL the
    script (and, with ``worker``, the process that started it: a lost Dask worker)."""
    seen: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and "step" not in seen:
            for state in root.rglob("state.json"):
                try:
                    at = json.loads(state.read_text())["step"]
                    pid, parent = map(int, (state.parent / "pid").read_text().split())
                except (OSError, ValueError, KeyError):
                    continue
                if at >= step:
                    seen.update(step=at, folder=state.parent, pid=pid, parent=parent)
                    os.kill(pid, signal.SIGKILL)
                    if worker:
                        os.kill(parent, signal.SIGKILL)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    seen["_thread"] = thread
    return seen


def steps_of(run_dir: Path) -> list[int]:
    rows = json.loads((Path(run_dir) / "intermediate.json").read_text())
    return [row["step"] for row in rows]


def test_a_killed_hpo_trial_is_retried_and_resumes_from_its_checkpoint(
    prefect_harness, home, tmp_path
):
    from expflow_flows.flows.pipeline import hpo_flow
    from expflow_flows.hpo import study as hpo
    from expflow_flows.settings.pipeline import load_pipeline_settings

    settings = load_pipeline_settings(
        overrides={
            "experiment": "killed",
            "train": {"target": str(SCRIPT)},
            "space": {"lr": {"type": "float", "low": 0.05, "high": 0.2}},
            "params": {"steps": 8, "delay": 0.25},
            "objective": "loss",
            "hpo": {"n_trials": 2, "seed": 0, "pruner": "none", "budget": {"epochs": 1}},
            "cluster": {"kind": "threads", "workers": 1},
        }
    )
    experiment = tmp_path / "killed"
    killer = kill_at_step(experiment / "checkpoints", 3)
    outcome = hpo_flow(settings, str(experiment))
    assert killer.get("step", 0) >= 3, "the trial was never killed"

    study = hpo.load_study(None, "killed")
    trials = study.get_trials(deepcopy=False)
    first, retry = trials[0], trials[1]
    assert first.state.name == "FAIL" and first.user_attrs[hpo.INFRA_ATTR]
    assert "killed by signal 9" in first.user_attrs["reason"]
    # The retry: the same parameters and checkpoint folder, told it continues trial 0.
    assert retry.user_attrs[hpo.RETRY_OF_ATTR] == 0
    assert retry.params == first.params
    assert retry.user_attrs[hpo.CHECKPOINT_ATTR] == first.user_attrs[hpo.CHECKPOINT_ATTR]
    assert retry.state.name == "COMPLETE"
    resumed = steps_of(retry.user_attrs["run_dir"])
    assert resumed[0] > killer["step"] >= 3 and resumed[-1] == 8
    log = (Path(retry.user_attrs["run_dir"]) / "output.log").read_text()
    assert f"resumed from step {resumed[0] - 1}" in log
    meta = json.loads((Path(retry.user_attrs["run_dir"]) / "metadata.json").read_text())
    assert meta["checkpoint"]["resumed"] is True and meta["progress"]["first_step"] == resumed[0]
    # The killed attempt counts once: two finished trials, three in the study.
    assert outcome["complete"] == 2 and hpo.finished_count(study) == 2 and len(trials) == 3


def sweep_once(name: str, cluster: dict, steps: int = 8):
    from expflow_flows.flows.sweep import sweep

    return sweep(
        settings={
            "name": name,
            "trainable": str(SCRIPT),
            "space": {"grid": {"lr": [0.1]}, "fixed": {"steps": steps, "delay": 0.25}},
            "cluster": cluster,
            "retries": 2,
        }
    )


def only_run(home: Path, name: str) -> Path:
    (run_dir,) = [p.parent for p in (home / "runs" / name / "runs").rglob("status")]
    return run_dir


def test_a_killed_combination_is_retried_in_place_and_resumes(prefect_harness, home):
    killer = kill_at_step(home / "runs" / "killed-sweep" / "checkpoints", 3)
    summary = sweep_once("killed-sweep", {"kind": "threads", "workers": 1})
    assert killer.get("step", 0) >= 3, "the combination was never killed"
    assert summary["counts"] == {"ok": 1}
    run_dir = only_run(home, "killed-sweep")
    resumed = steps_of(run_dir)
    assert resumed[0] > killer["step"] and resumed[-1] == 8
    log = (run_dir / "output.log").read_text()
    retried = [line for line in log.splitlines() if "retry 1 of 2 resumes from" in line]
    assert len(retried) == 1 and "was killed by signal 9" in retried[0]
    assert f"resumed from step {resumed[0] - 1}" in log
    # The checkpoint folder is the step's own, beside the run folders.
    assert killer["folder"].is_relative_to(home / "runs" / "killed-sweep" / "checkpoints")


def test_a_lost_dask_worker_costs_only_the_time_since_the_checkpoint(prefect_harness, home):
    """A node failure as Dask sees it: the worker process and its trainable die; Dask runs
    the combination again on a new worker, which resumes from the checkpoint."""
    killer = kill_at_step(home / "runs" / "lost-worker" / "checkpoints", 3, worker=True)
    summary = sweep_once("lost-worker", {"kind": "local", "workers": 1})
    assert killer.get("step", 0) >= 3, "the worker was never killed"
    assert summary["counts"] == {"ok": 1}
    resumed = steps_of(only_run(home, "lost-worker"))
    assert resumed[0] > killer["step"] and resumed[-1] == 8


def test_a_stop_request_checkpoints_the_script_and_says_it_resumes(tmp_path):
    """What a time limit does to a run: SIGUSR1 and the stop file; the run ends
    'stopped to be resumed' with how far it got, and the next attempt goes on."""
    ckpt = tmp_path / "ckpt"

    def stop_at_two(step: int, values: dict) -> bool:
        if step == 2:
            request_checkpoint("Slurm job 7 reaches its time limit in 60 s")
        return False

    try:
        first = run_trainable(
            str(SCRIPT),
            {"steps": 6, "delay": 0.2},
            tmp_path / "a",
            hook=stop_at_two,
            checkpoint_dir=ckpt,
        )
    finally:
        trainable_mod.clear_checkpoint_request()
    assert first.status == "failed"
    assert first.reason.startswith("stopped to be resumed (Slurm job 7 reaches its time limit")
    assert (tmp_path / "a" / "EXPFLOW_STOP").read_text().startswith("Slurm job 7")
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["progress"]["last_step"] >= 2 and meta["reason"] == first.reason
    assert meta["checkpoint"] == {"dir": str(ckpt), "resumed": False, "files": 2}
    second = run_trainable(
        str(SCRIPT), {"steps": 6, "delay": 0.01}, tmp_path / "b", checkpoint_dir=ckpt
    )
    assert second.status == "ok" and second.metrics["steps"] == 6
    assert steps_of(tmp_path / "b")[0] == meta["progress"]["last_step"] + 1


def test_runs_that_start_after_a_stop_request_do_not_start(tmp_path):
    try:
        request_checkpoint("the job ends")
        result = run_trainable(str(SCRIPT), {"steps": 3}, tmp_path / "late")
    finally:
        trainable_mod.clear_checkpoint_request()
    assert result.status == "failed"
    assert result.reason == "stopped to be resumed before it started (the job ends)"
    assert not (tmp_path / "late" / "intermediate.json").exists()


def test_a_callable_sees_the_stop_and_its_empty_checkpoint_folder_is_not_kept(tmp_path):
    try:
        result = run_trainable(
            "sample_trainables:stops_when_told", {"steps": 50}, tmp_path / "c", hook=None
        )
    finally:
        trainable_mod.clear_checkpoint_request()
    assert result.status == "failed" and "stopped to be resumed" in result.reason
    assert result.metrics == {}
    meta = json.loads((tmp_path / "c" / "metadata.json").read_text())
    assert meta["progress"]["last_step"] == 4  # the step it reported when it was stopped
    assert not (tmp_path / "c" / "checkpoint").exists()  # nothing was saved in it


def test_a_script_dies_with_the_process_that_started_it(tmp_path):
    """An orphan would go on writing into a checkpoint folder its retry now uses."""
    import subprocess

    code = (
        "from expflow_flows.runs.trainable import run_trainable; "
        f"run_trainable({str(SCRIPT)!r}, {{'steps': 1000, 'delay': 0.1}}, "
        f"{str(tmp_path / 'r')!r}, checkpoint_dir={str(tmp_path / 'k')!r})"
    )
    runner = subprocess.Popen([sys.executable, "-c", code])
    pid_file = tmp_path / "k" / "pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text().split()[0])
    runner.kill()
    runner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the script outlived the process that started it")


def test_the_slurm_guard_keeps_the_margin_asked_for_and_stops_on_sigusr1(tmp_path, monkeypatch):
    """Slurm's warning signal may come up to a minute early: with the job's end time
    known, the guard waits for the margin asked for; without it, it stops at once."""
    from expflow_flows.runs import slurmjob

    monkeypatch.setenv("SLURM_JOB_ID", "424242")
    monkeypatch.setenv(slurmjob.LIMIT_ENV, "2")
    monkeypatch.setenv(slurmjob.WARNING_ENV, "30")
    stop = tmp_path / "stops" / "run"
    said: list[str] = []
    try:
        with slurmjob.guard(stop, said.append) as guard:
            assert guard is not None and guard.ends is None  # scontrol knows no job 424242
            guard.ends = time.time() + 300
            guard.timer = threading.Timer(3600, lambda: None)
            guard.warned("Slurm job 424242 was warned (SIGUSR1)")
            assert trainable_mod.checkpoint_requested() is None and not stop.exists()
            assert "the trainables checkpoint 30 s before it" in said[-1]
            guard.timer = None
            os.kill(os.getpid(), signal.SIGUSR1)  # the end time unknown: at once
            deadline = time.monotonic() + 10
            while trainable_mod.checkpoint_requested() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        assert trainable_mod.checkpoint_requested() == "Slurm job 424242 was warned (SIGUSR1)"
        assert stop.read_text().startswith("Slurm job 424242 was warned")
        # the handlers are Python's own again once the flow is done
        assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)
    finally:
        trainable_mod.clear_checkpoint_request()


def test_requeue_stops_at_the_limit_and_outside_a_job(monkeypatch):
    from expflow_flows.runs import slurmjob

    said: list[str] = []
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurmjob.requeue(said.append) is False and not said
    monkeypatch.setenv("SLURM_JOB_ID", "424242")
    monkeypatch.setenv(slurmjob.LIMIT_ENV, "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert slurmjob.requeue(said.append) is False
    assert said == ["Slurm job 424242 was requeued 3 times already (requeue_limit 3)"]
