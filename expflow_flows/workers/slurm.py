"""The `slurm` work pool: each flow run becomes one sbatch job.

    prefect work-pool create expflow-slurm --type slurm
    prefect worker start --pool expflow-slurm --type slurm

The worker renders a batch script from the pool's base job template (partition,
account, qos, time limit, CPUs, memory, GRES/GPUs, extra ``#SBATCH`` lines, setup
lines such as ``module load`` or ``source venv/bin/activate``), merged with the
deployment's ``job_variables`` in ``prefect.yaml``, and submits it with ``sbatch``.
The job runs ``python -m prefect flow-run execute``, which reports the flow run's
own states to the Prefect API; the worker follows the job with ``scontrol`` (and
``sacct`` when accounting is on, for jobs Slurm has already forgotten) and steps in
where the flow run cannot speak for itself:

* cancelling the flow run in Prefect (UI, ``prefect flow-run cancel``,
  ``expflow runs cancel``) cancels the job with ``scancel``;
* a job ended by Slurm (``TIMEOUT``, ``OUT_OF_MEMORY``, ``PREEMPTED``,
  ``NODE_FAIL``, ``FAILED`` before the flow started) ends the flow run Crashed
  with the reason and the job's log file named;
* a job cancelled outside Prefect (``scancel`` by hand, an admin) ends the flow
  run Cancelled rather than leaving it Running forever.

Environment: Prefect's variables (``PREFECT_API_URL``, ``PREFECT__FLOW_RUN_ID``, any
``env`` job variable) reach the job through sbatch's ``--export=ALL`` from the
worker's environment, so they are never written into the script on disk; the script
is reproducible and holds no API key.

The job's Python is the worker's own interpreter unless the ``python`` variable
names another one: on a cluster with a shared filesystem that is what you want;
otherwise set ``setup`` to load the environment and ``python`` to ``python``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import anyio.abc
from prefect.exceptions import InfrastructureNotFound
from prefect.states import Cancelled, Crashed
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)
from pydantic import Field, field_validator

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

# Values that go into `#SBATCH --key=value` lines: no spaces, quotes or newlines, so a
# job variable can never smuggle a shell command into the script.
_TOKEN = r"^[A-Za-z0-9_.,:=+/@%-]+$"
_TIME = r"^(\d+-)?\d+(:\d{1,2}){0,2}$"  # minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
_MEMORY = r"^\d+[KMGT]?$"

# Seconds after a requeue before the worker lets the job start again.
RELEASE_AFTER_S = 5

# Slurm job states (squeue/scontrol/sacct spell them the same way).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)
# How a Slurm end state reads in the flow run's state message.
END_STATE_REASONS = {
    "FAILED": "failed (non-zero exit before the flow run reported a final state)",
    "TIMEOUT": "hit its time limit",
    "OUT_OF_MEMORY": "ran out of memory",
    "PREEMPTED": "was preempted",
    "NODE_FAIL": "lost its node (NODE_FAIL)",
    "BOOT_FAIL": "could not boot its node (BOOT_FAIL)",
    "DEADLINE": "missed its deadline",
    "REVOKED": "was revoked",
}


class SlurmError(RuntimeError):
    """A Slurm command failed; the message is one line a user can act on."""


class _SlurmFields:
    """Documentation of the variables, shared by configuration and variables classes."""

    partition = "Slurm partition (sbatch --partition). Empty: the cluster's default."
    account = "Account to charge (sbatch --account)."
    qos = "Quality of service (sbatch --qos)."
    time_limit = "Wall-clock limit (sbatch --time), e.g. 30, 02:00:00 or 1-12:00:00."
    cpus_per_task = "CPUs for the flow run (sbatch --cpus-per-task)."
    memory = "Memory per node (sbatch --mem), e.g. 4G or 16000 (MB)."
    gres = "Generic resources (sbatch --gres), e.g. gpu:1 or gpu:a100:2."
    gpus = "Number of GPUs (sbatch --gpus)."
    extra_sbatch = "More sbatch options, one per item, e.g. --constraint=a100."
    setup = "Shell lines run before the flow run, e.g. 'module load cuda/12.4'."
    python = "Python that runs the flow run. Empty: the worker's own interpreter."
    working_dir = "Folder the job starts in (sbatch --chdir)."
    log_dir = "Where job scripts and logs go. Empty: <expflow home>/slurm-jobs."
    poll_interval = "Seconds between checks of the job's state."
    requeue_limit = (
        "Times a flow run cut by its time limit or preempted is requeued and resumes from "
        "its checkpoints (sbatch --requeue). 0: never; the run ends Crashed at the limit."
    )
    warning_seconds = (
        "With requeue_limit: seconds before the time limit at which the running trainables "
        "are told to checkpoint (sbatch --signal=B:USR1@N, and the job's end time)."
    )


class SlurmJobConfiguration(BaseJobConfiguration):
    partition: str | None = Field(default=None, pattern=_TOKEN)
    account: str | None = Field(default=None, pattern=_TOKEN)
    qos: str | None = Field(default=None, pattern=_TOKEN)
    time_limit: Annotated[str, Field(pattern=_TIME)] | None = None
    cpus_per_task: int | None = Field(default=None, ge=1)
    memory: str | None = Field(default=None, pattern=_MEMORY)
    gres: str | None = Field(default=None, pattern=_TOKEN)
    gpus: int | None = Field(default=None, ge=0)
    extra_sbatch: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    python: str | None = Field(default=None)
    working_dir: str | None = Field(default=None)
    log_dir: str | None = Field(default=None)
    poll_interval: float = Field(default=5.0, gt=0)
    requeue_limit: int = Field(default=0, ge=0, le=1000)
    warning_seconds: int = Field(default=90, ge=1, le=86400)

    @field_validator("time_limit", mode="before")
    @classmethod
    def _minutes(cls, value: Any) -> Any:
        # `time_limit: 30` in YAML or `--job-variable time_limit=30` arrives as an int.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("extra_sbatch")
    @classmethod
    def _check_extra(cls, lines: list[str]) -> list[str]:
        return [_extra_option(line) for line in lines]

    @field_validator("setup")
    @classmethod
    def _check_setup(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if "\n" in line or "\r" in line:
                raise ValueError(f"setup line {line!r} holds a newline: give one line per item")
        return lines

    @field_validator("extra_sbatch", "setup", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    def prepare_for_flow_run(self, flow_run, deployment=None, flow=None, **kwargs) -> None:
        configured = self.command is not None
        super().prepare_for_flow_run(flow_run, deployment, flow, **kwargs)
        if not configured:
            python = self.python or sys.executable
            self.command = f"{shlex.quote(python)} -m prefect flow-run execute"


class SlurmVariables(BaseVariables):
    partition: str | None = Field(default=None, pattern=_TOKEN, description=_SlurmFields.partition)
    account: str | None = Field(default=None, pattern=_TOKEN, description=_SlurmFields.account)
    qos: str | None = Field(default=None, pattern=_TOKEN, description=_SlurmFields.qos)
    time_limit: Annotated[str, Field(pattern=_TIME)] | Annotated[int, Field(ge=1)] | None = Field(
        default=None, title="Time limit", description=_SlurmFields.time_limit
    )
    cpus_per_task: int | None = Field(
        default=None, ge=1, title="CPUs per task", description=_SlurmFields.cpus_per_task
    )
    memory: str | None = Field(default=None, pattern=_MEMORY, description=_SlurmFields.memory)
    gres: str | None = Field(default=None, pattern=_TOKEN, description=_SlurmFields.gres)
    gpus: int | None = Field(default=None, ge=0, title="GPUs", description=_SlurmFields.gpus)
    extra_sbatch: list[str] = Field(
        default_factory=list, title="Extra sbatch options", description=_SlurmFields.extra_sbatch
    )
    setup: list[str] = Field(
        default_factory=list, title="Environment setup", description=_SlurmFields.setup
    )
    python: str | None = Field(default=None, description=_SlurmFields.python)
    working_dir: str | None = Field(
        default=None, title="Working directory", description=_SlurmFields.working_dir
    )
    log_dir: str | None = Field(
        default=None, title="Job script and log folder", description=_SlurmFields.log_dir
    )
    poll_interval: float = Field(
        default=5.0, gt=0, title="Poll interval (s)", description=_SlurmFields.poll_interval
    )
    requeue_limit: int = Field(
        default=0, ge=0, le=1000, title="Requeues", description=_SlurmFields.requeue_limit
    )
    warning_seconds: int = Field(
        default=90,
        ge=1,
        le=86400,
        title="Checkpoint warning (s)",
        description=_SlurmFields.warning_seconds,
    )


class SlurmWorkerResult(BaseWorkerResult):
    """The job id (`identifier`) and a status code: 0, or what the job's end means."""


def _extra_option(line: str) -> str:
    """An extra sbatch option, accepted as ``--opt=value`` or ``#SBATCH --opt=value``."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH") :].strip()
    if not re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*(=\S+|\s+\S+)?", text):
        raise ValueError(
            f"extra_sbatch item {line!r} is not one sbatch option; "
            "write it as --option=value (e.g. --constraint=a100)"
        )
    return text


def job_log_dir(configuration: SlurmJobConfiguration, flow_run_id: str) -> Path:
    """The folder of one flow run's job script and log."""
    if configuration.log_dir:
        root = Path(configuration.log_dir).expanduser()
    else:
        from expflow_flows.home import expflow_home

        root = expflow_home() / "slurm-jobs"
    return root / flow_run_id


def _job_name(name: str | None) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or "").strip("-")
    return cleaned[:64] or "prefect-flow-run"


def render_sbatch(configuration: SlurmJobConfiguration, flow_run_id: str, log_dir: Path) -> str:
    """The batch script for one flow run. Pure: the same inputs give the same text."""
    c = configuration
    options: list[str] = [
        f"--job-name={_job_name(c.name)}",
        f"--output={log_dir}/slurm-%j.out",
        "--ntasks=1",
        f"--comment=prefect-flow-run:{flow_run_id}",
    ]
    for flag, value in (
        ("partition", c.partition),
        ("account", c.account),
        ("qos", c.qos),
        ("time", c.time_limit),
        ("cpus-per-task", c.cpus_per_task),
        ("mem", c.memory),
        ("gres", c.gres),
        ("gpus", c.gpus),
    ):
        if value is not None and value != "":
            options.append(f"--{flag}={value}")
    if c.working_dir:
        options.append(f"--chdir={shlex.quote(c.working_dir)}")
    if c.requeue_limit:
        # Requeued attempts append to one log, and are warned before the limit.
        options += ["--requeue", "--open-mode=append", f"--signal=B:USR1@{c.warning_seconds}"]
    options.extend(c.extra_sbatch)

    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {opt}" for opt in options]
    lines += [
        "#",
        f"# Prefect flow run {flow_run_id}, submitted by expflow-flows' slurm worker.",
        "# Prefect's settings (PREFECT_API_URL, PREFECT__FLOW_RUN_ID, the deployment's env)",
        "# come from the worker's environment through sbatch --export=ALL.",
        "set -e",
    ]
    if c.setup:
        lines.append("# environment setup")
        lines += list(c.setup)
    start = f'echo "expflow: Slurm job ${{SLURM_JOB_ID}} on $(hostname) for flow run {flow_run_id}"'
    if not c.requeue_limit:
        return "\n".join([*lines, start, f"exec {c.command}", ""])
    lines += [
        "# Requeued up to requeue_limit times; the flow run checkpoints before the limit.",
        f"export EXPFLOW_REQUEUE_LIMIT={c.requeue_limit}",
        f"export EXPFLOW_STOP_WARNING_S={c.warning_seconds}",
        start.replace("on $(hostname)", "on $(hostname) (restart ${SLURM_RESTART_COUNT:-0})"),
        "set +e",
        "# SIGUSR1 (the time-limit warning) goes to the flow run's engine, which checkpoints;",
        "# the processes between ignore it.",
        "trap '' USR1",
        f"{c.command} &",
        "flow=$!",
        "trap 'pkill -USR1 -P \"$flow\"' USR1",
        "while true; do",
        '  wait "$flow"; status=$?',
        '  kill -0 "$flow" 2>/dev/null || exit "$status"',
        "done",
        "",
    ]
    return "\n".join(lines)


def job_environment(configuration_env: dict[str, str | None]) -> dict[str, str]:
    """The environment sbatch runs with (and exports to the job).

    The worker's own ``SLURM_*`` variables are dropped (a worker that itself runs inside
    a Slurm job would otherwise hand its job's ids to the new one), except SLURM_CONF.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update({k: v for k, v in configuration_env.items() if v is not None})
    return env


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says about a job: its state and, once it has ended, its exit."""

    job_id: str
    state: str  # a Slurm state, or "UNKNOWN" when Slurm no longer knows the job
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    node: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def status_code(self) -> int:
        """A process-style exit status: the exit code, 128+signal, or 1 when unknown."""
        if self.state == "COMPLETED":
            return 0
        if self.exit_code:
            return self.exit_code
        if self.signal:
            return 128 + self.signal
        return 1


async def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    try:
        proc = await anyio.run_process(argv, check=False, env=env)
    except FileNotFoundError as exc:
        raise SlurmError(
            f"{argv[0]} is not on PATH: run the slurm worker on a host with Slurm's "
            "client commands (Debian/Ubuntu: slurm-client)"
        ) from exc
    return (
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


async def submit_job(script: Path, env: dict[str, str]) -> str:
    """Submit a batch script; return the job id or raise SlurmError with sbatch's reason."""
    code, out, err = await _run(["sbatch", "--parsable", "--export=ALL", str(script)], env=env)
    if code != 0:
        raise SlurmError(f"sbatch refused the job: {_one_line(err or out)}")
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {_one_line(out + err)}")
    return job_id


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output as a dict (values may hold spaces only at the end)."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def _exit(text: str) -> tuple[int | None, int | None]:
    code, _, sig = (text or "").partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        return None, None


async def job_info(job_id: str) -> JobInfo | None:
    """The job's state from scontrol, else from sacct; UNKNOWN when neither knows it.

    Returns None when Slurm cannot be asked at all (controller down): the caller keeps
    waiting rather than deciding a running job is gone.
    """
    code, out, err = await _run(["scontrol", "show", "job", "-o", job_id])
    if code == 0 and out.strip():
        f = parse_scontrol(out)
        exit_code, sig = _exit(f.get("ExitCode", ""))
        return JobInfo(
            job_id,
            f.get("JobState", "UNKNOWN"),
            exit_code,
            sig,
            f.get("Reason", ""),
            f.get("NodeList", ""),
        )
    if "invalid job id" not in (err + out).lower():
        return None  # slurmctld unreachable or similar: ask again later
    # slurmctld forgets finished jobs after MinJobAge (300 s by default); accounting
    # remembers them.
    return await accounting_info(job_id) or JobInfo(job_id, "UNKNOWN")


async def accounting_info(job_id: str) -> JobInfo | None:
    """The job as ``sacct`` records it; None without accounting or a record."""
    code, out, _ = await _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"])
    if code != 0 or not out.strip():
        return None
    state, _, exit_text = out.strip().splitlines()[0].partition("|")
    exit_code, sig = _exit(exit_text)
    # "CANCELLED by 0" names who cancelled; the state is the first word.
    return JobInfo(job_id, state.split()[0] if state.strip() else "UNKNOWN", exit_code, sig)


async def release_job(job_id: str) -> None:
    """Let a requeued job start in a few seconds instead of after Slurm's requeue delay.

    Not at once: slurmd refuses a launch whose credential dates from the same second as
    the previous attempt's revoked one ("Job credential revoked"), and the job then
    ends FAILED instead of restarting.
    """
    start = f"StartTime=now+{RELEASE_AFTER_S}"
    code, out, err = await _run(["scontrol", "update", f"JobId={job_id}", start])
    if code != 0:
        raise SlurmError(f"scontrol update {job_id} {start} failed: {_one_line(err or out)}")


async def cancel_job(job_id: str) -> None:
    """scancel the job; InfrastructureNotFound when Slurm does not know it."""
    code, out, err = await _run(["scancel", job_id])
    text = (err + out).lower()
    if code != 0 or "invalid job id" in text:
        if "invalid job id" in text:
            raise InfrastructureNotFound(f"Slurm job {job_id} does not exist (any more)")
        raise SlurmError(f"scancel {job_id} failed: {_one_line(err or out)}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def end_message(info: JobInfo, configuration: SlurmJobConfiguration, log: Path) -> str:
    """The state message of a flow run whose job Slurm ended."""
    reason = END_STATE_REASONS.get(info.state, f"ended in state {info.state}")
    detail = ""
    if info.state == "TIMEOUT" and configuration.time_limit:
        detail = f" (--time={configuration.time_limit})"
    elif info.state == "OUT_OF_MEMORY" and configuration.memory:
        detail = f" (--mem={configuration.memory})"
    elif info.exit_code or info.signal:
        detail = f" (exit code {info.exit_code}, signal {info.signal})"
    message = f"Slurm job {info.job_id} {reason}{detail}; log: {log}"
    tail = _tail(log)
    return f"{message}; last lines: {tail}" if tail else message


class SlurmWorker(BaseWorker[SlurmJobConfiguration, SlurmVariables, SlurmWorkerResult]):
    """Runs each flow run as one Slurm batch job (see the module docstring)."""

    type = "slurm"
    job_configuration = SlurmJobConfiguration
    job_configuration_variables = SlurmVariables
    _description = (
        "Submit each flow run as a Slurm batch job (sbatch) with partition, time, CPU, "
        "memory and GPU settings; cancelling the flow run cancels the job."
    )
    _display_name = "Slurm (expflow-flows)"
    _documentation_url = "https://slurm.schedmd.com/sbatch.html"

    async def run(
        self,
        flow_run: FlowRun,
        configuration: SlurmJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> SlurmWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        flow_run_id = str(flow_run.id)
        folder = job_log_dir(configuration, flow_run_id)
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "job.sbatch"
        script.write_text(render_sbatch(configuration, flow_run_id, folder))
        log = folder  # replaced by the job's own log once the id is known

        submitted = time.monotonic()
        job_id = await submit_job(script, job_environment(configuration.env))
        log = folder / f"slurm-{job_id}.out"
        logger.info(f"Submitted Slurm job {job_id}; script {script}, log {log}")
        if task_status is not None:
            task_status.started(job_id)

        info, cancel_sent = await self._follow(flow_run, configuration, job_id, submitted, logger)
        return await self._finish(flow_run, configuration, info, cancel_sent, log, logger)

    async def _follow(
        self,
        flow_run: FlowRun,
        configuration: SlurmJobConfiguration,
        job_id: str,
        submitted: float,
        logger,
    ) -> tuple[JobInfo, float | None]:
        """Poll the job until it ends; scancel it when the flow run is being cancelled."""
        cancel_sent: float | None = None
        seen_running = False
        unreachable_since: float | None = None
        while True:
            info = await job_info(job_id)
            if info is None:
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    logger.warning(f"Cannot ask Slurm about job {job_id}; will keep trying")
            else:
                unreachable_since = None
                if info.state == "RUNNING" and not seen_running:
                    seen_running = True
                    waited = time.monotonic() - submitted
                    logger.info(f"Slurm job {job_id} running on {info.node} after {waited:.1f} s")
                if seen_running and info.state == "PENDING" and info.reason == "BeginTime":
                    # Requeued by its flow run before the time limit: Slurm holds a requeued
                    # job back for a while; the flow run waits for it, so it starts now.
                    seen_running = False
                    submitted = time.monotonic()
                    logger.info(f"Slurm job {job_id} was requeued; it resumes from checkpoints")
                    try:
                        await release_job(job_id)
                    except SlurmError as exc:
                        logger.warning(f"{exc}; it starts when Slurm lets it")
                if not info.active:
                    return info, cancel_sent
            if cancel_sent is None:
                current = await self.client.read_flow_run(flow_run.id)
                if current.state is not None and current.state.is_cancelling():
                    logger.info(f"Flow run is cancelling: scancel {job_id}")
                    try:
                        await cancel_job(job_id)
                    except InfrastructureNotFound:
                        pass
                    cancel_sent = time.monotonic()
            await anyio.sleep(configuration.poll_interval)

    async def _finish(
        self,
        flow_run: FlowRun,
        configuration: SlurmJobConfiguration,
        info: JobInfo,
        cancel_sent: float | None,
        log: Path,
        logger,
    ) -> SlurmWorkerResult:
        """Make the flow run's final state match what happened to the job."""
        current = await self.client.read_flow_run(flow_run.id)
        state = current.state
        final = state is not None and state.is_final()
        crashed = state is not None and state.is_crashed()
        result = SlurmWorkerResult(identifier=info.job_id, status_code=info.status_code)

        if cancel_sent is not None or info.state == "CANCELLED":
            took = f" in {time.monotonic() - cancel_sent:.1f} s" if cancel_sent else ""
            logger.info(f"Slurm job {info.job_id} is gone ({info.state}){took}")
            if not final or crashed or (state is not None and state.is_cancelling()):
                who = "on request from Prefect" if cancel_sent else "outside Prefect (scancel)"
                await self.client.set_flow_run_state(
                    flow_run.id,
                    Cancelled(message=f"Slurm job {info.job_id} was cancelled {who}"),
                    force=True,
                )
            # The flow run's state is settled; a non-zero code would make the base
            # worker propose Crashed on top of it.
            return SlurmWorkerResult(identifier=info.job_id, status_code=0)

        if info.state == "COMPLETED":
            if not final:
                await self.client.set_flow_run_state(
                    flow_run.id,
                    Crashed(
                        message=(
                            f"Slurm job {info.job_id} completed but the flow run never reported "
                            f"a final state; log: {log}"
                        )
                    ),
                    force=True,
                )
            return result

        if info.state == "UNKNOWN":
            if not final:
                await self.client.set_flow_run_state(
                    flow_run.id,
                    Crashed(
                        message=(
                            f"Slurm no longer knows job {info.job_id} and has no accounting "
                            f"(sacct) to ask; log: {log}"
                        )
                    ),
                    force=True,
                )
            return SlurmWorkerResult(identifier=info.job_id, status_code=0 if final else 1)

        # FAILED, TIMEOUT, OUT_OF_MEMORY, PREEMPTED, NODE_FAIL, ...
        if final and not crashed:
            logger.info(
                f"Slurm job {info.job_id} ended {info.state} after the flow run reported "
                f"{state.name}; log: {log}"
            )
        else:
            message = end_message(info, configuration, log)
            logger.error(message)
            await self.client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
        # Completed/Failed/Cancelled reported by the flow itself stay as they are; either
        # way the state is settled, so the base worker must not propose another one.
        return SlurmWorkerResult(identifier=info.job_id, status_code=0)

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: SlurmJobConfiguration,
        grace_seconds: int = 30,
    ) -> None:
        """Cancel a pending flow run's job (Prefect calls this for pending runs)."""
        if not str(infrastructure_pid).isdigit():
            raise InfrastructureNotFound(f"{infrastructure_pid!r} is not a Slurm job id")
        await cancel_job(str(infrastructure_pid))
