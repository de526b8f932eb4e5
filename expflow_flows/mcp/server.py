"""``expflow mcp``: a Model Context Protocol server on stdio for research agents.

An agent (any MCP client) lists, shows, compares and audits the ledger's
experiments, reads sweep results and reports, starts deployment runs, follows
them, cancels and retries them. Every act is a function of
:mod:`expflow_flows.actions`, the same one the ``expflow`` CLI calls, so an
agent's cancel or retry ends in the same ledger state, Prefect state and audit
entry as a person's at the terminal; this module only types the arguments and
results.

Three rules shape this module:

* **Only JSON-RPC on stdout.** Before the server starts (and long before a tool
  imports Prefect), the real stdout (fd 1) is kept aside for the protocol and fd 1
  is pointed at stderr, so a stray ``print``, a rich console, Prefect's logging or
  a child process cannot corrupt the channel. stdin is kept aside the same way, so a child
  process cannot swallow requests.
* **Errors are tool errors, never a crash.** A mistake (unknown id, bad gate,
  wrong PIN) comes back as an ``isError`` result with one line; a bug in a tool
  does too, with its traceback on stderr, and the server keeps answering.
* **The PIN guards agents as it guards people.** Cancelling needs the PIN as a
  tool argument on every call; ``EXPFLOW_PIN`` in the server's environment is
  ignored and there is no ``force``. Refusals are audited and count toward the
  lockout; the PIN never appears in a result or a log.

This module imports the ``mcp`` SDK at the top: only ``expflow mcp`` loads it,
after checking that the extra is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.stdio import stdio_server
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from expflow_flows import actions
from expflow_flows.actions import one_line
from expflow_flows.errors import ExpflowError, GuardRefused
from expflow_flows.home import expflow_home, runs_root

log = logging.getLogger("expflow.mcp")

T = TypeVar("T")
StateName = Literal[
    "DRAFT", "ENQUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCEL_PENDING", "CANCELLED"
]
COST_METRIC = "llm_cost_usd"
MAX_REPORT_CHARS = 200_000
# Bytes read from a report file at most: an HTML dashboard can be megabytes of script.
_MAX_REPORT_BYTES = 8 << 20
REPORT_FORMATS = {
    ".md": "markdown",
    ".html": "html",
    ".htm": "html",
    ".json": "json",
    ".csv": "csv",
    ".txt": "text",
    ".log": "text",
    ".yaml": "yaml",
    ".yml": "yaml",
}
# Readable by suffix but never by an agent: the PIN hash would allow guessing offline.
_NEVER_READ = frozenset({"pin.json", "pin_state.json"})

INSTRUCTIONS = (
    "expflow: ML experiments run by Prefect. Experiments live in a ledger (ids are digit "
    "strings; a unique prefix of 6+ digits works). Compare with gates 'metric:op:value' "
    "(ops lt le gt ge eq ne). Deployments are named 'flow/deployment'. Cancelling a flow run "
    "needs the user's PIN as the `pin` argument; ask the user for it, never guess: wrong PINs "
    "lock the guard. A failed or cancelled deployment run can be retried (same flow run)."
)


# --- results --------------------------------------------------------------------------


class ExperimentRow(BaseModel):
    """One ledger experiment."""

    id: str
    name: str
    kind: str
    state: str
    trainable: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    tags: list[str]
    flow_run_id: str | None
    run_dir: str | None
    created_at: str
    updated_at: str
    message: str


class ExperimentList(BaseModel):
    """Experiments, newest first."""

    count: int
    experiments: list[ExperimentRow]


class ExperimentDetail(ExperimentRow):
    """An experiment with its state history (oldest first)."""

    history: list[dict[str, Any]]


class RankingResult(BaseModel):
    """Experiments ranked by a metric, best first, and those left out with why."""

    metric: str
    direction: str
    ranked: int = Field(description="How many experiments passed every gate and have the metric.")
    rows: list[dict[str, Any]]
    excluded: list[dict[str, str]]


class SweepInfo(BaseModel):
    """A sweep's folder and its rows by status."""

    name: str
    folder: str
    combinations: int | None
    counts: dict[str, int]


class SweepList(BaseModel):
    """The sweeps under the runs folder."""

    sweeps: list[SweepInfo]


class SweepResultsOut(BaseModel):
    """A sweep's results: counts, columns, and the best rows or per-group statistics."""

    name: str
    folder: str
    combinations: int | None
    counts: dict[str, int]
    params: list[str]
    metrics: list[str]
    best: list[dict[str, Any]] | None = None
    summary: list[dict[str, Any]] | None = None
    dashboard: str | None = None
    status_page: str | None = None


class ReportFile(BaseModel):
    """A report file that read_report can open."""

    path: str
    kind: str
    size_bytes: int
    modified: str


class ReportList(BaseModel):
    """Report files, newest first."""

    reports: list[ReportFile]


class ReportText(BaseModel):
    """A report's text (HTML turned into plain text), cut at max_chars."""

    path: str
    format: str
    size_bytes: int
    truncated: bool
    text: str


class DeploymentInfo(BaseModel):
    """A deployment an agent can start."""

    name: str = Field(description="'flow/deployment', the name start_deployment_run takes.")
    description: str
    work_pool: str | None
    parameters: dict[str, Any]
    schedules: list[str]
    paused: bool


class DeploymentList(BaseModel):
    """The Prefect server's deployments."""

    deployments: list[DeploymentInfo]


class StartedRun(BaseModel):
    """A flow run created from a deployment."""

    flow_run_id: str
    flow_run_name: str
    deployment: str
    state: str
    parameters: dict[str, Any]
    ui_url: str | None


class FlowRunStatus(BaseModel):
    """Where a flow run stands, with the tail of its logs."""

    flow_run_id: str
    name: str
    flow: str | None
    deployment: str | None
    state: str = Field(description="Prefect's state type: SCHEDULED, RUNNING, COMPLETED, ...")
    state_name: str
    message: str | None
    expected_start_time: str | None
    start_time: str | None
    end_time: str | None
    parameters: dict[str, Any]
    experiment_id: str | None = Field(description="The ledger experiment tracking this run.")
    logs: list[str]
    ui_url: str | None


class RunChange(BaseModel):
    """Where a flow run stands after a cancel or retry request, in Prefect and in the ledger."""

    flow_run_id: str
    state: str = Field(description="Prefect's state type after the request.")
    experiment_id: str | None
    ledger_state: str | None = Field(
        description="The state of the ledger experiment tracking the run, if any."
    )
    message: str


class AuditResult(BaseModel):
    """An experiment's audit: verdict, counts, every check, and the same as Markdown."""

    subject: str
    passed: bool
    summary: str
    counts: dict[str, int]
    checks: list[dict[str, Any]]
    markdown: str


class ExperimentCost(BaseModel):
    """An experiment's LLM spend, read from its ledger metrics."""

    id: str
    name: str
    state: str
    llm_cost_usd: float | None
    llm_metrics: dict[str, Any] = Field(description="Every metric whose name starts with 'llm_'.")


class TraceCosts(BaseModel):
    """LLM costs recorded on ledger experiments."""

    metric: str
    total_usd: float
    with_cost: int
    without_cost: int
    by_name: dict[str, float]
    experiments: list[ExperimentCost]


# --- helpers --------------------------------------------------------------------------


def _iso(value: Any) -> str | None:
    return (
        None if value is None else str(value.isoformat() if hasattr(value, "isoformat") else value)
    )


def _ledger() -> Any:
    from expflow_flows.governance.ledger import Ledger

    return Ledger()


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _allowed_roots() -> list[Path]:
    """The expflow home, and the runs folder where EXPFLOW_RUNS_ROOT puts it elsewhere."""
    roots = [expflow_home().resolve()]
    runs = runs_root().expanduser()
    if runs.exists() and not _inside(runs.resolve(), roots):
        roots.append(runs.resolve())
    return roots


class _TextOfHtml(HTMLParser):
    """The readable text of an HTML report: scripts and styles dropped, rows kept as lines."""

    _BLOCKS = frozenset(
        {"p", "div", "tr", "li", "br", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return "\n".join(line for line in lines if line)


def _html_text(raw: str) -> str:
    parser = _TextOfHtml()
    parser.feed(raw)
    parser.close()
    return parser.text()


# --- tools ----------------------------------------------------------------------------

Limit = Annotated[int, Field(ge=1, le=1000, description="At most this many rows.")]
ExperimentId = Annotated[
    str, Field(min_length=1, description="Ledger experiment id, or a unique prefix of 6+ digits.")
]
RunRef = Annotated[
    str,
    Field(
        min_length=1,
        description="A Prefect flow run id (UUID), or a ledger experiment id whose flow run is meant.",
    ),
]


def list_experiments(
    state: Annotated[StateName | None, Field(description="Only this ledger state.")] = None,
    name: Annotated[str | None, Field(description="Only this experiment name.")] = None,
    limit: Limit = 50,
) -> ExperimentList:
    """List experiments in the ledger, newest first (what `expflow runs list` shows)."""
    rows = actions.list_experiments(state, name, limit)
    return ExperimentList(count=len(rows), experiments=[ExperimentRow(**r.as_dict()) for r in rows])


def show_experiment(experiment_id: ExperimentId) -> ExperimentDetail:
    """Everything the ledger knows about one experiment: params, metrics, run folder, history."""
    return ExperimentDetail(**actions.experiment_detail(experiment_id))


def compare_experiments(
    metric: Annotated[
        str, Field(min_length=1, description="Metric to rank by, e.g. nrmse or PDE/nrmse.")
    ],
    gates: Annotated[
        list[str] | None,
        Field(description="Keep only experiments passing every gate 'metric:op:value'."),
    ] = None,
    direction: Annotated[
        Literal["minimize", "maximize"] | None,
        Field(description="Sort order; default: the metric's direction in the registry."),
    ] = None,
    state: Annotated[
        StateName | None, Field(description="Only this ledger state; null for every state.")
    ] = "COMPLETED",
    name: Annotated[str | None, Field(description="Only this experiment name.")] = None,
    limit: Annotated[int, Field(ge=1, le=500, description="Ranked rows to return.")] = 20,
) -> RankingResult:
    """Rank experiments by a metric, best first, keeping only those that pass the gates.

    Gates fail closed: an experiment without a gated metric is left out, with why.
    The same ranking as `expflow compare`.
    """
    ranking = actions.compare(
        metric, gates=gates or [], direction=direction, state=state, name=name
    )
    return RankingResult(
        metric=ranking.metric,
        direction=ranking.direction,
        ranked=len(ranking.rows),
        rows=ranking.rows[:limit],
        excluded=ranking.excluded,
    )


def list_sweeps() -> SweepList:
    """The sweeps under the runs folder, with their rows by status (running or finished)."""
    return SweepList(sweeps=[SweepInfo(**actions.sweep_info(f)) for f in actions.sweep_folders()])


def sweep_results(
    name: Annotated[str, Field(min_length=1, description="Sweep name (its folder).")],
    metric: Annotated[
        str | None, Field(description="Rank rows by this metric (without 'metric:').")
    ] = None,
    maximize: Annotated[bool, Field(description="Higher is better for metric.")] = False,
    top: Annotated[int, Field(ge=1, le=100, description="How many best rows.")] = 10,
    by: Annotated[
        list[str] | None,
        Field(
            description="Instead of best rows: statistics of metric per group of these params "
            "(mean, std, 95% CI across seeds)."
        ),
    ] = None,
) -> SweepResultsOut:
    """Read a sweep's results: counts by status, and the best rows or per-group statistics.

    The same numbers as `expflow sweep results`; only ok/warning rows with a finite
    value are ranked.
    """
    from expflow_flows.sweep.results import SweepResults

    folder = actions.sweep_folder(name.strip())
    info = SweepInfo(**actions.sweep_info(folder))
    results = SweepResults.load(folder)
    out = SweepResultsOut(
        **info.model_dump(),
        params=results.params,
        metrics=results.metrics,
        dashboard=str(folder / "dashboard.html") if (folder / "dashboard.html").exists() else None,
        status_page=str(folder / "status.html") if (folder / "status.html").exists() else None,
    )
    if by and not metric:
        raise ExpflowError("by needs a metric to summarise; give metric as well")
    if metric and by:
        out.summary = results.summary(metric, by=list(by))
    elif metric:
        out.best = results.best(metric, maximize=maximize, n=top)
    return out


def _report_kind(path: Path) -> str | None:
    name = path.name
    if path.parent.name == "audits" and path.suffix in (".md", ".html"):
        return "audit"
    return {
        "dashboard.html": "sweep-dashboard",
        "status.html": "sweep-status",
        "results.csv": "sweep-results",
        "summary.json": "pipeline-summary",
    }.get(name) or ("hpo-report" if name.startswith("report-") and name.endswith(".html") else None)


def list_reports(limit: Limit = 50) -> ReportList:
    """Report files read_report can open, newest first: audits, sweep pages, pipeline summaries."""
    candidates: list[Path] = []
    audits = expflow_home() / "audits"
    if audits.is_dir():
        candidates += [p for p in audits.iterdir() if p.suffix in (".md", ".html")]
    root = runs_root()
    if root.is_dir():
        for folder in root.iterdir():
            if not folder.is_dir():
                continue
            candidates += [
                folder / f
                for f in ("dashboard.html", "status.html", "results.csv")
                if (folder / f).is_file()
            ]
            candidates += list(folder.glob("*/summary.json")) + list(folder.glob("*/report-*.html"))
    files = []
    for p in candidates:
        kind = _report_kind(p)
        if kind is None:
            continue
        st = p.stat()
        files.append((st.st_mtime, p, kind, st.st_size))
    files.sort(key=lambda f: f[0], reverse=True)
    return ReportList(
        reports=[
            ReportFile(
                path=str(p),
                kind=kind,
                size_bytes=size,
                modified=datetime.fromtimestamp(mtime, UTC).isoformat(timespec="seconds"),
            )
            for mtime, p, kind, size in files[:limit]
        ]
    )


def _report_path(path: str | None, experiment_id: str | None) -> Path:
    if bool(path) == bool(experiment_id):
        raise ExpflowError("give exactly one of path or experiment_id")
    if experiment_id:
        exp = _ledger().get(experiment_id.strip())
        if not exp.run_dir:
            raise ExpflowError(f"experiment {exp.id} ({exp.name}) has no run folder")
        summary = Path(exp.run_dir) / "summary.json"
        if not summary.is_file():
            raise ExpflowError(
                f"experiment {exp.id} ({exp.name}) has no summary.json in {exp.run_dir}; "
                "list_reports names the reports there are"
            )
        return summary
    assert path is not None
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = expflow_home() / candidate
    roots = _allowed_roots()
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        # Say nothing about whether a file exists outside the home.
        if not _inside(candidate.resolve(), roots):
            raise ExpflowError(_outside(path, roots)) from None
        raise ExpflowError(
            f"no report at {path!r}; list_reports names the reports there are"
        ) from None
    if not _inside(resolved, roots):
        raise ExpflowError(_outside(path, roots))
    return resolved


def _outside(path: str, roots: list[Path]) -> str:
    return (
        f"{path!r} is outside the expflow home; read_report opens files under "
        f"{' or '.join(str(r) for r in roots)} only"
    )


def _scrubbed(text: str, fmt: str) -> str:
    """JSON or YAML with the values of secret-looking keys masked, as packages do."""
    import yaml

    from expflow_flows.secrets import scrub

    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        return text  # cut short or not what its suffix says: shown as it is
    if not isinstance(data, (dict, list)):
        return text
    if fmt == "json":
        return json.dumps(scrub(data), indent=2, default=str)
    return yaml.safe_dump(scrub(data), sort_keys=False)


def read_report(
    path: Annotated[
        str | None,
        Field(description="A report file under the expflow home (absolute, or relative to it)."),
    ] = None,
    experiment_id: Annotated[
        str | None, Field(description="Instead of path: this experiment's pipeline summary.")
    ] = None,
    max_chars: Annotated[
        int, Field(ge=100, le=MAX_REPORT_CHARS, description="Cut the text at this many characters.")
    ] = 20_000,
) -> ReportText:
    """The text of a report: Markdown, JSON, CSV or logs as they are, HTML as plain text.

    Only files under the expflow home (or the runs folder) with a report suffix
    (.md .html .json .csv .txt .log .yaml) can be read; the PIN files never. Values
    of secret-looking keys in JSON and YAML (key, token, password, ...) are masked.
    """
    target = _report_path(path, experiment_id)
    fmt = REPORT_FORMATS.get(target.suffix.lower())
    if target.name in _NEVER_READ or target.name.startswith(".") or fmt is None:
        raise ExpflowError(
            f"{target.name!r} is not a report read_report opens; it reads "
            f"{' '.join(sorted(REPORT_FORMATS))} files"
        )
    if not target.is_file():
        raise ExpflowError(f"{str(target)!r} is not a file")
    size = target.stat().st_size
    with target.open("rb") as fh:
        raw = fh.read(_MAX_REPORT_BYTES)
    text = raw.decode("utf-8", errors="replace")
    if fmt == "html":
        text, fmt = _html_text(text), "html-as-text"
    elif fmt in ("json", "yaml"):
        text = _scrubbed(text, fmt)
    truncated = len(text) > max_chars or size > _MAX_REPORT_BYTES
    return ReportText(
        path=str(target), format=fmt, size_bytes=size, truncated=truncated, text=text[:max_chars]
    )


def list_deployments() -> DeploymentList:
    """The deployments on the Prefect server, named 'flow/deployment' as start_deployment_run takes them."""
    return DeploymentList(deployments=[DeploymentInfo(**d) for d in actions.list_deployments()])


def start_deployment_run(
    deployment: Annotated[
        str,
        Field(
            pattern=r"^[^/]+/[^/]+$",
            description="'flow/deployment', e.g. 'pipeline/pde-advection' or "
            "'sweep/advection-sweep-nightly' (list_deployments names them).",
        ),
    ],
    parameters: Annotated[
        dict[str, Any] | None,
        Field(
            description="Parameters overriding the deployment's; the pipeline's and the "
            "sweep's take 'settings', e.g. {'settings': {'hpo': {'n_trials': 20}}} "
            "(list_deployments shows each deployment's parameters)."
        ),
    ] = None,
) -> StartedRun:
    """Start a run of a deployment (a pipeline, a sweep, an audit); returns its flow run id.

    The run is scheduled now and a worker of the deployment's pool picks it up; the
    server checks the parameters against the flow's signature first. Follow it with
    flow_run_status.
    """
    started = actions.start_deployment_run(deployment, parameters)
    return StartedRun(**dataclasses.asdict(started))


def flow_run_status(
    flow_run: RunRef,
    log_lines: Annotated[
        int, Field(ge=0, le=500, description="How many of the newest log lines to return.")
    ] = 20,
) -> FlowRunStatus:
    """A flow run's state, message, times, parameters and the tail of its logs."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    from expflow_flows.secrets import scrub

    flow_run_id, exp = actions.resolve_run(flow_run)
    with actions.prefect_client() as (client, api):
        run = actions.read_flow_run(client, flow_run_id, api)
        flow = client.read_flow(run.flow_id).name if run.flow_id else None
        dep = client.read_deployment(run.deployment_id).name if run.deployment_id else None
        logs = []
        if log_lines:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                limit=log_lines,
                sort=LogSort.TIMESTAMP_DESC,
            )
        ui = actions.ui_url(flow_run_id)
    state = run.state
    return FlowRunStatus(
        flow_run_id=flow_run_id,
        name=run.name,
        flow=flow,
        deployment=f"{flow}/{dep}" if dep else None,
        state=state.type.value if state else "UNKNOWN",
        state_name=state.name if state else "",
        message=state.message if state else None,
        expected_start_time=_iso(run.expected_start_time),
        start_time=_iso(run.start_time),
        end_time=_iso(run.end_time),
        parameters=scrub(dict(run.parameters or {})),
        experiment_id=exp.id if exp else None,
        logs=[
            f"{_iso(entry.timestamp)} {logging.getLevelName(entry.level)} {entry.message}"
            for entry in reversed(logs)
        ],
        ui_url=ui,
    )


def cancel_flow_run(
    flow_run: RunRef,
    pin: Annotated[
        str | None,
        Field(
            description="The PIN, from the user; needed whenever a PIN is set. Wrong PINs "
            "count toward a lockout.",
            json_schema_extra={"writeOnly": True},
        ),
    ] = None,
    wait_s: Annotated[
        float, Field(ge=0, le=120, description="Seconds to wait for Prefect to confirm.")
    ] = 30,
) -> RunChange:
    """Cancel a flow run through the Prefect API; PIN-guarded like `expflow runs cancel`.

    Every attempt, allowed or refused, is written to the audit log; the PIN is never
    echoed. A ledger experiment tracking the run moves to CANCELLED with it.
    """
    try:
        # interactive=False and no force: an agent cannot be prompted or skip the PIN.
        outcome = actions.cancel(
            flow_run, pin=pin or None, interactive=False, wait_s=wait_s, via="mcp"
        )
    except GuardRefused as exc:
        # The guard's own advice (--pin, EXPFLOW_PIN, --force) does not apply here.
        if pin or "none was given" not in str(exc):
            raise
        raise ExpflowError(
            "cancel needs the PIN: ask the user for it and pass it as the `pin` argument"
        ) from None
    message = outcome.message if outcome.done else f"{outcome.message} (ask flow_run_status later)"
    return RunChange(
        flow_run_id=outcome.flow_run_id,
        state=outcome.state,
        experiment_id=outcome.experiment_id,
        ledger_state=outcome.ledger_state,
        message=message,
    )


def retry_flow_run(flow_run: RunRef) -> RunChange:
    """Schedule a failed or cancelled deployment run again, like `expflow runs retry`.

    The same flow run, with the same parameters, as Prefect's Retry does; a worker of
    the deployment's pool picks it up. Its ledger experiment goes back to ENQUEUED.
    """
    outcome = actions.retry(flow_run, via="mcp")
    return RunChange(
        flow_run_id=outcome.flow_run_id,
        state=outcome.state,
        experiment_id=outcome.experiment_id,
        ledger_state=outcome.ledger_state,
        message=outcome.message,
    )


def audit_experiment(experiment_id: ExperimentId) -> AuditResult:
    """Audit one experiment against the competition rules, like `expflow audit validate`.

    Checks: primary score reported, registry thresholds met, required params valid,
    submission bundle complete with valid checksums. Rules: <home>/audit.yaml.
    """
    report = actions.audit_experiment(experiment_id)
    data = report.to_dict()
    return AuditResult(
        subject=data["subject"],
        passed=data["passed"],
        summary=report.summary(),
        counts=data["counts"],
        checks=data["checks"],
        markdown=report.to_markdown(),
    )


def trace_costs(
    experiment_id: Annotated[
        str | None, Field(description="Only this experiment; default: every experiment.")
    ] = None,
    name: Annotated[str | None, Field(description="Only experiments of this name.")] = None,
    state: Annotated[StateName | None, Field(description="Only this ledger state.")] = None,
) -> TraceCosts:
    """LLM costs of experiments, read from the `llm_cost_usd` metric on ledger rows.

    Langfuse tracking records that metric when a run's LLM calls are traced; reading
    it from the ledger means this works without Langfuse installed or reachable.
    Experiments without the metric are counted, not listed.
    """
    import math

    if experiment_id:
        rows = [_ledger().get(experiment_id.strip())]
    else:
        rows = _ledger().list(state=state, name=name or None, limit=None)
    out: list[ExperimentCost] = []
    by_name: dict[str, float] = {}
    total = 0.0
    without = 0
    for exp in rows:
        llm = {k: v for k, v in (exp.metrics or {}).items() if k.startswith("llm_")}
        cost = llm.get(COST_METRIC)
        usable = (
            isinstance(cost, (int, float)) and not isinstance(cost, bool) and math.isfinite(cost)
        )
        if not usable:
            without += 1
            if not experiment_id:
                continue
        else:
            total += float(cost)
            by_name[exp.name] = by_name.get(exp.name, 0.0) + float(cost)
        out.append(
            ExperimentCost(
                id=exp.id,
                name=exp.name,
                state=exp.state,
                llm_cost_usd=float(cost) if usable else None,
                llm_metrics=llm,
            )
        )
    return TraceCosts(
        metric=COST_METRIC,
        total_usd=total,
        with_cost=len(rows) - without,
        without_cost=without,
        by_name=by_name,
        experiments=out,
    )


# --- the server -------------------------------------------------------------------------

_READ = ToolAnnotations(readOnlyHint=True, openWorldHint=False)
TOOLS: tuple[tuple[Callable[..., Any], ToolAnnotations], ...] = (
    (list_experiments, _READ),
    (show_experiment, _READ),
    (compare_experiments, _READ),
    (list_sweeps, _READ),
    (sweep_results, _READ),
    (list_reports, _READ),
    (read_report, _READ),
    (audit_experiment, _READ),
    (trace_costs, _READ),
    (list_deployments, _READ),
    (flow_run_status, _READ),
    (start_deployment_run, ToolAnnotations(readOnlyHint=False, destructiveHint=False)),
    (retry_flow_run, ToolAnnotations(readOnlyHint=False, destructiveHint=False)),
    (cancel_flow_run, ToolAnnotations(readOnlyHint=False, destructiveHint=True)),
)


def _offloaded(fn: Callable[..., T]) -> Callable[..., Any]:
    """``fn`` as an async tool: run in a worker thread, user errors made tool errors.

    Tool bodies block (SQLite, the Prefect API, a cancel that waits); in a thread
    they leave the server free to answer other requests meanwhile.
    """

    @functools.wraps(fn)
    async def tool(**kwargs: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, **kwargs))
        except ExpflowError as exc:
            raise ToolError(one_line(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a bug in one tool must not end the server
            log.exception("tool %s failed", fn.__name__)
            raise ToolError(
                f"internal error ({type(exc).__name__}: {one_line(exc, 300)}); "
                "the server's stderr has the traceback"
            ) from None

    return tool


class _Server(FastMCP):
    """FastMCP with bad arguments reported in one line that names them."""

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        try:
            return await super().call_tool(name, arguments)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValidationError):
                # Field and reason only: never the value given, which may be a PIN.
                reasons = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                    for err in cause.errors(include_input=False, include_url=False)
                )
                raise ToolError(f"Error executing tool {name}: bad arguments: {reasons}") from None
            raise


def build_server() -> FastMCP:
    """The MCP server with every expflow tool registered (not yet serving)."""
    app = _Server("expflow", instructions=INSTRUCTIONS, log_level="WARNING")
    for fn, hints in TOOLS:
        app.add_tool(_offloaded(fn), name=fn.__name__, annotations=hints)
    return app


def _claim_stdio() -> tuple[IO[str], IO[str]]:
    """Keep the real stdin/stdout for JSON-RPC; point fd 0 at /dev/null and fd 1 at stderr."""
    sys.stdout.flush()
    rpc_out = os.dup(1)
    rpc_in = os.dup(0)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    return (
        open(rpc_in, encoding="utf-8", errors="replace", closefd=True),  # noqa: SIM115
        open(rpc_out, "w", encoding="utf-8", closefd=True),  # noqa: SIM115
    )


async def _serve_stdio(app: FastMCP, rpc_in: IO[str], rpc_out: IO[str]) -> None:
    # FastMCP.run_stdio_async always uses sys.stdin/sys.stdout; this is the same with
    # the streams kept aside by _claim_stdio.
    async with stdio_server(anyio.wrap_file(rpc_in), anyio.wrap_file(rpc_out)) as (read, write):
        lowlevel = app._mcp_server
        await lowlevel.run(read, write, lowlevel.create_initialization_options())


def serve() -> None:
    """Serve the tools on stdio until the client closes stdin."""
    rpc_in, rpc_out = _claim_stdio()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="expflow mcp %(levelname)s %(name)s: %(message)s",
    )
    if os.environ.pop("EXPFLOW_PIN", None):
        log.warning("EXPFLOW_PIN is ignored: an agent passes the PIN with each guarded call")
    app = build_server()
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_serve_stdio, app, rpc_in, rpc_out)


__all__ = ["TOOLS", "build_server", "serve"]
