"""The ``sweep`` flow: thousands of combinations with a bounded number of Prefect tasks.

Prefect tracks one task per chunk of combinations; inside a chunk, Dask's own
``client.map`` fans the combinations out over the cluster's workers (a
``LocalCluster`` by default, or ``dask_address``). Every finished combination is
written to the sweep's results store at once, so a re-run (after a crash, a
``kill -9`` or a change) runs only what is not already done with the same
identity. Reports (status page, dashboard) and exports are files in the sweep
folder, linked from artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from expflow_flows.errors import ExpflowError
from expflow_flows.flows.ledger_hooks import hooks_for, record_outputs
from expflow_flows.flows.offpeak import hold_for_offpeak
from expflow_flows.home import runs_root
from expflow_flows.integrations.tracking import RunContext, StepRecord, Tracking
from expflow_flows.runs.metadata import capture_environment
from expflow_flows.runs.trainable import Trainable
from expflow_flows.secrets import scrub
from expflow_flows.sweep.config import SweepConfig, build_sweep_config
from expflow_flows.sweep.execute import (
    ComboPlan,
    StepPlan,
    batch_size,
    failed_row,
    run_batch,
)
from expflow_flows.sweep.identity import cache_key, file_checksum, trainable_fingerprint
from expflow_flows.sweep.report import write_dashboard, write_status_page
from expflow_flows.sweep.results import SweepResults
from expflow_flows.sweep.space import SweepSpace
from expflow_flows.sweep.status import StatusWriter, current_results
from expflow_flows.sweep.store import ResultStore
from expflow_flows.sweep.summary import summary_markdown

PLAN_BATCH = 5000
MAX_CHUNKS = 50
MIN_CHUNK = 200
_CLIENTS: dict[str, Any] = {}
# Mean seconds per combination seen so far in a sweep, by client token: sizes later batches.
_SECONDS_EACH: dict[str, float] = {}


def describe(parameters: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Name, trainable and settings of a sweep run, for the ledger."""
    fields = {k: v for k, v in parameters.items() if k not in ("config", "offpeak")}
    cfg = build_sweep_config(parameters.get("config"), **fields)
    trainable = cfg.trainable or " -> ".join(s.trainable for s in cfg.step_configs())
    return cfg.name, trainable, cfg.to_dict()


def plan_combinations(
    cfg: SweepConfig, space: SweepSpace, store: ResultStore, sweep_dir: Path
) -> tuple[list[dict[str, Any]], int, set[str]]:
    """The combinations that still need running (as worker plans), the total count, and the
    keys of every step of every combination of this space (older results are history)."""
    steps = cfg.step_configs()
    fingerprints = {s.name: trainable_fingerprint(s.trainable) for s in steps}
    inputs = {
        str(Path(p).expanduser()): file_checksum(str(Path(p).expanduser())) for p in cfg.inputs
    }
    pending: list[dict[str, Any]] = []
    current: set[str] = set()
    total = 0
    batch: list[tuple[Any, list[tuple[Any, str]]]] = []

    def flush() -> None:
        keys = [k for _, ks in batch for _, k in ks]
        done = store.completed_keys(keys)
        for combo, step_keys in batch:
            plans = []
            rerun = False
            for step, key in step_keys:
                cached = key in done and not cfg.forced(step.name) and not rerun
                rerun = rerun or not cached
                plans.append(
                    StepPlan(
                        name=step.name,
                        trainable=step.trainable,
                        key=key,
                        run_dir=str(sweep_dir / "runs" / combo.id / f"{step.name}-{key[:10]}"),
                        budget=step.budget if step.budget is not None else cfg.budget,
                        timeout=step.timeout if step.timeout is not None else cfg.timeout,
                        cached=cached,
                    )
                )
            if rerun:
                pending.append(
                    ComboPlan(
                        combo.id, combo.index, combo.params, tuple(plans), cfg.arg_style
                    ).to_dict()
                )
        batch.clear()

    for combo in space.combinations():
        total += 1
        upstream = ""
        step_keys = []
        for step in steps:
            upstream = cache_key(
                fingerprints[step.name],
                combo.params,
                inputs=inputs,
                upstream=upstream,
                version=step.version or cfg.version,
                budget=step.budget if step.budget is not None else cfg.budget,
            )
            step_keys.append((step, upstream))
            current.add(upstream)
        batch.append((combo, step_keys))
        if len(batch) >= PLAN_BATCH:
            flush()
    if batch:
        flush()
    return pending, total, current


@task(name="chunk", task_run_name="chunk-{index}", cache_policy=NO_CACHE, log_prints=False)
def run_chunk(
    index: int,
    plans: list[dict[str, Any]],
    client_token: str,
    store_path: str,
    retries: int,
    resources: dict[str, float],
) -> dict[str, int]:
    """Fan one chunk of combinations out with ``client.map``; record each as it finishes."""
    from distributed import as_completed

    client = _CLIENTS[client_token]
    store = ResultStore(Path(store_path))
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    size = batch_size(len(plans), workers, _SECONDS_EACH.get(client_token))
    batches = [plans[i : i + size] for i in range(0, len(plans), size)]
    keys = [f"batch-{index}-{i}-{uuid.uuid4().hex[:8]}" for i in range(len(batches))]
    by_key = dict(zip(keys, batches, strict=True))
    futures = client.map(
        run_batch, batches, key=keys, pure=False, retries=retries, resources=resources or None
    )
    counts = {"ok": 0, "warning": 0, "pruned": 0, "failed": 0}
    buffer: list[dict[str, Any]] = []
    recorded: list[dict[str, Any]] = []
    flushed = time.monotonic()
    for future in as_completed(futures):
        try:
            rows = future.result()
        except Exception as exc:  # noqa: BLE001 - a lost worker or task error fails its combinations
            rows = [failed_row(p, f"{type(exc).__name__}: {exc}") for p in by_key[future.key]]
        future.release()
        last: dict[str, dict[str, Any]] = {}
        for row in rows:
            last[row["combo_id"]] = row
        for row in last.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        buffer.extend(rows)
        recorded.extend(rows)
        if len(buffer) >= 200 or time.monotonic() - flushed > 0.5:
            store.record_many(buffer)
            buffer.clear()
            flushed = time.monotonic()
    if buffer:
        store.record_many(buffer)
    walls = [float(r["wall_s"]) for r in recorded if r.get("wall_s") is not None]
    if walls:
        _SECONDS_EACH[client_token] = sum(walls) / len(walls)
    get_run_logger().info(
        "chunk %d: %s", index, ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    )
    return counts


def _start_dask(cfg: SweepConfig) -> tuple[Any, Any]:
    """A client on ``dask_address``, on Slurm jobs (one Dask worker each), or on a new
    LocalCluster with one thread per worker."""
    import logging

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    if cfg.dask_address:
        return Client(cfg.dask_address), None
    wanted = cfg.dask_resources()
    if cfg.cluster == "slurm":
        return _start_slurm(cfg)
    if wanted.get("GPU"):
        import shutil

        if shutil.which("nvidia-smi") is None:
            raise ExpflowError(
                f"resources ask for gpu={cfg.resources['gpu']} but this machine has no GPU "
                "(no nvidia-smi); use a cluster with GPU workers (dask_address)"
            )
    if wanted.get("CPU", 1) > 1:
        raise ExpflowError(
            f"resources ask for cpu={cfg.resources['cpu']} per combination, but local workers have 1 "
            "thread each; lower it or use a cluster (dask_address)"
        )
    import psutil

    memory = psutil.virtual_memory().total / cfg.workers
    cluster = LocalCluster(
        n_workers=cfg.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        resources={"CPU": 1, "MEMORY": memory, "GPU": 0},
    )
    return Client(cluster), cluster


def _start_slurm(cfg: SweepConfig) -> tuple[Any, Any]:
    """``cfg.workers`` Slurm jobs, each one Dask worker with ``slurm.cores`` threads; the
    workers declare CPU/MEMORY/GPU resources so per-combination ``resources`` are honoured."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from expflow_flows.flows.clusters import slurm_cluster_kwargs
    from expflow_flows.sweep.config import parse_memory

    kwargs = slurm_cluster_kwargs(cfg.slurm)
    gres = any("gres" in d or "gpus" in d for d in kwargs.get("job_extra_directives", []))
    gpus = float(cfg.resources.get("gpu", 0)) if gres else 0
    procs = kwargs.get("processes", 1)
    declared = (
        f"CPU={kwargs['cores'] // procs},MEMORY={int(parse_memory(kwargs['memory']) / procs)},"
        f"GPU={gpus:g}"
    )
    kwargs["worker_extra_args"] = [*kwargs.get("worker_extra_args", []), "--resources", declared]
    cluster = SLURMCluster(**kwargs)
    cluster.scale(jobs=cfg.workers)
    return Client(cluster), cluster


@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=2), **hooks_for(describe))
def sweep(
    config: str | None = None,
    name: str | None = None,
    trainable: str | None = None,
    steps: list[dict[str, Any]] | None = None,
    space: str | dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    timeout: float | None = None,
    version: str | None = None,
    inputs: list[str] | None = None,
    force: bool | list[str] | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
    cluster: str | None = None,
    slurm: dict[str, Any] | None = None,
    chunk_size: int | None = None,
    retries: int | None = None,
    resources: dict[str, Any] | None = None,
    max_failure_ratio: float | None = None,
    arg_style: str | None = None,
    objective: str | None = None,
    maximize: bool | None = None,
    offpeak: dict[str, Any] | None = None,
    tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a trainable (or a chain of steps) over every combination of a space, with caching and resume.

    ``offpeak`` moves a run triggered in peak hours to the next off-peak window.
    """
    try:
        deferred = hold_for_offpeak(offpeak)
        if deferred:
            return deferred
        cfg = build_sweep_config(
            config,
            name=name,
            trainable=trainable,
            steps=steps,
            space=space,
            budget=budget,
            timeout=timeout,
            version=version,
            inputs=inputs,
            force=force,
            workers=workers,
            dask_address=dask_address,
            cluster=cluster,
            slurm=slurm,
            chunk_size=chunk_size,
            retries=retries,
            resources=resources,
            max_failure_ratio=max_failure_ratio,
            arg_style=arg_style,
            objective=objective,
            maximize=maximize,
            tracking=tracking,
        )
        return run_sweep(cfg)
    except ExpflowError as exc:
        get_run_logger().error("%s", exc)
        return Failed(message=str(exc), data=exc)


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep's stages: plan, fan out in chunks, report; mirrored to tracking tools."""
    space = SweepSpace.load(cfg.space)
    for step in cfg.step_configs():
        Trainable.parse(step.trainable).check()
    # Before any work: a tracking tool asked for but not installed is one clear line.
    tracking = Tracking.from_settings(cfg.tracking)
    sweep_dir = runs_root() / cfg.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with tracking:
        tracking.run_started(
            RunContext(
                kind="sweep",
                name=cfg.name,
                run_dir=sweep_dir,
                params=scrub(cfg.to_dict()),
                flow_run_id=str(flow_run.get_id() or ""),
                flow_run_url=flow_run.get_flow_run_ui_url(),
            )
        )
        try:
            summary = _run_sweep(cfg, space, sweep_dir, tracking)
        except Exception as exc:
            tracking.run_finished("failed", {}, {}, str(exc))
            raise
        metrics = {"combinations": float(summary["combinations"])}
        metrics.update({f"n_{k}": float(v) for k, v in summary.get("counts", {}).items()})
        best = (summary.get("best") or [None])[0]
        objective = summary.get("objective")
        if best and objective and isinstance(best.get(f"metric:{objective}"), (int, float)):
            metrics[f"best_{objective}"] = float(best[f"metric:{objective}"])
        artifacts = {
            name: Path(summary[key])
            for name, key in (("results.csv", "results_csv"), ("dashboard", "dashboard"))
            if summary.get(key)
        }
        tracking.run_finished("ok", metrics, artifacts)
        return {**summary, "tracking_warnings": list(tracking.warnings)}


def _record_combinations(tracking: Tracking, results: SweepResults) -> None:
    """Each finished combination, for the tools that want them (ClearML's table)."""
    if not tracking.wants_combinations:
        return
    for row in results.rows:
        tracking.record(
            StepRecord(
                kind="combination",
                name=f"combination-{row.get('combo_index')}-{row.get('step')}",
                params={k[len("param:") :]: v for k, v in row.items() if k.startswith("param:")},
                status=str(row.get("status") or ""),
                metrics={
                    k[len("metric:") :]: float(v)
                    for k, v in row.items()
                    if k.startswith("metric:") and isinstance(v, (int, float))
                },
                wall_s=float(row.get("wall_s") or 0.0),
                reason=str(row.get("reason") or ""),
                number=row.get("combo_index"),
            )
        )


def _run_sweep(
    cfg: SweepConfig, space: SweepSpace, sweep_dir: Path, tracking: Tracking
) -> dict[str, Any]:
    logger = get_run_logger()
    store = ResultStore(sweep_dir / "results.sqlite")
    flow_run_id = str(flow_run.get_id() or "")
    t0 = time.perf_counter()
    pending, total, current = plan_combinations(cfg, space, store, sweep_dir)
    metadata = {
        "flow_run_id": flow_run_id,
        "config": cfg.to_dict(),
        "space": space.to_dict(),
        "combinations": total,
        "inputs": {p: file_checksum(str(Path(p).expanduser())) for p in cfg.inputs},
        "environment": capture_environment(),
        "planned_s": round(time.perf_counter() - t0, 3),
    }
    (sweep_dir / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    store.set_meta("sweep", metadata)
    logger.info(
        "sweep %s: %d combinations, %d already done, %d to run",
        cfg.name,
        total,
        total - len(pending),
        len(pending),
    )
    status_path = sweep_dir / "status.html"
    if pending:
        size = cfg.chunk_size or max(MIN_CHUNK, math.ceil(len(pending) / MAX_CHUNKS))
        chunks = [pending[i : i + size] for i in range(0, len(pending), size)]
        client, cluster = _start_dask(cfg)
        token = uuid.uuid4().hex
        _CLIENTS[token] = client
        progress_id = create_progress_artifact(
            progress=0.0,
            key=_key(cfg.name, "progress"),
            description=f"Sweep {cfg.name}: chunks done",
        )
        try:
            with StatusWriter(
                store, current, status_path, f"Sweep {cfg.name}", total, cfg.status_every_s
            ):
                futures = [
                    run_chunk.submit(
                        i, chunk, token, str(store.path), cfg.retries, cfg.dask_resources()
                    )
                    for i, chunk in enumerate(chunks)
                ]
                for done, future in enumerate(futures, 1):
                    future.wait()
                    update_progress_artifact(progress_id, 100.0 * done / len(futures))
                for future in futures:
                    future.result()
        finally:
            _CLIENTS.pop(token, None)
            _SECONDS_EACH.pop(token, None)
            client.close()
            if cluster is not None:
                cluster.close()
    digest = hashlib.sha256("\n".join(sorted(current)).encode()).hexdigest()
    outputs = [status_path, sweep_dir / "dashboard.html", sweep_dir / "results.csv"]
    fresh = (
        not pending and store.get_meta("reported") == digest and all(p.exists() for p in outputs)
    )
    previous = store.get_meta("summary") if fresh else None
    if previous:
        # Nothing ran and the space is the one last reported: its summary still holds.
        logger.info("sweep %s: all %d combinations cached; reports unchanged", cfg.name, total)
        _record_combinations(tracking, current_results(store, current))
        return {**previous, "ran": 0, "cached": total}
    results = current_results(store, current)
    _record_combinations(tracking, results)
    if not fresh and not pending:  # with pending work the status writer wrote the final page
        write_status_page(
            results.rows, status_path, title=f"Sweep {cfg.name}", total=total, refresh_s=None
        )
    summary = _finish(cfg, results, sweep_dir, total, len(pending), flow_run_id, write=not fresh)
    store.set_meta("summary", summary)
    store.set_meta("reported", digest)
    return summary


def _key(*parts: str) -> str:
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:100]


def _finish(
    cfg: SweepConfig,
    results: SweepResults,
    sweep_dir: Path,
    total: int,
    ran: int,
    flow_run_id: str,
    *,
    write: bool = True,
) -> dict[str, Any]:
    """Counts, best rows and artifacts; with ``write``, also the exports and the dashboard
    (a cached re-run of an unchanged space keeps the files it already has)."""
    logger = get_run_logger()
    last_step = cfg.step_configs()[-1].name
    final = results.filter(step=last_step)
    counts = {k: v for k, v in final.status_counts().items() if v}
    csv_path = sweep_dir / "results.csv"
    parquet_path = sweep_dir / "results.parquet"
    metrics = sorted({c.removeprefix("metric:") for c in final.columns if c.startswith("metric:")})
    objective = cfg.objective or (metrics[0] if metrics else None)
    dashboard = sweep_dir / "dashboard.html"
    if write:
        results.to_csv(csv_path)
        results.to_parquet(parquet_path)
        write_dashboard(
            final.rows,
            dashboard,
            title=f"Sweep {cfg.name}",
            objective=objective,
            maximize=cfg.maximize,
        )
    best = (
        final.best(objective, maximize=cfg.maximize, n=5)
        if objective and counts.get("ok", 0) + counts.get("warning", 0)
        else []
    )
    failed = counts.get("failed", 0)
    finished = sum(counts.values())
    summary = {
        "name": cfg.name,
        "sweep_dir": str(sweep_dir),
        "combinations": total,
        "ran": ran,
        "cached": total - ran,
        "counts": counts,
        "objective": objective,
        "best": best,
        "results_csv": str(csv_path),
        "results_parquet": str(parquet_path),
        "dashboard": str(dashboard),
        "status_page": str(sweep_dir / "status.html"),
    }
    create_link_artifact(
        key=_key(cfg.name, "dashboard"),
        link=f"file://{dashboard}",
        link_text=f"Sweep {cfg.name}: dashboard",
        description="plotly dashboard (open the file in a browser)",
    )
    create_link_artifact(
        key=_key(cfg.name, "status"),
        link=f"file://{sweep_dir / 'status.html'}",
        link_text=f"Sweep {cfg.name}: status page",
    )
    create_markdown_artifact(
        key=_key(cfg.name, "summary"),
        markdown=summary_markdown(summary),
        description=f"Sweep {cfg.name}",
    )
    record_outputs(
        flow_run_id,
        params={"space": cfg.space if isinstance(cfg.space, str) else "inline"},
        metrics={"combinations": float(total), "failed": float(failed)},
        run_dir=str(sweep_dir),
    )
    ratio = failed / finished if finished else 0.0
    if finished and failed == finished:
        raise ExpflowError(
            f"all {finished} combinations of sweep {cfg.name!r} failed; see {summary['status_page']}"
        )
    if cfg.max_failure_ratio is not None and ratio > cfg.max_failure_ratio:
        raise ExpflowError(
            f"sweep {cfg.name!r}: {failed} of {finished} combinations failed ({ratio:.1%}), "
            f"above max_failure_ratio {cfg.max_failure_ratio:.1%}; see {summary['status_page']}"
        )
    logger.info(
        "sweep %s done: %s; dashboard %s",
        cfg.name,
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        dashboard,
    )
    return summary
