"""How a flow ends on a user's mistake or a full disk: one line in its log and its state
message, no traceback (Prefect logs one for any exception a flow raises)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.states import Failed, Pending

from expflow_flows.errors import ExpflowError, JobEnding, disk_full
from expflow_flows.home import expflow_home
from expflow_flows.runs import slurmjob


def failed_outcome(exc: Exception, where: Path | str) -> Any:
    """The Failed state for an :class:`ExpflowError`, or for a full disk at ``where``;
    anything else is raised again (a bug keeps its traceback).

    A flow stopped because its Slurm job ends (:class:`JobEnding`) is requeued instead
    while requeues are left: the flow run waits, Pending, for the job to start again."""
    error = exc if isinstance(exc, ExpflowError) else disk_full(exc, where)
    if error is None:
        raise exc
    logger = get_run_logger()
    if isinstance(error, JobEnding) and slurmjob.requeue(logger.warning):
        _mark_requeued(str(error))
        slurmjob.wait_for_end()
    logger.error("%s", error)
    return Failed(message=str(error), data=error)


def _mark_requeued(why: str) -> None:
    """The flow run is Pending again until its requeued job starts (the UI says why)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_root_flow_run_id() or flow_run.get_id()
    if not run_id:
        return
    message = f"requeued: {why}"[:2000]
    with get_client(sync_client=True) as client:
        try:
            client.set_flow_run_state(run_id, Pending(message=message), force=True)
        except Exception:  # noqa: BLE001 - the requeue stands either way
            pass


def stop_file() -> Path:
    """This flow run's stop file (see :mod:`expflow_flows.runs.slurmjob`)."""
    from prefect.runtime import flow_run

    run_id = ""
    try:
        run_id = str(flow_run.get_root_flow_run_id() or flow_run.get_id() or "")
    except Exception:  # noqa: BLE001 - outside a server (tests): this process only
        run_id = str(flow_run.get_id() or "")
    return slurmjob.stop_file_for(expflow_home(), run_id)
