"""What a person or an agent can do to experiments and flow runs: one implementation for both.

The ``expflow`` CLI and the MCP server call these functions and keep only argument
parsing and presentation, so a start, cancel, retry or delete ends in the same
ledger state, Prefect state and audit-log entry whichever front end asked.

* Prefect is read before anything changes: an unknown or finished run, or an
  unreachable API, changes nothing and asks for no PIN.
* Every irreversible act goes through the PIN guard, which audits every outcome;
  the target names the front end (``via cli`` / ``via mcp``).
* The ledger moves only by the lifecycle's own events, after Prefect accepted the
  change, so a row never claims what Prefect did not do.

Prefect is imported inside the functions that talk to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from expflow_flows.errors import ExpflowError
from expflow_flows.governance import fsm
from expflow_flows.governance import pin as pin_guard
from expflow_flows.governance.ledger import Experiment, Ledger
from expflow_flows.home import runs_root

log = logging.getLogger(__name__)

Via = Literal["cli", "mcp"]
"""The front end that asked: written into ledger messages and audit-log targets."""


def one_line(text: object, limit: int = 600) -> str:
    """``text`` on one line, cut at ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- Prefect --------------------------------------------------------------------------


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Point Prefect at a real API: the configured one, else a local ``expflow server``.

    Without either, Prefect would start a throwaway ephemeral server, where a run
    started or cancelled here would not be the user's; refuse instead.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from expflow_flows import server

    url = get_current_settings().api.url
    if url:
        yield url
        return
    if server.is_healthy():
        with temporary_settings(updates={PREFECT_API_URL: server.api_url()}):
            yield server.api_url()
        return
    raise ExpflowError(
        "no Prefect API to talk to: set PREFECT_API_URL, "
        "or start a local server with `expflow server start`"
    )


@contextlib.contextmanager
def prefect_errors(api: str) -> Iterator[None]:
    """Prefect's exceptions as one line that says what went wrong."""
    import httpx
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        yield
    except ObjectNotFound:
        raise ExpflowError(f"not found on the Prefect server {api}") from None
    except PrefectHTTPStatusError as exc:
        try:
            detail = exc.response.json().get("detail", exc.response.text)
        except ValueError:
            detail = exc.response.text
        raise ExpflowError(
            f"the Prefect server refused: {one_line(detail)} (HTTP {exc.response.status_code})"
        ) from None
    except httpx.HTTPError as exc:
        raise ExpflowError(
            f"the Prefect API at {api} does not answer ({type(exc).__name__}: {one_line(exc)})"
        ) from None


@contextlib.contextmanager
def prefect_client() -> Iterator[tuple[Any, str]]:
    """A synchronous Prefect client on :func:`prefect_api`, its errors as one line; and the API."""
    from prefect.client.orchestration import get_client

    with prefect_api() as api, prefect_errors(api), get_client(sync_client=True) as client:
        yield client, api


def ui_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI, when the UI's address is known."""
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def read_flow_run(client: Any, flow_run_id: str, api: str) -> Any:
    """The flow run from Prefect; an unknown id is one line naming it."""
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_flow_run(uuid.UUID(flow_run_id))
    except ObjectNotFound:
        raise ExpflowError(f"no flow run {flow_run_id} on the Prefect server {api}") from None


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def resolve_run(ref: str, verb: str = "follow") -> tuple[str, Experiment | None]:
    """A flow run id from a flow run id or a ledger experiment id, and that experiment (or None)."""
    ref = ref.strip()
    if _is_uuid(ref):
        flow_run_id = str(uuid.UUID(ref))
        return flow_run_id, Ledger().find_by_flow_run(flow_run_id)
    exp = Ledger().get(ref)
    if not exp.flow_run_id:
        raise ExpflowError(f"experiment {exp.id} ({exp.name}) has no Prefect flow run to {verb}")
    return exp.flow_run_id, exp


def _subject(flow_run_id: str, exp: Experiment | None) -> str:
    return f"{exp.id} ({exp.name}), flow run {flow_run_id}" if exp else f"flow run {flow_run_id}"


def _advance(ledger: Ledger, exp_id: str, event: str, message: str) -> None:
    # Only when the lifecycle allows it now: the flow's own state hook may have
    # moved the row already (RUNNING to CANCELLED), and that is the truth.
    with contextlib.suppress(fsm.IllegalTransition):
        ledger.transition(exp_id, event, message=message)


# --- experiments --------------------------------------------------------------------


def list_experiments(
    state: str | None = None, name: str | None = None, limit: int | None = 50
) -> list[Experiment]:
    """Ledger experiments, newest first; a bad state is one line naming the known ones.

    Runs of this host whose process is gone are failed first (and their Prefect flow
    runs marked crashed), so nothing is listed RUNNING that no process runs."""
    reconcile_crashed()
    return Ledger().list(state=state or None, name=name or None, limit=limit)


def reconcile_crashed() -> list[Experiment]:
    """Fail this host's RUNNING experiments whose process died and mark their flow runs
    Crashed; move RUNNING rows whose flow run ended elsewhere (a Slurm node, a ClearML
    agent: Prefect marked it Crashed when its heartbeat stopped, and its own crash hook
    never ran). Returns the experiments moved."""
    ledger = Ledger()
    ended = ledger.reconcile()
    running = [r for r in ledger.list(state="RUNNING", limit=500) if r.flow_run_id]
    if not ended and not running:
        return ended
    try:
        with prefect_client() as (client, api):
            if not _answers(api):
                return ended
            for row in ended:
                if row.flow_run_id:
                    _crash(client, row.flow_run_id, row.message)
            for row in running:
                with contextlib.suppress(ExpflowError):
                    state = read_flow_run(client, row.flow_run_id, api).state
                    target = _LEDGER_STATE.get(state.type.value if state else "")
                    if target:
                        message = f"flow run {state.type.value.lower()}: {state.message or ''}"
                        ended.append(ledger.move_to(row.id, target, message.rstrip(": ")))
    except ExpflowError as exc:  # no API to tell: the ledger is reconciled either way
        log.warning("flow runs not reconciled: %s", exc)
    return ended


# A flow run's final state, as the ledger's.
_LEDGER_STATE = {
    "COMPLETED": fsm.COMPLETED,
    "FAILED": fsm.FAILED,
    "CRASHED": fsm.FAILED,
    "CANCELLED": fsm.CANCELLED,
}


def _answers(api: str) -> bool:
    """Whether the Prefect API answers its health check within 3 s (listing must not wait
    on a client's retries against a server that is down)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=3) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _crash(client: Any, flow_run_id: str, message: str) -> None:
    from prefect.states import Crashed

    with contextlib.suppress(ExpflowError, ValueError):
        run = client.read_flow_run(uuid.UUID(flow_run_id))
        if run.state is None or not run.state.is_final():
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)


def experiment_detail(exp_id: str) -> dict[str, Any]:
    """Everything the ledger knows about one experiment, with its state history."""
    ledger = Ledger()
    exp = ledger.get(exp_id.strip())
    return {**exp.as_dict(), "history": ledger.history(exp.id)}


def compare(
    metric: str,
    *,
    gates: Iterable[str] = (),
    direction: Literal["minimize", "maximize"] | None = None,
    state: str | None = "COMPLETED",
    name: str | None = None,
    source: str = "ledger",
    project: str | None = None,
    tags: Iterable[str] = (),
) -> Any:
    """Rank experiments (ledger rows or ClearML tasks) by ``metric``; gates fail closed."""
    from expflow_flows.metrics.compare import rank
    from expflow_flows.metrics.gates import parse_gates
    from expflow_flows.metrics.registry import load_registry

    parsed = parse_gates(list(gates))
    if source == "ledger":
        rows = Ledger().list(state=state or None, name=name or None, limit=None)
    elif source == "clearml":
        if not project:
            raise ExpflowError("--source clearml needs --project (a ClearML project name)")
        from expflow_flows.integrations.clearml import read_tasks

        rows = read_tasks(project, tags=list(tags))
        rows = [r for r in rows if name is None or r.name == name]
    else:
        raise ExpflowError(f"--source {source!r}: expected ledger or clearml")
    return rank(rows, metric, registry=load_registry(), direction=direction, gates=parsed)


def audit_experiment(exp_id: str, rules: str | None = None) -> Any:
    """Audit one ledger experiment against the competition rules (``<home>/audit.yaml``)."""
    from expflow_flows.governance import audit
    from expflow_flows.metrics.registry import load_registry

    exp = Ledger().get(exp_id.strip())
    return audit.audit_ledger_experiment(exp, load_registry(), audit.AuditRules.load(rules))


def delete_experiment(
    exp_id: str,
    *,
    pin: str | None = None,
    force: bool = False,
    interactive: bool | None = None,
    via: Via = "cli",
) -> Experiment:
    """Delete an experiment's ledger row and history (PIN-guarded); its run folder stays."""
    ledger = Ledger()
    row = ledger.get(exp_id.strip())
    if row.state in (fsm.RUNNING, fsm.ENQUEUED, fsm.CANCEL_PENDING):
        raise ExpflowError(
            f"experiment {row.id} is {row.state}; cancel it first (expflow runs cancel)"
        )
    pin_guard.guard(
        "delete-ledger-entry",
        target=f"{row.id} ({row.name}) via {via}",
        pin=pin,
        force=force,
        interactive=interactive,
    )
    ledger.delete(row.id)
    return row


def delete_study(
    study_name: str,
    storage: str | None = None,
    *,
    pin: str | None = None,
    force: bool = False,
    interactive: bool | None = None,
    via: Via = "cli",
) -> None:
    """Delete an Optuna study and all its trials (PIN-guarded; irreversible)."""
    from expflow_flows.hpo import study as hpo

    store = hpo.open_storage(storage)
    names = [s.study_name for s in store.get_all_studies()]
    if study_name not in names:
        raise ExpflowError(
            f"study {study_name!r} is not in {hpo.resolve_storage(storage)}; "
            f"studies there: {', '.join(sorted(names)) or 'none'}"
        )
    pin_guard.guard(
        "delete-study",
        target=f"{study_name} via {via}",
        pin=pin,
        force=force,
        interactive=interactive,
    )
    store.delete_study(store.get_study_id_from_name(study_name))


# --- deployment runs: start, cancel, retry ---------------------------------------------


@dataclass(frozen=True)
class RunStarted:
    """A flow run created from a deployment."""

    flow_run_id: str
    flow_run_name: str
    deployment: str
    state: str
    parameters: dict[str, Any]
    ui_url: str | None


@dataclass(frozen=True)
class RunChanged:
    """Where a cancelled or retried run stands: in Prefect, and in the ledger when it tracks it."""

    flow_run_id: str
    state: str
    experiment_id: str | None
    ledger_state: str | None
    done: bool
    message: str


def list_deployments() -> list[dict[str, Any]]:
    """The Prefect server's deployments, named 'flow/deployment', sorted by name."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterId

    with prefect_client() as (client, _):
        deployments = client.read_deployments(limit=200)
        ids = list({d.flow_id for d in deployments})
        flows = (
            {
                f.id: f.name
                for f in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=ids)))
            }
            if ids
            else {}
        )
    out = []
    for d in deployments:
        schedules = []
        for s in d.schedules or []:
            sched = s.schedule
            text = getattr(sched, "cron", None) or getattr(sched, "rrule", None) or str(sched)
            tz = getattr(sched, "timezone", None)
            schedules.append(f"{text}{f' ({tz})' if tz else ''}{'' if s.active else ' [inactive]'}")
        out.append(
            {
                "name": f"{flows.get(d.flow_id, '?')}/{d.name}",
                "description": d.description or "",
                "work_pool": d.work_pool_name,
                "parameters": d.parameters or {},
                "schedules": schedules,
                "paused": bool(d.paused),
            }
        )
    return sorted(out, key=lambda d: d["name"])


def start_deployment_run(deployment: str, parameters: dict[str, Any] | None = None) -> RunStarted:
    """Schedule a run of ``flow/deployment`` now; the server checks the parameters first."""
    from prefect.exceptions import ObjectNotFound

    from expflow_flows.secrets import scrub

    flow, _, name = deployment.partition("/")
    if not flow or not name or "/" in name:
        raise ExpflowError(
            f"deployment {deployment!r} is not 'flow/deployment', e.g. 'pipeline/pde-advection'"
        )
    with prefect_client() as (client, api):
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            known = ", ".join(d["name"] for d in list_deployments()) or "none"
            raise ExpflowError(
                f"no deployment named {deployment!r} on {api}; deployments: {known}"
            ) from None
        run = client.create_flow_run_from_deployment(dep.id, parameters=dict(parameters or {}))
        flow_run_id = str(run.id)
        ui = ui_url(flow_run_id)
    return RunStarted(
        flow_run_id=flow_run_id,
        flow_run_name=run.name,
        deployment=deployment,
        state=run.state.type.value if run.state else "UNKNOWN",
        parameters=scrub(dict(run.parameters or {})),
        ui_url=ui,
    )


def _refused(result: Any, what: str, flow_run_id: str) -> None:
    from prefect.client.schemas.responses import SetStateStatus

    if result.status == SetStateStatus.ABORT:
        reason = getattr(result.details, "reason", None) or "no reason given"
        raise ExpflowError(f"Prefect refused to {what} flow run {flow_run_id}: {one_line(reason)}")


def _wait_final(client: Any, flow_run_id: str, wait_s: float) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        state = client.read_flow_run(uuid.UUID(flow_run_id)).state
        if state is None:
            return "UNKNOWN"
        if state.is_final() or time.monotonic() >= deadline:
            return state.type.value
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def cancel(
    ref: str,
    *,
    pin: str | None = None,
    force: bool = False,
    interactive: bool | None = None,
    wait_s: float = 30.0,
    via: Via = "cli",
) -> RunChanged:
    """Cancel a flow run (by its id or its experiment's) as ``prefect flow-run cancel`` does.

    PIN-guarded and audited. The ledger row goes to CANCEL_PENDING once Prefect
    accepted the request and to CANCELLED once Prefect confirms, within ``wait_s``.
    """
    from prefect.states import Cancelling

    flow_run_id, exp = resolve_run(ref, "cancel")
    subject = _subject(flow_run_id, exp)
    ledger = Ledger()
    with prefect_client() as (client, api):
        state = read_flow_run(client, flow_run_id, api).state
        if state is not None and state.is_final():
            raise ExpflowError(
                f"flow run {flow_run_id} is already {state.type.value}; nothing to cancel"
            )
        pin_guard.guard(
            "cancel", target=f"{subject} via {via}", pin=pin, force=force, interactive=interactive
        )
        result = client.set_flow_run_state(
            uuid.UUID(flow_run_id), Cancelling(message=f"cancel requested via expflow {via}")
        )
        _refused(result, "cancel", flow_run_id)
        if exp is not None:
            _advance(ledger, exp.id, "request_cancel", f"cancel requested via {via}")
        final = _wait_final(client, flow_run_id, wait_s)
    ledger_state = None
    if exp is not None:
        if final == "CANCELLED":
            _advance(ledger, exp.id, "cancel", "Prefect confirmed the cancellation")
        elif final in ("FAILED", "CRASHED"):
            _advance(ledger, exp.id, "fail", f"Prefect reports {final} after a cancel request")
        ledger_state = ledger.get(exp.id).state
    done = final == "CANCELLED"
    message = (
        f"cancelled {subject}"
        if done
        else f"cancel requested, but Prefect reports flow run {flow_run_id} as {final} "
        f"after {wait_s:g} s" + (f"; the ledger shows {ledger_state}" if ledger_state else "")
    )
    return RunChanged(flow_run_id, final, exp.id if exp else None, ledger_state, done, message)


def retry(ref: str, *, via: Via = "cli") -> RunChanged:
    """Schedule a finished deployment run again, as Prefect's Retry does (same flow run, same parameters).

    The ledger row (FAILED or CANCELLED) goes back to ENQUEUED; a worker of the
    deployment's pool picks the run up and the flow's hooks take the row from there.
    """
    from prefect.states import Scheduled

    flow_run_id, exp = resolve_run(ref, "retry")
    if exp is not None:
        try:
            fsm.next_state(exp.state, "retry")
        except fsm.IllegalTransition as exc:
            raise fsm.IllegalTransition(f"experiment {exp.id}: {exc}") from None
    ledger = Ledger()
    with prefect_client() as (client, api):
        run = read_flow_run(client, flow_run_id, api)
        if run.deployment_id is None:
            raise ExpflowError(
                f"{_subject(flow_run_id, exp)} did not run from a deployment; run it again with "
                "`expflow pipeline run` (it resumes its study)"
            )
        if run.state is None or not run.state.is_final():
            now = run.state.type.value if run.state else "UNKNOWN"
            raise ExpflowError(
                f"flow run {flow_run_id} is {now}; only a finished run can be retried "
                "(cancel it first)"
            )
        # force, as Prefect's own retry: a finished run leaves its final state only so.
        result = client.set_flow_run_state(
            uuid.UUID(flow_run_id),
            Scheduled(message=f"retry requested via expflow {via}"),
            force=True,
        )
        _refused(result, "retry", flow_run_id)
        state = read_flow_run(client, flow_run_id, api).state
    ledger_state = None
    if exp is not None:
        _advance(ledger, exp.id, "retry", f"retry requested via {via}")
        ledger_state = ledger.get(exp.id).state
    now = state.type.value if state else "UNKNOWN"
    return RunChanged(
        flow_run_id,
        now,
        exp.id if exp else None,
        ledger_state,
        True,
        f"retrying {_subject(flow_run_id, exp)}: Prefect reports {now}",
    )


# --- sweeps -------------------------------------------------------------------------------


def sweep_folders() -> list[Path]:
    """The sweeps under the runs folder (folders holding a results store), by name."""
    root = runs_root()
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob("*/results.sqlite"))


def sweep_folder(name: str) -> Path:
    """The folder of sweep ``name``; a name is one folder under the runs root, never a path."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ExpflowError(
            f"sweep name {name!r} is not valid; expected a folder name such as 'advection-sweep'"
        )
    folder = runs_root() / name
    if not (folder / "results.sqlite").exists():
        known = ", ".join(s.name for s in sweep_folders()) or "none"
        raise ExpflowError(f"no sweep named {name!r} under {runs_root()}; sweeps there: {known}")
    return folder


def sweep_info(folder: Path) -> dict[str, Any]:
    """A sweep's name, folder, planned combinations (None when unknown) and rows by status."""
    from expflow_flows.sweep.store import ResultStore

    counts = ResultStore(folder / "results.sqlite", create=False).counts()
    meta_file = folder / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
    except (OSError, ValueError):
        meta = {}
    combos = meta.get("combinations") if isinstance(meta, dict) else None
    return {
        "name": folder.name,
        "folder": str(folder),
        "combinations": combos if isinstance(combos, int) else None,
        "counts": counts,
    }
