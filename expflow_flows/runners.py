"""The one factory for Prefect task runners: threads, a local Dask cluster, or a Dask address."""

from __future__ import annotations

import logging
from typing import Any

from expflow_flows.errors import ExpflowError


def make_task_runner(
    runner: str = "dask", *, workers: int = 2, dask_address: str | None = None
) -> Any:
    """A task runner: ``threads``; ``dask`` on a new ``LocalCluster`` of ``workers`` processes; or ``dask`` at ``dask_address``."""
    if runner == "threads":
        if dask_address:
            raise ExpflowError("dask_address is set but runner is 'threads'; use runner 'dask'")
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if runner != "dask":
        raise ExpflowError(f"runner {runner!r} is not known; expected dask or threads")
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
