"""The one cluster factory: what ``cluster`` settings mean, for the pipeline and the sweep.

``kind: local`` is Dask (a new ``LocalCluster`` of one-thread worker processes, or the
scheduler at ``address``), ``threads`` runs in this process, ``slurm`` puts Dask
workers in Slurm jobs (dask-jobqueue). The pipeline's HPO stage gets a Prefect task
runner (:func:`task_runner`); the sweep gets a Dask client (:func:`dask_client`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.settings.common import ClusterSettings, SlurmSettings, parse_memory


def slurm_cluster_kwargs(slurm: SlurmSettings | dict[str, Any] | None) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments for one Dask worker per Slurm job.

    Raises a one-line ExpflowError for bad settings or when dask-jobqueue is missing.
    """
    if isinstance(slurm, dict):
        from expflow_flows.settings.base import validate

        slurm = validate(SlurmSettings, slurm, "slurm")
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        raise ExpflowError(
            "cluster kind 'slurm' needs dask-jobqueue: pip install 'expflow-flows[slurm]'"
        ) from None
    given = (slurm or SlurmSettings()).model_dump(exclude_none=True)
    given["queue"] = given.pop("partition", None)
    for key in ("job_extra_directives", "job_script_prologue", "worker_extra_args"):
        if not given.get(key):
            given.pop(key, None)
    # A random dashboard port: several clusters (tests, parallel runs) may share a host.
    return {
        "python": sys.executable,
        "scheduler_options": {"dashboard_address": ":0"},
        **{k: v for k, v in given.items() if v is not None},
    }


def task_runner(cluster: ClusterSettings) -> Any:
    """A Prefect task runner for ``cluster`` (the pipeline's HPO stage)."""
    # The scheduler lives in this process; its INFO chatter would drown the run's logs.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if cluster.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cluster.workers)
    from prefect_dask import DaskTaskRunner

    if cluster.kind == "slurm":
        return DaskTaskRunner(
            cluster_class="dask_jobqueue.SLURMCluster",
            cluster_kwargs=slurm_cluster_kwargs(cluster.slurm),
            adapt_kwargs={"minimum": cluster.workers, "maximum": cluster.workers},
        )
    if cluster.address:
        return DaskTaskRunner(address=cluster.scheduler_address())
    # One thread per worker process: trainables are CPU-bound numpy code, and a
    # callable's output capture is per process.
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": cluster.workers, "threads_per_worker": 1, "processes": True},
    )


@contextlib.contextmanager
def dask_client(cluster: ClusterSettings, resources: dict[str, float]) -> Iterator[Any]:
    """A Dask client for ``cluster`` whose workers declare CPU/MEMORY/GPU resources, so
    per-run ``resources`` are honoured; the cluster it started is closed on exit."""
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    made: Any = None
    if cluster.address:
        client = Client(cluster.scheduler_address())
    elif cluster.kind == "slurm":
        made = _slurm_cluster(cluster, resources)
        client = Client(made)
    else:
        gpus = _local_gpus(cluster, resources)
        if resources.get("CPU", 1) > 1:
            raise ExpflowError(
                f"resources ask for cpu={resources['CPU']:g} per combination, but local workers "
                "have 1 thread each; lower it or use a cluster (cluster.address)"
            )
        import psutil

        made = LocalCluster(
            n_workers=cluster.workers,
            threads_per_worker=1,
            processes=cluster.kind == "local",
            dashboard_address=":0",
            resources={
                "CPU": 1,
                "MEMORY": psutil.virtual_memory().total / cluster.workers,
                "GPU": gpus / cluster.workers,
            },
        )
        client = Client(made)
    try:
        yield client
    finally:
        client.close()
        if made is not None:
            made.close()


def _local_gpus(cluster: ClusterSettings, resources: dict[str, float]) -> int:
    """GPUs the local workers share (0 unless asked for); one line when the combinations'
    GPUs cannot be had here, which Dask would otherwise wait for forever."""
    from expflow_flows.runs import devices

    wanted = resources.get("GPU") or 0
    if not wanted and cluster.gpus is None:
        return 0  # nvidia-smi is not asked about GPUs nobody wants
    if isinstance(cluster.gpus, list):
        found = list(cluster.gpus)
    else:
        found = devices.discover()
    if wanted and not found:
        raise ExpflowError(
            f"resources ask for gpu={wanted:g} but this machine has no GPU (none in "
            "CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES, the Slurm job or nvidia-smi); use a "
            "cluster with GPU workers (cluster.address)"
        )
    per_worker = len(found) / cluster.workers
    if wanted > per_worker + 1e-9:
        raise ExpflowError(
            f"resources ask for gpu={wanted:g} per combination but {len(found)} GPUs over "
            f"cluster.workers={cluster.workers} give {per_worker:g} each; lower workers to "
            f"{max(1, int(len(found) // wanted))} or ask for less"
        )
    return len(found)


def _slurm_cluster(cluster: ClusterSettings, resources: dict[str, float]) -> Any:
    """``cluster.workers`` Slurm jobs, each one Dask worker with ``slurm.cores`` threads."""
    kwargs = slurm_cluster_kwargs(cluster.slurm)  # first: a missing dask-jobqueue is one line
    from dask_jobqueue import SLURMCluster

    gres = any("gres" in d or "gpus" in d for d in kwargs.get("job_extra_directives", []))
    gpus = float(resources.get("GPU", 0)) if gres else 0
    procs = kwargs.get("processes", 1)
    declared = (
        f"CPU={kwargs['cores'] // procs},MEMORY={int(parse_memory(kwargs['memory']) / procs)},"
        f"GPU={gpus:g}"
    )
    kwargs["worker_extra_args"] = [*kwargs.get("worker_extra_args", []), "--resources", declared]
    made = SLURMCluster(**kwargs)
    made.scale(jobs=cluster.workers)
    return made
