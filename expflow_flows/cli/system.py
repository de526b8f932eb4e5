"""``expflow system …``: what is installed and reachable."""

from __future__ import annotations

import json

import typer

system_app = typer.Typer(help="What is installed and reachable.", no_args_is_help=True)


@system_app.command("status")
def system_status(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Prefect API, Dask, Optuna storage, ledger, PIN, ClearML, Langfuse and Slurm: installed and reachable?"""
    from expflow_flows.system import status_rows

    rows = status_rows()
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="expflow system status")
    for col in ("part", "state", "detail"):
        table.add_column(col, overflow="fold")
    for r in rows:
        # escaped: an install hint such as 'expflow-flows[mcp]' is text, not Rich markup
        table.add_row(escape(r["part"]), escape(r["state"]), escape(r["detail"]))
    Console().print(table)
