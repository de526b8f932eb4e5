"""A flow run inside a Slurm job: checkpoint before the job ends, then requeue and resume.

The ``slurm`` work pool starts a flow run as a batch job with a time limit. With
``requeue_limit`` set on the pool or deployment, the job also carries
``EXPFLOW_REQUEUE_LIMIT`` and ``EXPFLOW_STOP_WARNING_S``, and a flow that calls
:func:`guard` at its start is told in time:

* ``warning`` seconds before the job's end time (read from ``scontrol``), or when the
  job gets ``SIGUSR1`` (``sbatch --signal=B:USR1@N``, forwarded by the batch script) or
  ``SIGTERM`` (a preemption's notice), the guard writes the flow run's stop file
  (every process that runs the flow's trainables watches it) and tells the runs of
  this process to checkpoint and stop
  (:func:`~expflow_flows.runs.trainable.request_checkpoint`);
* the flow's stages stop starting work, wait for the running trainables to save and
  return, and raise :class:`~expflow_flows.errors.JobEnding`;
* the flow calls :func:`requeue`: while requeues are left (``SLURM_RESTART_COUNT``
  below the limit) it runs ``scontrol requeue``, so Slurm starts the same job, and the
  same flow run, again; every stage resumes (finished work is kept, trials and
  combinations go on from their checkpoint folders).

Outside a Slurm job, or without a requeue limit, the guard does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from expflow_flows.runs import trainable as trainable_mod

LIMIT_ENV = "EXPFLOW_REQUEUE_LIMIT"
WARNING_ENV = "EXPFLOW_STOP_WARNING_S"
DEFAULT_WARNING_S = 90.0


def job_id() -> str | None:
    """This process's Slurm job id, or None outside a job."""
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_limit() -> int:
    """How many times this job may be requeued (0: never)."""
    try:
        return max(0, int(os.environ.get(LIMIT_ENV, "0")))
    except ValueError:
        return 0


def restarts() -> int:
    """How many times Slurm has restarted this job so far."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def active() -> bool:
    """Whether this flow run is in a Slurm job that may be requeued."""
    return job_id() is not None and requeue_limit() > 0


def stop_file_for(root: Path, flow_run_id: str) -> Path:
    """The file that tells every process of a flow run that its job ends soon."""
    return root / "stops" / (flow_run_id or "local")


def end_time(job: str) -> float | None:
    """The job's end time (Unix seconds) from ``scontrol show job``; None if unknown."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for token in out.split():
        key, _, value = token.partition("=")
        if key == "EndTime" and value and value not in ("Unknown", "None"):
            try:
                return datetime.fromisoformat(value).timestamp()
            except ValueError:
                return None
    return None


class Guard:
    """Tells a flow run's trainables to checkpoint before its job ends (see the module)."""

    def __init__(self, stop_file: Path, warning_s: float, log: Callable[[str], None]) -> None:
        self.stop_file, self.warning_s, self.log = stop_file, warning_s, log
        self.reason: str | None = None
        self.ends: float | None = None
        self.timer: threading.Timer | None = None
        self.previous: dict[int, object] = {}

    def stop(self, reason: str) -> None:
        """Tell this flow run's trainables, here and on every worker, to checkpoint."""
        if self.reason is not None:
            return
        self.reason = reason
        self.log(f"{reason}: the running trainables save checkpoints and stop")
        with contextlib.suppress(OSError):
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.write_text(reason + "\n", encoding="utf-8")
        trainable_mod.request_checkpoint(reason)

    def start(self) -> Guard:
        job = job_id() or "?"
        with contextlib.suppress(FileNotFoundError):
            self.stop_file.unlink()  # the stop of an earlier attempt of this flow run
        trainable_mod.clear_checkpoint_request()
        ends = end_time(job)
        if ends is not None:
            delay = max(0.0, ends - self.warning_s - time.time())
            self.timer = threading.Timer(
                delay,
                self.stop,
                args=(f"Slurm job {job} reaches its time limit in {self.warning_s:g} s",),
            )
            self.timer.daemon = True
            self.timer.start()
        self.ends = ends
        handlers = {
            signal.SIGUSR1: lambda *_: self.warned(f"Slurm job {job} was warned (SIGUSR1)"),
            signal.SIGTERM: lambda *_: self.stop(f"Slurm job {job} is being ended (SIGTERM)"),
        }
        for signum, handler in handlers.items():
            try:
                self.previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: the timer and the stop file remain
                continue
        return self

    def warned(self, reason: str) -> None:
        """Slurm's warning signal: it may come up to a minute before the time asked for
        (its timers tick coarsely); with the end time known, the timer keeps the margin."""
        left = None if self.ends is None else self.ends - time.time()
        if left is not None and left > self.warning_s + 1 and self.timer is not None:
            self.log(
                f"{reason} {left:.0f} s before the limit (asked for {self.warning_s:g} s); "
                f"the trainables checkpoint {self.warning_s:g} s before it"
            )
            return
        self.stop(reason)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for signum, handler in self.previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)  # type: ignore[arg-type]


@contextlib.contextmanager
def guard(
    stop_file: Path, log: Callable[[str], None] = lambda line: None
) -> Iterator[Guard | None]:
    """Watch for the job's end while the block runs (nothing outside a requeueable job)."""
    if not active():
        yield None
        return
    try:
        warning = float(os.environ.get(WARNING_ENV, DEFAULT_WARNING_S))
    except ValueError:
        warning = DEFAULT_WARNING_S
    watcher = Guard(stop_file, warning, log).start()
    try:
        yield watcher
    finally:
        watcher.close()


def requeue(log: Callable[[str], None] = lambda line: None) -> bool:
    """Requeue this job (``scontrol requeue``) while requeues are left; True when done.

    Slurm then ends this attempt (SIGTERM, which this process ignores from now on, so the
    flow run is not marked crashed) and starts the job again with the same flow run.
    """
    job = job_id()
    if job is None or not active():
        return False
    done, limit = restarts(), requeue_limit()
    if done >= limit:
        log(f"Slurm job {job} was requeued {done} times already (requeue_limit {limit})")
        return False
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"scontrol requeue {job} failed: {exc}")
        return False
    if proc.returncode != 0:
        log(f"scontrol requeue {job} failed: {' '.join((proc.stderr or proc.stdout).split())}")
        return False
    log(f"Slurm job {job} requeued ({done + 1} of {limit}); the flow run resumes when it restarts")
    return True


def wait_for_end(seconds: float = 300.0) -> None:
    """Wait for Slurm to end this attempt after a requeue."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
