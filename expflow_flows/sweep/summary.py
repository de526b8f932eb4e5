"""A finished sweep's summary: counts, the best combinations, exports, and whether it failed."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.settings.sweep import SweepSettings
from expflow_flows.sweep.report import write_dashboard
from expflow_flows.sweep.results import DEFAULT_REPLICATE, SweepResults, replicate_of
from expflow_flows.sweep.store import RESULTS_FILENAME, ResultStore

MAX_CHUNKS = 50
MIN_CHUNK = 200


def chunks(settings: SweepSettings, pending: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The pending combinations in Prefect-task-sized chunks (at most about 50 tasks)."""
    size = settings.chunk_size or max(MIN_CHUNK, math.ceil(len(pending) / MAX_CHUNKS))
    return [pending[i : i + size] for i in range(0, len(pending), size)]


def summarize(
    settings: SweepSettings,
    results: SweepResults,
    sweep_dir: Path,
    total: int,
    ran: int,
    *,
    write: bool = True,
) -> dict[str, Any]:
    """Counts and best rows; with ``write``, also the CSV/Parquet exports and the dashboard
    (a cached re-run of an unchanged space keeps the files it already has)."""
    last_step = settings.chain()[-1].name
    final = results.filter(step=last_step)
    counts = {k: v for k, v in final.status_counts().items() if v}
    csv_path = sweep_dir / "results.csv"
    parquet_path = sweep_dir / "results.parquet"
    metrics = sorted({c.removeprefix("metric:") for c in final.columns if c.startswith("metric:")})
    # No metric recorded (every run failed): no objective to plot, and check_failures
    # says what happened instead of naming a missing metric.
    objective = (settings.objective or metrics[0]) if metrics else None
    dashboard = sweep_dir / "dashboard.html"
    if write:
        results.to_csv(csv_path)
        results.to_parquet(parquet_path)
        store = sweep_dir / RESULTS_FILENAME
        write_dashboard(
            final.rows,
            dashboard,
            title=f"Sweep {settings.name}",
            objective=objective,
            maximize=settings.maximize,
            # The space's replicates.param, which the flow stored before any run.
            replicate=replicate_of(ResultStore(store, create=False))
            if store.exists()
            else DEFAULT_REPLICATE,
        )
    best = (
        final.best(objective, maximize=settings.maximize, n=5)
        if objective and counts.get("ok", 0) + counts.get("warning", 0)
        else []
    )
    return {
        "name": settings.name,
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


def _digest(current: set[str]) -> str:
    return hashlib.sha256("\n".join(sorted(current)).encode()).hexdigest()


def unchanged_summary(store: Any, current: set[str], sweep_dir: Path) -> dict[str, Any] | None:
    """The last summary, when it was made for exactly this space and its files are all there
    (a re-run with nothing to run then rewrites nothing); else None."""
    outputs = [sweep_dir / n for n in ("status.html", "dashboard.html", "results.csv")]
    if store.get_meta("reported") != _digest(current) or not all(p.exists() for p in outputs):
        return None
    return store.get_meta("summary")


def remember(store: Any, current: set[str], summary: dict[str, Any]) -> None:
    """Keep ``summary`` as the one reported for this space."""
    store.set_meta("summary", summary)
    store.set_meta("reported", _digest(current))


def check_failures(settings: SweepSettings, summary: dict[str, Any]) -> None:
    """Fail when every combination failed, or more than ``max_failure_ratio`` of them."""
    counts = summary["counts"]
    failed = counts.get("failed", 0)
    finished = sum(counts.values())
    ratio = failed / finished if finished else 0.0
    if finished and failed == finished:
        raise ExpflowError(
            f"all {finished} combinations of sweep {settings.name!r} failed; "
            f"see {summary['status_page']}"
        )
    if settings.max_failure_ratio is not None and ratio > settings.max_failure_ratio:
        raise ExpflowError(
            f"sweep {settings.name!r}: {failed} of {finished} combinations failed ({ratio:.1%}), "
            f"above max_failure_ratio {settings.max_failure_ratio:.1%}; see {summary['status_page']}"
        )


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: counts, where the files are, the best combinations."""
    best = summary.get("best") or []
    lines = [
        f"# Sweep {summary['name']}",
        "",
        f"{summary['combinations']} combinations: {summary['ran']} ran now, "
        f"{summary['cached']} cached. "
        + ", ".join(f"{k}: {v}" for k, v in summary["counts"].items()),
        "",
        f"- Dashboard: `{summary['dashboard']}`",
        f"- Status page: `{summary['status_page']}`",
        f"- Results: `{summary['results_csv']}`, `{summary['results_parquet']}`",
        "",
    ]
    if best:
        params = sorted({k for r in best for k in r if k.startswith("param:")})
        lines += [
            f"## Best by {summary['objective']}",
            "",
            "| rank | "
            + " | ".join(p.removeprefix("param:") for p in params)
            + f" | {summary['objective']} |",
            "|---" * (len(params) + 2) + "|",
        ]
        for i, r in enumerate(best, 1):
            cells = " | ".join(str(r.get(p, "")) for p in params)
            lines.append(f"| {i} | {cells} | {r.get('metric:' + summary['objective'])} |")
    return "\n".join(lines)
