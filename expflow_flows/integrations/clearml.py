"""Mirror pipeline and sweep runs to ClearML, and read ClearML tasks back for `compare`.

Turned on per run with ``tracking: {clearml: {...}}``. Settings:

``project``      ClearML project (default ``expflow/<experiment or sweep>``)
``tags``         tags for every task (the run's kind is added: pipeline / sweep)
``offline``      record without a server (default: ``CLEARML_OFFLINE_MODE``); the
                 session folder goes under the run folder (``<run>/clearml``)
``steps``        ``none`` (default): trials, stages and combinations are scalars and a
                 table in the run's task; ``all``: also one ClearML task per step,
                 child of the run's task (needs a server)
``combinations`` for sweeps: ``aggregate`` (default: one table, no task per
                 combination), ``all`` or ``sample`` (``sample`` tasks, evenly spread)
``sample``       how many combinations ``combinations: sample`` mirrors (default 20)

What a run's task holds: the run's settings (``General/…``), the best parameters
(``Args/…`` when the trainable is a script, as ClearML's own script tasks name them),
the Prefect flow run's id and URL (``Prefect/…`` and the task comment), scalars named
``Group/Metric`` after the metrics registry (``PDE/nrmse``), one point per trial, the
trials table, and the artifacts (pred.hdf5, the HTML report, the submission bundle,
summary.json). The run's end sets the task completed or failed, with a
``gate-failed`` tag when a gate stopped the submission.

The SDK is imported only when a run starts, after the offline cache folder is set, so
a run without ClearML tracking never pays for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.integrations.tracking import RunContext, StepRecord, Tracker

STEPS = ("none", "all")
COMBINATIONS = ("aggregate", "all", "sample")
MISSING = "ClearML tracking needs the clearml package: pip install 'expflow-flows[clearml]'"


def _quiet() -> contextlib.AbstractContextManager:
    """The SDK prints notices on stdout, which belongs to the command (``--json`` output,
    an MCP server's JSON-RPC); they go to stderr instead."""
    return contextlib.redirect_stdout(sys.stderr)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _group(metric: str) -> tuple[str, str]:
    """(title, series) for a metric: its registry group, else "Metrics"."""
    if "/" in metric:
        title, _, series = metric.rpartition("/")
        return title, series
    try:
        from expflow_flows.metrics.registry import load_registry

        return load_registry().get(metric).group, metric
    except ExpflowError:
        return "Metrics", metric


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a.b`` keys with plain values, as ClearML shows them; values
    under secret-looking keys (api_key, token, password …) are masked."""
    from expflow_flows.secrets import scrub

    params = scrub(params) if not prefix else params
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of dicts as a header row and value rows (ClearML tables need no pandas)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return [columns] + [[row.get(c, "") for c in columns] for row in rows]


class ClearMLTracker(Tracker):
    """Mirrors one run (see the module docstring)."""

    name = "clearml"
    sdk = ("ClearML tracking", "clearml", "clearml")
    wants_combinations = True  # kept for the sweep's table; tasks only when asked

    def __init__(
        self,
        project: str | None = None,
        tags: list[str] | None = None,
        offline: bool | None = None,
        steps: str = "none",
        combinations: str = "aggregate",
        sample: int = 20,
        task_type: str = "training",
    ):
        if importlib.util.find_spec("clearml") is None:
            raise ExpflowError(MISSING)
        if steps not in STEPS:
            raise ExpflowError(f"tracking.clearml.steps={steps!r}: expected one of {STEPS}")
        if combinations not in COMBINATIONS:
            raise ExpflowError(
                f"tracking.clearml.combinations={combinations!r}: expected one of {COMBINATIONS}"
            )
        if not isinstance(sample, int) or sample < 1:
            raise ExpflowError(f"tracking.clearml.sample={sample!r}: expected a whole number >= 1")
        if tags is not None and not (
            isinstance(tags, list) and all(isinstance(t, str) for t in tags)
        ):
            raise ExpflowError(f"tracking.clearml.tags={tags!r}: expected a list of strings")
        self.offline = (
            _truthy(os.environ.get("CLEARML_OFFLINE_MODE")) if offline is None else offline
        )
        if self.offline and (steps == "all" or combinations != "aggregate"):
            raise ExpflowError(
                "tracking.clearml: a task per step or combination needs a ClearML server; "
                "offline mode mirrors them into the run's own task (steps: none, "
                "combinations: aggregate)"
            )
        self.project = project
        self.tags = list(tags or [])
        self.steps = steps
        self.combinations = combinations
        self.sample = sample
        self.task_type = task_type
        self.task: Any = None
        self.context: RunContext | None = None
        self._trials: list[dict[str, Any]] = []
        self._combos: list[StepRecord] = []
        self._restore: list[Any] = []  # process-wide settings to put back at close
        self.offline_folder: Path | None = None

    # ------------------------------------------------------------------ the run
    def run_started(self, context: RunContext) -> None:
        self.context = context
        if self.offline and not os.environ.get("CLEARML_CACHE_DIR"):
            # The offline session then lies in the run folder, next to everything else
            # the run wrote (the SDK reads the variable at each Task.init).
            os.environ["CLEARML_CACHE_DIR"] = str(context.run_dir / "clearml")
            self._restore.append(lambda: os.environ.pop("CLEARML_CACHE_DIR", None))
        from clearml import Task

        if self.offline and not Task.is_offline():
            Task.set_offline(True)
            self._restore.append(lambda: Task.set_offline(False))
        self.project = self.project or f"expflow/{context.name}"
        with _quiet():
            self.task = self._init(Task, context)
        # Task.init marks this process as the task's owner through the environment;
        # a trainable that calls Task.init itself must get its own task, not this one.
        for var in ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"):
            os.environ.pop(var, None)
        if self.offline:
            self.offline_folder = Path(self.task.get_offline_mode_folder())
        self.task.add_tags([*self.tags, context.kind])
        values = {f"General/{k}": v for k, v in _flat(context.params).items()}
        values.update(
            {
                "Prefect/flow_run_id": context.flow_run_id,
                "Prefect/flow_run_url": context.flow_run_url or "",
                "Prefect/run_dir": str(context.run_dir),
            }
        )
        self.task.update_parameters(values)
        if context.flow_run_url:
            self.task.set_comment(f"Prefect flow run: {context.flow_run_url}")

    def _init(self, task_class: Any, context: RunContext) -> Any:
        return task_class.init(
            project_name=self.project,
            task_name=f"{context.kind} {context.name} {context.run_dir.name}",
            task_type=self.task_type,
            reuse_last_task_id=False,
            continue_last_task=False,
            auto_connect_arg_parser=False,
            auto_connect_frameworks=False,
            auto_resource_monitoring=False,
            auto_connect_streams=False,
        )

    def record(self, step: StepRecord) -> None:
        if self.task is None:
            return
        if step.kind == "combination":
            self._combos.append(step)
            return
        logger = self.task.get_logger()
        if step.kind == "trial":
            params = _flat(step.params)
            row = {"trial": step.number, "status": step.status, **params, **step.metrics}
            self._trials.append(row)
            for metric, value in step.metrics.items():
                title, series = _group(metric)
                logger.report_scalar(f"HPO {title}", series, float(value), step.number or 0)
        else:
            prefix = "Args" if step.script else "General"
            self.task.update_parameters({f"{prefix}/{k}": v for k, v in _flat(step.params).items()})
            if step.kind != "evaluate":  # the evaluation's metrics are the run's own, below
                for metric, value in step.metrics.items():
                    title, series = _group(metric)
                    logger.report_scalar(f"{step.kind} {title}", series, float(value), 0)
            for name, path in step.artifacts.items():
                self.task.upload_artifact(name, artifact_object=str(path))
        if self.steps == "all":
            with _quiet():
                self._child(step)

    def _child(self, step: StepRecord) -> None:
        """One ClearML task for a step, child of the run's task (online only)."""
        from clearml import Task

        child = Task.create(
            project_name=self.project,
            task_name=f"{self.context.name if self.context else ''} {step.name}".strip(),
            task_type=self.task_type,
        )
        child.set_parent(self.task)
        child.add_tags([*self.tags, step.kind])
        prefix = "Args" if step.script else "General"
        child.set_parameters({f"{prefix}/{k}": v for k, v in _flat(step.params).items()})
        child.mark_started(force=True)
        logger = child.get_logger()
        for point in step.intermediate:
            for metric, value in point.items():
                if metric != "step" and isinstance(value, (int, float)):
                    title, series = _group(metric)
                    logger.report_scalar(title, series, float(value), int(point.get("step", 0)))
        for metric, value in step.metrics.items():
            title, series = _group(metric)
            logger.report_scalar(title, series, float(value), 0)
        for name, path in step.artifacts.items():
            child.upload_artifact(name, artifact_object=str(path))
        child.flush(wait_for_uploads=True)
        if step.status in ("ok", "warning"):
            child.mark_completed()
        else:
            child.mark_failed(status_reason=step.reason or step.status, force=True)

    def run_finished(
        self,
        status: str,
        metrics: dict[str, float],
        artifacts: dict[str, Path],
        message: str = "",
    ) -> None:
        if self.task is None:
            return
        logger = self.task.get_logger()
        if self._trials:
            logger.report_table("HPO", "trials", iteration=0, table_plot=_table(self._trials))
        if self._combos:
            self._report_combinations(logger)
        for metric, value in metrics.items():
            title, series = _group(metric)
            logger.report_scalar(title, series, float(value), 0)
        for name, path in artifacts.items():
            if Path(path).exists():
                self.task.upload_artifact(name, artifact_object=str(path))
        if status == "gate-failed":
            self.task.add_tags(["gate-failed"])
        self.task.flush(wait_for_uploads=True)
        if status == "failed":
            self.task.mark_failed(status_reason=message[:250] or "failed", force=True)
        self._close_task()

    def _report_combinations(self, logger: Any) -> None:
        """Sweeps: one table of every combination; tasks only for the ones asked for."""
        rows = [
            {"index": c.number, "status": c.status, **_flat(c.params), **c.metrics}
            for c in self._combos
        ]
        logger.report_table("Sweep", "combinations", iteration=0, table_plot=_table(rows))
        chosen: list[StepRecord] = []
        if self.combinations == "all":
            chosen = self._combos
        elif self.combinations == "sample":
            stride = max(len(self._combos) / self.sample, 1.0)
            chosen = [self._combos[int(i * stride)] for i in range(min(self.sample, len(rows)))]
        for combo in chosen:
            with _quiet():
                self._child(combo)

    def _close_task(self) -> None:
        task, self.task = self.task, None
        try:
            if task is not None:
                with _quiet():
                    task.close()
        finally:
            while self._restore:
                self._restore.pop()()

    def close(self) -> None:
        self._close_task()


# ------------------------------------------------------------------ reading back


class TrackedTask:
    """A ClearML task in the shape `compare.rank` takes (id, name, state, params, metrics)."""

    def __init__(self, id: str, name: str, state: str, params: dict, metrics: dict):
        self.id, self.name, self.state, self.params, self.metrics = id, name, state, params, metrics


def flatten_scalars(last: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """``get_last_scalar_metrics()`` as ``{"Group/Metric": last value}``."""
    flat: dict[str, float] = {}
    for title, series in (last or {}).items():
        for name, values in series.items():
            if isinstance(values, dict) and isinstance(values.get("last"), (int, float)):
                key = name if title == name else f"{title}/{name}"
                flat[key] = float(values["last"])
    return flat


def read_tasks(
    project: str, tags: list[str] | None = None, status: list[str] | None = None
) -> list[TrackedTask]:
    """ClearML tasks of a project (and its sub-projects), filtered by tags and status."""
    if importlib.util.find_spec("clearml") is None:
        raise ExpflowError(MISSING.replace("ClearML tracking", "compare --source clearml"))
    from clearml import Task

    try:
        found = Task.get_tasks(
            project_name=project,
            tags=tags or None,
            allow_archived=False,
            task_filter={"status": status} if status else None,
        )
    except Exception as exc:  # noqa: BLE001 - any SDK/network error is one line for the user
        raise ExpflowError(f"cannot read ClearML tasks of project {project!r}: {exc}") from None
    tasks = []
    for task in found:
        if getattr(task.data, "parent", None):
            continue  # a step's own task (steps: all); its run's task is the experiment
        metrics = flatten_scalars(task.get_last_scalar_metrics())
        params = {k: v for k, v in (task.get_parameters() or {}).items()}
        tasks.append(TrackedTask(task.id, task.name, str(task.get_status()), params, metrics))
    return tasks
