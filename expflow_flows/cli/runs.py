"""``expflow runs …`` and ``expflow compare``: ledger experiments and their flow runs.

Every act (start, cancel, retry, delete, compare) is a function of
:mod:`expflow_flows.actions`, the same one the MCP server's tools call; this
module only reads options and prints.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import typer

from expflow_flows.errors import ExpflowError

runs_app = typer.Typer(
    help="Experiments in the ledger: list, show, start, cancel, retry, delete.",
    no_args_is_help=True,
)

RUN_REF = typer.Argument(
    ..., help="Experiment id (or a unique prefix of 6+ digits), or a Prefect flow run id."
)


def _when(ts: Any) -> str:
    """An ISO timestamp from the ledger, shortened for a table."""
    return str(ts).replace("T", " ")[:19]


def _parameters(items: list[str]) -> dict[str, Any]:
    """``--param name=value`` pairs, values read as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ExpflowError(f"--param {item!r}: expected name=value")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ExpflowError(f"--param {item!r}: the value is not valid YAML") from None
    return out


@runs_app.command("list")
def runs_list(
    state: str | None = typer.Option(None, help="Only this state, e.g. RUNNING."),
    name: str | None = typer.Option(None, help="Only this experiment name."),
    limit: int = typer.Option(50, help="At most this many rows."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List experiments, newest first."""
    from expflow_flows import actions

    rows = actions.list_experiments(state, name, limit)
    if json_out:
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    # The id is what a user copies into `runs show/cancel/retry`: never wrapped. The
    # flow run's UUID is shortened (`runs show` prints it whole); names give way first.
    table = Table(title="Experiments")
    table.add_column("id", no_wrap=True, min_width=18)
    table.add_column("name", overflow="ellipsis", no_wrap=True, ratio=1)
    table.add_column("kind", overflow="ellipsis", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    table.add_column("flow run", no_wrap=True)
    for r in rows:
        flow = (r.flow_run_id or "")[:8]
        table.add_row(r.id, r.name, r.kind, r.state, _when(r.updated_at)[5:16], flow)
    Console().print(table)


@runs_app.command("show")
def runs_show(
    exp_id: str = typer.Argument(..., help="Experiment id (or a unique prefix)."),
) -> None:
    """Everything the ledger knows about one experiment, with its state history."""
    from expflow_flows import actions

    typer.echo(json.dumps(actions.experiment_detail(exp_id), indent=2, default=str))


@runs_app.command("start")
def runs_start(
    deployment: str = typer.Argument(..., help="'flow/deployment', e.g. pipeline/pde-advection."),
    param: list[str] | None = typer.Option(
        None, help="Parameter name=YAML overriding the deployment's (repeatable)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Start a run of a deployment now; a worker of its work pool picks it up."""
    from expflow_flows import actions

    started = actions.start_deployment_run(deployment, _parameters(param or []))
    if json_out:
        typer.echo(json.dumps(dataclasses.asdict(started), indent=2, default=str))
        return
    typer.echo(
        f"started flow run {started.flow_run_id} ({started.flow_run_name}) of "
        f"{started.deployment}: {started.state}"
    )
    if started.ui_url:
        typer.echo(f"Prefect UI: {started.ui_url}")


@runs_app.command("cancel")
def runs_cancel(
    run: str = RUN_REF,
    pin: str | None = typer.Option(None, help="PIN (or EXPFLOW_PIN)."),
    force: bool = typer.Option(False, help="Cancel without a PIN (written to the audit log)."),
    wait: float = typer.Option(90.0, help="Seconds to wait for Prefect to confirm."),
) -> None:
    """Cancel the experiment's flow run through the Prefect API (PIN-guarded).

    Exits 2 when Prefect has not confirmed within --wait (the ledger shows CANCEL_PENDING).
    """
    from expflow_flows import actions

    outcome = actions.cancel(run, pin=pin, force=force, wait_s=wait, via="cli")
    if not outcome.done:
        raise ExpflowError(outcome.message)
    typer.echo(outcome.message)


@runs_app.command("retry")
def runs_retry(run: str = RUN_REF) -> None:
    """Schedule a failed or cancelled deployment run again, with the same parameters."""
    from expflow_flows import actions

    typer.echo(actions.retry(run, via="cli").message)


@runs_app.command("delete")
def runs_delete(
    exp_id: str = typer.Argument(..., help="Experiment id (or a unique prefix)."),
    pin: str | None = typer.Option(None, help="PIN (or EXPFLOW_PIN)."),
    force: bool = typer.Option(False, help="Delete without a PIN (written to the audit log)."),
) -> None:
    """Delete an experiment's ledger entry and history (PIN-guarded; run folders stay)."""
    from expflow_flows import actions

    row = actions.delete_experiment(exp_id, pin=pin, force=force, via="cli")
    typer.echo(f"deleted {row.id} ({row.name}) from the ledger")


def compare(
    metric: str = typer.Option("nrmse", help="Metric to rank by (name or Group/name)."),
    ascending: bool | None = typer.Option(
        None, "--asc/--desc", help="Sort order (default: the metric's direction in the registry)."
    ),
    gate: list[str] | None = typer.Option(
        None, help="Keep only experiments passing metric:op:value."
    ),
    name: str | None = typer.Option(None, help="Only this experiment name."),
    state: str | None = typer.Option("COMPLETED", help="Only this ledger state ('' for all)."),
    limit: int = typer.Option(50, help="Show at most this many ranked rows."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    csv_out: bool = typer.Option(False, "--csv", help="Print CSV."),
    source: str = typer.Option("ledger", help="Where experiments come from: ledger or clearml."),
    project: str | None = typer.Option(
        None, help="ClearML project to read (with --source clearml; sub-projects included)."
    ),
    tag: list[str] | None = typer.Option(
        None, help="Only ClearML tasks with this tag (repeatable; with --source clearml)."
    ),
) -> None:
    """Rank experiments from the ledger (or ClearML tasks) by a metric, filtered by gates."""
    from expflow_flows import actions

    ranking = actions.compare(
        metric,
        gates=gate or [],
        direction=None if ascending is None else ("minimize" if ascending else "maximize"),
        state=state,
        name=name,
        source=source,
        project=project,
        tags=tag or [],
    )
    ranking.rows = ranking.rows[:limit]
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "metric": ranking.metric,
                    "direction": ranking.direction,
                    "rows": ranking.rows,
                    "excluded": ranking.excluded,
                },
                indent=2,
                default=str,
            )
        )
        return
    if csv_out:
        typer.echo(ranking.to_csv(), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Experiments by {ranking.metric} ({ranking.direction})")
    # What research agents spent on LLM calls, next to any metric it is ranked by.
    llm = ranking.metric != "llm_cost_usd" and any("llm_cost_usd" in r for r in ranking.rows)
    for col in ("rank", "id", "name", "state", ranking.metric, *(["LLM $"] if llm else [])):
        table.add_column(col, overflow="fold")
    for r in ranking.rows:
        cost = [f"{r['llm_cost_usd']:.4f}" if "llm_cost_usd" in r else "-"] if llm else []
        table.add_row(str(r["rank"]), r["id"], r["name"], r["state"], f"{r['value']:.6g}", *cost)
    console = Console()
    console.print(table)
    if ranking.excluded:
        console.print(
            f"{len(ranking.excluded)} left out (no such metric, or a gate failed); --json lists why"
        )
