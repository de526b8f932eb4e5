"""The ``sweep`` flow: thousands of combinations with a bounded number of Prefect tasks.

Prefect tracks one task per chunk of combinations; inside a chunk, Dask's own
``client.map`` fans the combinations out over the cluster's workers (see
:class:`~expflow_flows.sweep.execute.ChunkRunner`). Every finished combination is
written to the sweep's results store at once, so a re-run (after a crash, a
``kill -9`` or a change) runs only what is not already done with the same identity
(:mod:`expflow_flows.sweep.plan`). Its parameters are a YAML ``config`` file and typed
``settings`` over it (:class:`~expflow_flows.settings.sweep.SweepSettings`, all fields
optional). Reports (status page, dashboard) and exports are files in the sweep folder,
linked from artifacts. While it runs, the status page reloads itself and a progress
artifact moves as each combination finishes, its description counting ok, warning and
failed combinations with an ETA (:mod:`expflow_flows.flows.progress`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from expflow_flows.errors import JobEnding
from expflow_flows.flows import events
from expflow_flows.flows.clusters import dask_client
from expflow_flows.flows.ledger_hooks import describe_sweep, hooks_for, record_outputs
from expflow_flows.flows.offpeak import deferred_state, hold_for_offpeak
from expflow_flows.flows.outcomes import failed_outcome, stop_file
from expflow_flows.flows.progress import LiveProgress
from expflow_flows.home import runs_root
from expflow_flows.integrations.tracking import RunContext, StepRecord, Tracking
from expflow_flows.integrations.tracking import check_settings as check_tracking
from expflow_flows.reports_server import report_link
from expflow_flows.runs import slurmjob
from expflow_flows.runs.metadata import capture_environment
from expflow_flows.runs.trainable import checkpoint_requested
from expflow_flows.secrets import scrub, take_over
from expflow_flows.settings.base import overrides_model
from expflow_flows.settings.sweep import SweepSettings, load_sweep_settings
from expflow_flows.sweep.execute import ChunkRunner
from expflow_flows.sweep.plan import input_checksums, plan_combinations
from expflow_flows.sweep.report import write_status_page
from expflow_flows.sweep.results import SweepResults
from expflow_flows.sweep.space import SweepSpace
from expflow_flows.sweep.status import ProgressTally, StatusWriter, current_results
from expflow_flows.sweep.store import ResultStore
from expflow_flows.sweep.summary import (
    check_failures,
    chunks,
    remember,
    summarize,
    summary_markdown,
    unchanged_summary,
)

# The flow's ``settings`` parameter: every sweep setting, each optional.
SweepOverrides = overrides_model(SweepSettings)


@task(name="chunk", task_run_name="chunk-{index}", cache_policy=NO_CACHE, log_prints=False)
def run_chunk(index: int, plans: list[dict[str, Any]], runner: ChunkRunner) -> dict[str, int]:
    """Fan one chunk of combinations out over the sweep's Dask client; record each at once."""
    counts = runner.run(index, plans)
    get_run_logger().info(
        "chunk %d: %s", index, ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    )
    return counts


@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=2), **hooks_for(describe_sweep))
def sweep(
    config: str | None = None,
    settings: SweepOverrides | None = None,  # type: ignore[valid-type]
) -> dict[str, Any]:
    """Run a trainable (or a chain of steps) over every combination of a space, with
    caching and resume.

    Args:
        config: A sweep YAML config file (see deployments/); relative file names in it are
            relative to it.
        settings: Settings over the config file; give only what changes, e.g.
            {"cluster": {"workers": 4}, "force": true}.
    """
    try:
        # secrets the CLI kept out of this flow run's recorded parameters come back here
        resolved = load_sweep_settings(config, take_over(settings))
        deferred = hold_for_offpeak(resolved.offpeak.model_dump() if resolved.offpeak else None)
        if deferred:
            return deferred_state(deferred)
        # In a Slurm job that may be requeued: checkpoint before the job ends, then resume.
        with slurmjob.guard(stop_file(), get_run_logger().warning):
            return run_sweep(resolved)
    except Exception as exc:
        return failed_outcome(exc, runs_root())


def preflight(settings: SweepSettings) -> SweepSpace:
    """Check what a user can get wrong before anything starts: the space, the trainables,
    the tracking tools; returns the space."""
    space = SweepSpace.load(settings.space)
    settings.check()
    check_tracking(settings.tracking.enabled())
    return space


def run_sweep(settings: SweepSettings) -> dict[str, Any]:
    """The sweep's stages: plan, fan out in chunks, report; mirrored to tracking tools."""
    space = preflight(settings)
    # Before any work: a tracking tool asked for but not installed is one clear line.
    tracking = Tracking.from_settings(settings.tracking.enabled())
    sweep_dir = runs_root() / settings.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with tracking:
        tracking.run_started(
            RunContext(
                kind="sweep",
                name=settings.name,
                run_dir=sweep_dir,
                params=scrub(settings.to_dict()),
                flow_run_id=str(flow_run.get_id() or ""),
                flow_run_url=flow_run.get_flow_run_ui_url(),
            )
        )
        try:
            summary = _run_sweep(settings, space, sweep_dir, tracking)
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
    settings: SweepSettings, space: SweepSpace, sweep_dir: Path, tracking: Tracking
) -> dict[str, Any]:
    logger = get_run_logger()
    store = ResultStore(sweep_dir / "results.sqlite")
    flow_run_id = str(flow_run.get_id() or "")
    t0 = time.perf_counter()
    pending, total, current = plan_combinations(settings, space, store, sweep_dir)
    metadata = scrub(
        {
            "flow_run_id": flow_run_id,
            "config": settings.to_dict(),
            "space": space.to_dict(),  # fixed params may be secrets
            "combinations": total,
            "inputs": input_checksums(settings),
            "environment": capture_environment(),
            "planned_s": round(time.perf_counter() - t0, 3),
        }
    )
    (sweep_dir / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    store.set_meta("sweep", metadata)
    logger.info(
        "sweep %s: %d combinations, %d already done, %d to run",
        settings.name,
        total,
        total - len(pending),
        len(pending),
    )
    status_path = sweep_dir / "status.html"
    if pending:
        _fan_out(settings, pending, store, current, status_path, total)
    previous = None if pending else unchanged_summary(store, current, sweep_dir)
    if previous:
        # Nothing ran and the space is the one last reported: its summary still holds.
        logger.info("sweep %s: all %d combinations cached; reports unchanged", settings.name, total)
        _record_combinations(tracking, current_results(store, current))
        return {**previous, "ran": 0, "cached": total}
    results = current_results(store, current)
    _record_combinations(tracking, results)
    if not pending:  # with pending work the status writer wrote the final page
        write_status_page(
            results.rows, status_path, title=f"Sweep {settings.name}", total=total, refresh_s=None
        )
    summary = _finish(settings, results, sweep_dir, total, len(pending), flow_run_id)
    remember(store, current, summary)
    return summary


def _fan_out(
    settings: SweepSettings,
    pending: list[dict[str, Any]],
    store: ResultStore,
    current: set[str],
    status_path: Path,
    total: int,
) -> None:
    """Run the pending combinations in chunks, as Prefect tasks on one Dask client; the
    status page live and the progress artifact moving as each combination finishes."""
    resources = settings.resources.dask()
    stopper = stop_file()
    title = f"Sweep {settings.name}"
    live = LiveProgress(_key(settings.name, "progress"), f"{title}: {len(pending)} to run")
    try:
        # The live page first: from now on it reloads, even while the cluster starts.
        with (
            StatusWriter(
                store,
                current,
                status_path,
                title,
                total,
                settings.status_every_s,
                rerun=[plan["combo_id"] for plan in pending],
            ),
            dask_client(settings.cluster, resources) as client,
        ):
            tally = ProgressTally(
                store,
                settings.name,
                pending,
                settings.chain()[-1].name,
                cached=total - len(pending),
                on_update=lambda p: live.show(p.percent, p.line()),
            )
            runner = ChunkRunner(
                client,
                tally,  # records each row in the store and counts the combinations
                retries=settings.retries,
                resources=resources,
                stop_file=str(stopper),
                devices=settings.cluster.device_request(settings.resources.gpu),
            )
            parts = chunks(settings, pending)
            futures = [run_chunk.submit(i, part, runner) for i, part in enumerate(parts)]
            for future in futures:
                future.wait()
            for future in futures:
                future.result()
    finally:
        live.close()
    why = checkpoint_requested()
    if why is None and stopper.exists():
        why = stopper.read_text(encoding="utf-8").strip() or "its job ends soon"
    if why is not None:
        raise JobEnding(
            f"the sweep stopped early ({why}); the combinations it cut saved checkpoints and "
            "resume when the flow run is requeued or run again"
        )


def _key(*parts: str) -> str:
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:100]


def _finish(
    settings: SweepSettings,
    results: SweepResults,
    sweep_dir: Path,
    total: int,
    ran: int,
    flow_run_id: str,
) -> dict[str, Any]:
    """The summary, its artifacts and ledger outputs; fails on too many failed combinations."""
    summary = summarize(settings, results, sweep_dir, total, ran)
    dashboard = summary["dashboard"]
    create_link_artifact(
        key=_key(settings.name, "dashboard"),
        link=report_link(dashboard),
        link_text=f"Sweep {settings.name}: dashboard",
        description="plotly dashboard (open the file in a browser)",
    )
    create_link_artifact(
        key=_key(settings.name, "status"),
        link=report_link(summary["status_page"]),
        link_text=f"Sweep {settings.name}: status page",
    )
    create_markdown_artifact(
        key=_key(settings.name, "summary"),
        markdown=summary_markdown(summary),
        description=f"Sweep {settings.name}",
    )
    record_outputs(
        flow_run_id,
        params={"space": settings.space if isinstance(settings.space, str) else "inline"},
        metrics={"combinations": float(total), "failed": float(summary["counts"].get("failed", 0))},
        run_dir=str(sweep_dir),
    )
    try:
        check_failures(settings, summary)
    except Exception as exc:
        counts = summary["counts"]
        finished = sum(counts.values())
        failed = counts.get("failed", 0)
        events.emit(
            events.SWEEP_FAILURES,
            settings.name,
            [
                events.metric_resource(
                    "failure_ratio",
                    failed / finished if finished else 0.0,
                    "le",
                    settings.max_failure_ratio if settings.max_failure_ratio is not None else 1.0,
                )
            ],
            {"message": str(exc), "failed": failed, "finished": finished},
        )
        raise
    get_run_logger().info(
        "sweep %s done: %s; dashboard %s",
        settings.name,
        ", ".join(f"{k} {v}" for k, v in summary["counts"].items()),
        dashboard,
    )
    return summary
