"""``expflow server …``: a local Prefect server (UI) on loopback."""

from __future__ import annotations

import typer

server_app = typer.Typer(help="A local Prefect server (UI) on loopback.", no_args_is_help=True)


@server_app.command("start")
def server_start(
    port: int = typer.Option(4200, help="Loopback port."),
    database_url: str | None = typer.Option(
        None,
        envvar="EXPFLOW_SERVER_DATABASE_URL",
        help="postgresql+asyncpg://user@host/db for a team server (default: SQLite).",
    ),
    reports_port: int | None = typer.Option(
        None, help="Loopback port of the read-only reports server (default: port + 1; 0: none)."
    ),
) -> None:
    """Start a local Prefect server in the background (or reuse a running one), and the
    read-only server of the expflow home's reports that the UI's links open."""
    from expflow_flows import server

    url, started = server.start(port, database_url=database_url)
    typer.echo(f"Prefect server {'started' if started else 'already running'}: {url}")
    typer.echo(f"UI: {url.removesuffix('/api')}   (export PREFECT_API_URL={url})")
    reports = port + 1 if reports_port is None else reports_port
    if reports:
        where, _ = server.start_reports(reports)
        typer.echo(f"Reports: {where}/   (run folders under /runs/, audits under /audits/)")


@server_app.command("stop")
def server_stop(
    port: int = typer.Option(4200, help="Loopback port."),
    reports_port: int | None = typer.Option(
        None, help="Port of its reports server (default: port + 1)."
    ),
) -> None:
    """Stop the local Prefect server started by ``expflow server start``, and its reports
    server."""
    from expflow_flows import server

    server.stop_reports(port + 1 if reports_port is None else reports_port)
    typer.echo("stopped" if server.stop(port) else f"no server started by expflow on port {port}")


@server_app.command("status")
def server_status(port: int = typer.Option(4200, help="Loopback port.")) -> None:
    """Say whether a Prefect server answers on the port."""
    from expflow_flows import server

    if server.is_healthy(port):
        typer.echo(f"healthy: {server.api_url(port)}")
    else:
        typer.echo(f"no server on 127.0.0.1:{port}")
        raise typer.Exit(1)


@server_app.command("automations")
def server_automations() -> None:
    """Create the automations: one marks a flow run Crashed once its heartbeat stops (its
    process was killed or its node went down), one pauses a deployment whose run failed
    a gate (and notifies, with EXPFLOW_NOTIFY_BLOCK); on the API in PREFECT_API_URL."""
    from expflow_flows import server

    automation_id = server.ensure_zombie_automation()
    typer.echo(f"automation {server.ZOMBIE_AUTOMATION!r}: {automation_id}")
    gate_id = server.ensure_gate_automation()
    typer.echo(f"automation {server.GATE_AUTOMATION!r}: {gate_id}")
