"""The one factory for Prefect task runners: threads, a local Dask cluster, a Dask address,
or Dask workers in Slurm jobs (dask-jobqueue)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from expflow_flows.errors import ExpflowError

# Settings accepted under ``slurm:`` (passed to ``dask_jobqueue.SLURMCluster``).
SLURM_KEYS = (
    "cores",
    "memory",
    "processes",
    "walltime",
    "queue",
    "partition",
    "account",
    "job_extra_directives",
    "job_script_prologue",
    "worker_extra_args",
    "log_directory",
    "local_directory",
    "interface",
)
SLURM_DEFAULTS: dict[str, Any] = {
    "cores": 1,
    "memory": "2GB",
    "processes": 1,
    "walltime": "01:00:00",
}


def slurm_cluster_kwargs(slurm: dict[str, Any] | None) -> dict[str, Any]:
    """Validated ``SLURMCluster`` keyword arguments for one Dask worker per Slurm job.

    Raises a one-line ExpflowError for unknown keys or when dask-jobqueue is missing.
    """
    slurm = dict(slurm or {})
    unknown = sorted(set(slurm) - set(SLURM_KEYS))
    if unknown:
        raise ExpflowError(
            f"slurm setting {unknown[0]!r} is not known; accepted: {', '.join(SLURM_KEYS)}"
        )
    if "partition" in slurm:
        if "queue" in slurm and slurm["queue"] != slurm["partition"]:
            raise ExpflowError("slurm: give partition or queue (the same thing), not both")
        slurm["queue"] = slurm.pop("partition")
    for key in ("cores", "processes"):
        value = slurm.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExpflowError(f"slurm {key}={value!r}: expected a whole number >= 1")
    for key in ("job_extra_directives", "job_script_prologue", "worker_extra_args"):
        if key in slurm and not (
            isinstance(slurm[key], list) and all(isinstance(v, str) for v in slurm[key])
        ):
            raise ExpflowError(f"slurm {key}={slurm[key]!r}: expected a list of strings")
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        raise ExpflowError(
            "runner 'slurm' needs dask-jobqueue: pip install 'expflow-flows[slurm]'"
        ) from None
    # A random dashboard port: several clusters (tests, parallel runs) may share a host.
    return {
        **SLURM_DEFAULTS,
        "python": sys.executable,
        "scheduler_options": {"dashboard_address": ":0"},
        **slurm,
    }


def make_task_runner(
    runner: str = "dask",
    *,
    workers: int = 2,
    dask_address: str | None = None,
    slurm: dict[str, Any] | None = None,
) -> Any:
    """A task runner: ``threads``; ``dask`` on a new ``LocalCluster`` of ``workers`` processes;
    ``dask`` at ``dask_address``; or ``slurm``: up to ``workers`` Slurm jobs, each one Dask
    worker (``slurm`` holds the ``SLURMCluster`` settings, see ``SLURM_KEYS``)."""
    if slurm and runner != "slurm":
        raise ExpflowError(f"slurm settings are given but runner is {runner!r}; use runner 'slurm'")
    if runner == "slurm":
        if dask_address:
            raise ExpflowError("dask_address is set but runner is 'slurm'; use runner 'dask'")
        kwargs = slurm_cluster_kwargs(slurm)
        from prefect_dask import DaskTaskRunner

        logging.getLogger("distributed").setLevel(logging.WARNING)
        return DaskTaskRunner(
            cluster_class="dask_jobqueue.SLURMCluster",
            cluster_kwargs=kwargs,
            adapt_kwargs={"minimum": workers, "maximum": workers},
        )
    if runner == "threads":
        if dask_address:
            raise ExpflowError("dask_address is set but runner is 'threads'; use runner 'dask'")
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if runner != "dask":
        raise ExpflowError(f"runner {runner!r} is not known; expected dask, threads or slurm")
    from prefect_dask import DaskTaskRunner

    # The scheduler lives in this process; its INFO chatter would drown the run's logs.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    # One thread per worker process: trainables are CPU-bound numpy code, and a
    # callable's output capture is per process.
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
        },
    )
