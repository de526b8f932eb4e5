"""The `slurm` work pool: flow runs as sbatch jobs on a real single-node Slurm.

Everything here is real: `prefect server start`, `prefect work-pool create --type slurm`,
`prefect deploy`, `prefect worker start --type slurm`, `prefect deployment run`, and
Slurm's own daemons from scripts/slurm-up.sh. The batch scripts are also checked
against golden files in tests/golden/slurm (EXPFLOW_UPDATE_GOLDEN=1 rewrites them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.schemas.objects import FlowRun
from pydantic import ValidationError
from test_deployment import (  # noqa: F401  (server is a fixture)
    PREFECT,
    REPO,
    api,
    prefect,
    server,
    stop,
    wait_for_terminal,
)

from expflow_flows.workers.slurm import (
    JobInfo,
    SlurmJobConfiguration,
    SlurmWorker,
    accounting_info,
    end_message,
    job_environment,
    parse_scontrol,
    render_sbatch,
)

GOLDEN = Path(__file__).parent / "golden" / "slurm"
# Building a job configuration resolves block references through the API.
configuration_api = pytest.mark.usefixtures("prefect_harness")
TESTS = Path(__file__).parent


# --- the batch script -------------------------------------------------------------


def _configuration(values: dict) -> SlurmJobConfiguration:
    """A job configuration as the worker builds it: pool template + job variables."""
    template = SlurmWorker.get_default_base_job_template()
    config = asyncio.run(SlurmJobConfiguration.from_template_and_values(template, values))
    run = FlowRun(
        id=uuid.UUID("6b1b7a4e-52c4-4c53-9d7e-0d6a3c1f2a10"),
        name="golden-run",
        flow_id=uuid.UUID("0a0b0c0d-0000-4000-8000-000000000001"),
    )
    config.prepare_for_flow_run(run)
    return config


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("EXPFLOW_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with EXPFLOW_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file"


@configuration_api
def test_minimal_script_matches_golden():
    config = _configuration({"python": "/opt/venv/bin/python"})
    text = render_sbatch(config, "6b1b7a4e-52c4-4c53-9d7e-0d6a3c1f2a10", Path("/jobs/run"))
    _check_golden("minimal.sbatch", text)
    assert text.count("#SBATCH") == 4  # name, output, ntasks, comment: nothing unasked


@configuration_api
def test_full_script_matches_golden():
    config = _configuration(
        {
            "python": "python",
            "partition": "gpu",
            "account": "pde-team",
            "qos": "normal",
            "time_limit": "02:00:00",
            "cpus_per_task": 8,
            "memory": "32G",
            "gres": "gpu:a100:1",
            "extra_sbatch": ["--constraint=a100", "#SBATCH --exclusive"],
            "setup": ["module load cuda/12.4", "source /shared/venvs/expflow/bin/activate"],
            "working_dir": "/shared/projects/pde",
        }
    )
    text = render_sbatch(config, "6b1b7a4e-52c4-4c53-9d7e-0d6a3c1f2a10", Path("/jobs/run"))
    _check_golden("full.sbatch", text)


@configuration_api
def test_a_requeued_jobs_script_asks_for_the_warning_and_forwards_it():
    config = _configuration(
        {"python": "python", "time_limit": "1-00:00:00", "requeue_limit": 3, "warning_seconds": 300}
    )
    text = render_sbatch(config, "6b1b7a4e-52c4-4c53-9d7e-0d6a3c1f2a10", Path("/jobs/run"))
    _check_golden("requeue.sbatch", text)
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
    assert "export EXPFLOW_REQUEUE_LIMIT=3" in text


def test_default_python_is_the_workers_own(monkeypatch):
    import sys

    config = _configuration({})
    assert config.command == f"{sys.executable} -m prefect flow-run execute"


@configuration_api
def test_a_given_command_is_kept():
    config = _configuration({"command": "srun python -m prefect flow-run execute"})
    assert "exec srun python -m prefect flow-run execute" in render_sbatch(config, "x", Path("/j"))


@configuration_api
@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("time_limit", "two hours", "time_limit"),
        ("memory", "lots", "memory"),
        ("partition", "gpu; rm -rf ~", "partition"),
        ("extra_sbatch", ["rm -rf /"], "rm -rf /"),
        ("setup", ["module load a\nrm -rf /"], "newline"),
        ("cpus_per_task", 0, "cpus_per_task"),
    ],
)
def test_bad_job_variables_are_refused_by_name(field, value, words):
    with pytest.raises(ValidationError) as err:
        _configuration({field: value})
    assert words in str(err.value)


def test_pool_variables_carry_the_same_rules():
    """The server validates job variables against this schema, so a bad value is refused
    when the run is created, not when the job starts."""
    props = SlurmWorker.get_default_base_job_template()["variables"]["properties"]
    assert props["time_limit"]["anyOf"][0]["pattern"]
    assert props["memory"]["anyOf"][0]["pattern"]
    assert props["cpus_per_task"]["anyOf"][0]["minimum"] == 1
    assert {"partition", "account", "qos", "gres", "gpus", "setup", "extra_sbatch"} <= set(props)


def test_job_environment_drops_the_workers_own_job_ids(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    env = job_environment({"PREFECT__FLOW_RUN_ID": "abc", "UNSET": None})
    assert "SLURM_JOB_ID" not in env and env["SLURM_CONF"] == "/etc/slurm/slurm.conf"
    assert env["PREFECT__FLOW_RUN_ID"] == "abc" and "UNSET" not in env


def test_scontrol_line_is_parsed():
    line = (
        "JobId=12 JobName=quick UserId=root(0) JobState=TIMEOUT Reason=TimeLimit "
        "ExitCode=0:15 NodeList=localhost TimeLimit=00:01:00"
    )
    f = parse_scontrol(line)
    assert (f["JobState"], f["ExitCode"], f["NodeList"]) == ("TIMEOUT", "0:15", "localhost")


@configuration_api
def test_end_states_read_as_what_happened(tmp_path):
    log = tmp_path / "slurm-9.out"
    log.write_text("step 1\nstep 2\nslurmstepd: error: Exceeded job memory limit\n")
    config = _configuration({"time_limit": "10", "memory": "2G"})
    timeout = end_message(JobInfo("9", "TIMEOUT", 0, 15), config, log)
    assert "Slurm job 9 hit its time limit (--time=10)" in timeout
    oom = end_message(JobInfo("9", "OUT_OF_MEMORY", 0, 9), config, log)
    assert "ran out of memory (--mem=2G)" in oom and "Exceeded job memory limit" in oom
    assert "was preempted" in end_message(JobInfo("9", "PREEMPTED"), config, log)
    assert "NODE_FAIL" in end_message(JobInfo("9", "NODE_FAIL"), config, log)
    assert JobInfo("9", "FAILED", 3, 0).status_code == 3
    assert JobInfo("9", "CANCELLED", 0, 15).status_code == 143
    assert JobInfo("9", "COMPLETED", 0, 0).status_code == 0


# --- end to end on a real Slurm -----------------------------------------------------


def test_accounting_remembers_how_jobs_ended(slurm, tmp_path):
    """After slurmctld forgets a job (MinJobAge), the worker asks sacct (slurmdbd on the
    local MariaDB, set up by scripts/slurm-up.sh)."""
    if not Path(slurm).with_name("accounting").exists():
        pytest.skip("no accounting: scripts/slurm-up.sh found no MariaDB on loopback")

    def sbatch(*args: str) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", f"--output={tmp_path}/%j.out", *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    ok, bad, long = sbatch("--wrap=true"), sbatch("--wrap=exit 3"), sbatch("--wrap=sleep 60")
    wait_job(long, {"RUNNING"}, timeout=30)
    subprocess.run(["scancel", long], check=True)
    want = {ok: ("COMPLETED", 0), bad: ("FAILED", 3), long: ("CANCELLED", 0)}
    deadline = time.monotonic() + 30
    while True:
        seen = {job: asyncio.run(accounting_info(job)) for job in want}
        got = {job: (i.state, i.exit_code) if i else None for job, i in seen.items()}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want


TRAINING_STEPS = 180  # one a second: three minutes of training
REQUEUED_SWEEP = {
    "name": "requeued",
    "trainable": {"target": str(TESTS / "foreign" / "checkpointing" / "train.py")},
    "space": {"grid": {"lr": [0.01]}, "fixed": {"steps": TRAINING_STEPS, "delay": 1.0}},
    "cluster": {"kind": "threads", "workers": 1},
}


def _deploy(srv, entrypoint: str, name: str, *extra: str) -> None:
    """`prefect deploy` from tests/, as a user deploys a flow file to the pool."""
    out = subprocess.run(
        [PREFECT, "deploy", entrypoint, "-n", name, "-p", "expflow-slurm", *extra],
        cwd=TESTS,
        env=srv["env"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def pool(slurm, server):  # noqa: F811
    """The `expflow-slurm` pool with the repo's Slurm deployment, the test flows and a worker."""
    prefect(server, "work-pool", "create", "expflow-slurm", "--type", "slurm")
    _deploy(server, "worker_flows.py:sleeper", "sleeper-slurm")
    log = open(server["root"] / "slurm-worker.log", "wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "expflow-slurm", "--type", "slurm"],
        cwd=REPO,
        env=server["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = {**server, "worker_log": server["root"] / "slurm-worker.log"}
    try:
        # A one-minute job that outlives its limit, started before anything else so that
        # Slurm's time-limit check (a minute and more) runs while the other tests do.
        server["time_limited"] = run_deployment(
            server,
            "sleeper/sleeper-slurm",
            "--param",
            "seconds=600",
            "--job-variable",
            "time_limit=1",
        )
        # A 3-minute training under a 1-minute limit, started early for the same reason:
        # it checkpoints and is requeued until it completes (test_requeue_...).
        _deploy(server, "worker_flows.py:sweep", "requeued-slurm")
        server["requeued"] = run_deployment(
            server,
            "sweep/requeued-slurm",
            "--params",
            json.dumps({"settings": REQUEUED_SWEEP}),
            "--job-variable",
            "time_limit=1",
            "--job-variable",
            "requeue_limit=10",
            "--job-variable",
            "warning_seconds=15",
            "--job-variable",
            "poll_interval=1",
        )
        prefect(server, "deploy", "--name", "pde-advection-slurm")
        for flow_name in ("quick", "fails"):
            _deploy(server, f"worker_flows.py:{flow_name}", f"{flow_name}-slurm")
        yield server
    finally:
        stop(worker)
        log.close()
        subprocess.run(["scancel", "--name=sleeper"], capture_output=True)


def run_deployment(srv, name: str, *args: str) -> str:
    out = prefect(srv, "deployment", "run", name, *args)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def flow_run(srv, flow_run_id: str) -> dict:
    return api(srv, "GET", f"/flow_runs/{flow_run_id}")


def job_of(srv, flow_run_id: str, timeout: float = 90) -> str:
    """The Slurm job id the worker reported as the flow run's infrastructure pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = flow_run(srv, flow_run_id).get("infrastructure_pid")
        if pid:
            return pid
        time.sleep(0.2)
    raise AssertionError(f"no job for {flow_run_id}:\n{srv['worker_log'].read_text()[-3000:]}")


def slurm_state(job: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True
    ).stdout
    return parse_scontrol(out).get("JobState", "GONE")


def wait_job(job: str, states: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = slurm_state(job)
        if state in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job} is {slurm_state(job)}, not in {states} after {timeout} s")


def in_queue(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
    return bool(out.strip())


def wait_running(srv, flow_run_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (flow_run(srv, flow_run_id).get("state") or {}).get("type") == "RUNNING":
            return
        time.sleep(0.3)
    raise AssertionError(f"flow run {flow_run_id} never ran")


@pytest.fixture(scope="module")
def time_limited(pool):
    """The flow run of the job started by `pool` to outlive its time limit."""
    return pool["time_limited"]


def test_pool_offers_the_slurm_template(pool, time_limited):
    template = api(pool, "GET", "/work_pools/expflow-slurm")["base_job_template"]
    props = template["variables"]["properties"]
    assert {"partition", "time_limit", "cpus_per_task", "memory", "gres", "setup"} <= set(props)
    deployments = {d["name"]: d for d in api(pool, "POST", "/deployments/filter", {})}
    slurm_dep = deployments["pde-advection-slurm"]
    assert slurm_dep["job_variables"]["time_limit"] == "01:00:00"


def test_pipeline_deployment_completes_as_a_slurm_job(pool):
    # A run's `settings` replaces the deployment's own (Prefect merges parameters by
    # top-level name), so it repeats the deployment's cluster kind.
    params = {
        "settings": {
            "experiment": "on-slurm",
            "hpo": {"n_trials": 2, "budget": {"epochs": 3}},
            "train": {"budget": {"epochs": 5}},
            "cluster": {"kind": "threads", "workers": 1},
            "gates": ["nrmse:lt:1.0"],
            "submit": {"name": "slurm-1"},
        }
    }
    t0 = time.monotonic()
    flow_run_id = run_deployment(
        pool,
        "pipeline/pde-advection-slurm",
        "--params",
        json.dumps(params),
        "--job-variable",
        "cpus_per_task=1",
        "--job-variable",
        "poll_interval=1",
    )
    job = job_of(pool, flow_run_id)
    wait_job(job, {"RUNNING", "COMPLETING", "COMPLETED"}, timeout=120)
    print(f"deployment run -> Slurm job running: {time.monotonic() - t0:.1f} s")

    state = wait_for_terminal(pool, flow_run_id, timeout=400)
    assert state["type"] == "COMPLETED", f"{state}\n{pool['worker_log'].read_text()[-4000:]}"
    # The flow run reports Completed itself, a moment before its job exits.
    assert wait_job(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30) == "COMPLETED"
    folder = pool["root"] / "expflow" / "slurm-jobs" / flow_run_id
    script = (folder / "job.sbatch").read_text()
    # prefect.yaml's job variables and the run's own override both reached sbatch.
    assert "#SBATCH --time=01:00:00" in script and "#SBATCH --mem=4G" in script
    assert "#SBATCH --cpus-per-task=1" in script
    assert "PREFECT_API_URL" not in script.replace("(PREFECT_API_URL", "")
    log = (folder / f"slurm-{job}.out").read_text()
    assert f"expflow: Slurm job {job} on" in log
    bundle = pool["root"] / "expflow" / "submissions" / "slurm-1"
    assert (bundle / "manifest.json").exists()


def start_sleeper(pool) -> tuple[str, str]:
    """A long flow run whose job and flow run are both running."""
    flow_run_id = run_deployment(
        pool, "sleeper/sleeper-slurm", "--param", "seconds=600", "--job-variable", "poll_interval=1"
    )
    job = job_of(pool, flow_run_id)
    wait_job(job, {"RUNNING"}, timeout=120)
    wait_running(pool, flow_run_id)
    return flow_run_id, job


def test_cancel_in_prefect_scancels_the_job(pool):
    flow_run_id, job = start_sleeper(pool)
    t0 = time.monotonic()
    prefect(pool, "flow-run", "cancel", flow_run_id)
    deadline = time.monotonic() + 60
    while in_queue(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = time.monotonic() - t0
    assert not in_queue(job), f"job {job} still queued {gone:.0f} s after the cancel"
    print(f"flow-run cancel -> Slurm job gone: {gone:.1f} s")
    state = wait_for_terminal(pool, flow_run_id, timeout=60)
    assert state["type"] == "CANCELLED", state
    assert slurm_state(job) in {"CANCELLED", "COMPLETED", "GONE"}


def test_scancel_outside_prefect_ends_the_run_cancelled(pool):
    flow_run_id, job = start_sleeper(pool)
    subprocess.run(["scancel", job], check=True)
    state = wait_for_terminal(pool, flow_run_id, timeout=60)
    assert state["type"] == "CANCELLED", state
    assert f"Slurm job {job} was cancelled outside Prefect" in state["message"]


def test_failing_flow_stays_failed(pool):
    flow_run_id = run_deployment(pool, "fails/fails-slurm", "--job-variable", "poll_interval=1")
    state = wait_for_terminal(pool, flow_run_id, timeout=120)
    assert state["type"] == "FAILED", state
    assert "fails on purpose" in state["message"]


def test_failed_setup_crashes_the_run_with_the_reason(pool):
    flow_run_id = run_deployment(
        pool,
        "quick/quick-slurm",
        "--job-variable",
        'setup=["echo loading the cuda module", "exit 3"]',
        "--job-variable",
        "poll_interval=1",
    )
    state = wait_for_terminal(pool, flow_run_id, timeout=120)
    assert state["type"] == "CRASHED", state
    job = flow_run(pool, flow_run_id)["infrastructure_pid"]
    assert f"Slurm job {job} failed" in state["message"]
    assert "exit code 3" in state["message"] and "loading the cuda module" in state["message"]


def test_sbatch_refusal_crashes_the_run_with_sbatchs_words(pool):
    flow_run_id = run_deployment(
        pool, "quick/quick-slurm", "--job-variable", "partition=no-such-partition"
    )
    state = wait_for_terminal(pool, flow_run_id, timeout=120)
    assert state["type"] == "CRASHED", state
    assert "sbatch refused the job" in state["message"]
    assert "partition" in state["message"].lower()


def test_time_limit_ends_the_run_crashed_with_the_limit_named(pool, time_limited):
    state = wait_for_terminal(pool, time_limited, timeout=200)
    assert state["type"] == "CRASHED", state
    assert "hit its time limit (--time=1)" in state["message"], state["message"]


def test_requeue_carries_a_3_minute_training_through_a_1_minute_limit(pool):
    """Each attempt is warned before its limit (the job's end time, SIGUSR1), the script
    saves and stops, the flow run requeues its job, and the next attempt resumes from the
    checkpoint: the step counter goes on from where it was, and the run completes."""
    flow_run_id = pool["requeued"]
    state = wait_for_terminal(pool, flow_run_id, timeout=900)
    log_dir = pool["root"] / "expflow" / "slurm-jobs" / flow_run_id
    job = flow_run(pool, flow_run_id)["infrastructure_pid"]
    job_log = (log_dir / f"slurm-{job}.out").read_text()
    assert state["type"] == "COMPLETED", f"{state}\n{job_log[-3000:]}"
    restarts = re.findall(r"\(restart (\d+)\)", job_log)
    assert len(restarts) >= 3 and restarts == [str(i) for i in range(len(restarts))], restarts
    # The flow run waited, Pending, for each requeued attempt.
    states = api(pool, "GET", f"/flow_run_states/?flow_run_id={flow_run_id}")
    requeued = [s for s in states if s["type"] == "PENDING" and "requeued" in (s["message"] or "")]
    assert len(requeued) == len(restarts) - 1, [s["message"] for s in states]
    assert "reaches its time limit" in requeued[0]["message"]
    # One combination, one run folder: its steps went on across attempts, none lost or
    # done twice (the script saves every step before it prints it).
    sweep_dir = pool["root"] / "expflow" / "runs" / "requeued"
    (output,) = sweep_dir.glob("runs/*/*/output.log")
    steps = [int(m) for m in re.findall(r"EXPFLOW_METRIC step=(\d+)", output.read_text())]
    assert steps == list(range(1, TRAINING_STEPS + 1))
    assert output.read_text().count("resumed from step") == len(restarts) - 1
    meta = json.loads((output.parent / "metadata.json").read_text())
    assert meta["status"] == "ok" and meta["checkpoint"]["resumed"] is True
