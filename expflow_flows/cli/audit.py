"""``expflow audit …``: experiments against competition rules, data files against PDEBench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

audit_app = typer.Typer(
    help="Audits: experiments against competition rules, data files against PDEBench's layout.",
    no_args_is_help=True,
)


@audit_app.command("validate")
def audit_validate(
    experiment: str = typer.Argument(
        ..., help="Experiment id from the ledger (or a unique prefix)."
    ),
    rules: str | None = typer.Option(None, help="Audit rules YAML (primary, required_params)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Audit one experiment; exit 1 when any check fails."""
    from expflow_flows import actions

    _print_audits([actions.audit_experiment(experiment, rules=rules)], json_out)


@audit_app.command("dataset")
def audit_dataset_cmd(
    files: list[Path] = typer.Argument(..., help="PDEBench-layout HDF5 files."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check data files against PDEBench's layout and names; exit 1 when any check fails."""
    from expflow_flows.governance.audit import audit_dataset

    _print_audits([audit_dataset(f) for f in files], json_out)


@audit_app.command("report")
def audit_report(
    state: str | None = typer.Option(
        "COMPLETED", help="Audit experiments in this state ('' for all)."
    ),
    rules: str | None = typer.Option(None, help="Audit rules YAML (primary, required_params)."),
    out: Path | None = typer.Option(None, help="Folder for the Markdown and HTML reports."),
    limit: int = typer.Option(200, help="At most this many experiments, newest first."),
) -> None:
    """Audit every experiment; write Markdown and HTML reports; exit 1 when any fails."""
    from expflow_flows.flows.audit import audit_reports, write_reports

    reports = audit_reports(None, state=state or None, rules=rules, limit=limit)
    md, page = write_reports(reports, out)
    failed = [r for r in reports if not r.passed]
    typer.echo(f"{len(reports)} audited, {len(failed)} failed")
    for r in failed:
        typer.echo(f"FAILED {r.subject}: {r.summary()}")
    typer.echo(f"markdown: {md}\nhtml: {page}")
    if failed:
        raise typer.Exit(1)


def _print_audits(reports: list[Any], json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps([r.to_dict() for r in reports], indent=2, default=str))
    else:
        for r in reports:
            typer.echo(r.to_markdown())
    if any(not r.passed for r in reports):
        raise typer.Exit(1)
