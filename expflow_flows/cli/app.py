"""The ``expflow`` command line: the root command, the pipeline and the sweeps.

The other command groups live in their own modules of this package (``runs``,
``pin``, ``audit``, ``package``, ``server``, ``system``, ``pde``, ``langfuse``);
acts on experiments and flow runs are :mod:`expflow_flows.actions`, shared with
the MCP server. Heavy imports (Prefect, Optuna, Dask) happen inside the commands
that need them, so ``expflow --help`` stays quick. An :class:`ExpflowError` from
any command is one ``error: ...`` line on stderr and exit status 2 (in one place,
:class:`_OneLineErrors`); commands just raise it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from expflow_flows.cli.audit import audit_app
from expflow_flows.cli.langfuse import langfuse_app
from expflow_flows.cli.package import package_app
from expflow_flows.cli.pde import pde_app
from expflow_flows.cli.pin import pin_app
from expflow_flows.cli.runs import compare, runs_app
from expflow_flows.cli.server import server_app
from expflow_flows.cli.system import system_app
from expflow_flows.errors import ExpflowError
from expflow_flows.secrets import hand_over
from expflow_flows.settings.base import set_dotted

# Without a server, each command starts Prefect's temporary one, which creates and migrates its
# database on the first start: on a fresh 2-core machine that outlasts Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


class _OneLineErrors(TyperGroup):
    """The root command: a user's mistake (an ExpflowError) in any command is one line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ExpflowError as exc:
            # One line even when a bad value brought a line break into the message.
            message = " ".join(str(exc).splitlines()) or type(exc).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            from expflow_flows.errors import disk_full

            full = disk_full(exc)
            if full is None:
                raise
            typer.echo(f"error: {full}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    help="Prefect flows for ML experiments: HPO → train → eval → submit, sweeps, audits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)
pipeline_app = typer.Typer(
    help="Run the HPO → train → eval → submit pipeline.", no_args_is_help=True
)
sweep_app = typer.Typer(help="Parameter sweeps: run, follow, read results.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(pde_app, name="pde")
app.add_typer(system_app, name="system")
app.add_typer(server_app, name="server")
app.add_typer(pin_app, name="pin")
app.add_typer(runs_app, name="runs")
app.add_typer(audit_app, name="audit")
app.add_typer(sweep_app, name="sweep")
app.add_typer(package_app, name="package")
app.add_typer(langfuse_app, name="langfuse")

DEMO_CONFIG = Path(__file__).parent.parent / "pde" / "demo.yaml"


def _ensure_server(port: int, use_server: bool) -> str | None:
    """Point this process at a Prefect server: the one in PREFECT_API_URL, or a local one."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if not use_server:
        return None
    from expflow_flows import server

    typer.echo(f"Prefect server: checking 127.0.0.1:{port} ...", err=True)
    url, started = server.start(port)
    typer.echo(f"Prefect server {'started' if started else 'already running'} at {url}", err=True)
    os.environ["PREFECT_API_URL"] = url
    return url


def _progress_display(kind: str = "hpo") -> tuple[Any, Any]:
    """A live display of HPO trials, or with ``kind="sweep"`` of sweep combinations, and the
    function that unsubscribes it (see :mod:`expflow_flows.cli.progress`)."""
    from expflow_flows.cli import progress

    return progress.sweep_display() if kind == "sweep" else progress.hpo_display()


def _run_pipeline(
    overrides: dict[str, Any], config: Path | None, force: bool, pin: str | None
) -> dict:
    from expflow_flows.settings.pipeline import load_pipeline_settings

    if pin:
        os.environ["EXPFLOW_PIN"] = pin
    # Bad settings, a missing trainable or tracking SDK, a missing PIN: one line, before
    # anything starts. The flow gets what was given, so its run shows what changed.
    settings = load_pipeline_settings(config, overrides)
    from expflow_flows.flows.pipeline import pipeline, preflight

    preflight(settings, force)
    bar, unsubscribe = _progress_display()
    try:
        with bar:
            return pipeline(
                config=str(config) if config else None,
                settings=hand_over(overrides) or None,  # Prefect records no secret
                force=force,
            )
    finally:
        unsubscribe()


def _show(summary: dict[str, Any], api: str | None, json_out: bool) -> None:
    """The run's summary: JSON for machines, a table for people."""
    if json_out:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(summary, api)


def _print_summary(summary: dict[str, Any], api: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Pipeline {summary['experiment']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    t = summary["trials"]
    table.add_row("trials", f"{t['complete']} complete, {t['pruned']} pruned, {t['failed']} failed")
    table.add_row("best trial", f"#{summary['best_trial']}: {summary['best_value']:.6g}")
    table.add_row("best params", ", ".join(f"{k}={v}" for k, v in summary["best_params"].items()))
    for name, value in sorted(summary["metrics"].items()):
        table.add_row(f"eval {name}", f"{value:.6g}")
    for g in summary["gates"]:
        table.add_row("gate", f"{'PASS' if g['passed'] else 'FAIL'} {g['message']}")
    table.add_row("bundle", summary["bundle"] or "not submitted")
    table.add_row("report", summary["report"])
    table.add_row("run folder", summary["run_dir"])
    if summary.get("ledger_id"):
        table.add_row("ledger id", f"{summary['ledger_id']} (expflow runs show …)")
    if api:
        table.add_row("Prefect UI", api.removesuffix("/api"))
    console.print(table)


@app.command()
def demo(
    port: int = typer.Option(4200, help="Loopback port of the local Prefect server."),
    server: bool = typer.Option(True, help="Start (or reuse) a local Prefect server for the UI."),
    n_trials: int = typer.Option(12, help="HPO trials."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Generate the PDE data and run the pipeline on the built-in defaults."""
    api = _ensure_server(port, server)
    from expflow_flows.pde.generate import ensure_dataset

    typer.echo("Generating the 1D advection dataset (PDEBench layout) ...", err=True)
    path = ensure_dataset("advection")
    typer.echo(f"dataset: {path}", err=True)
    summary = _run_pipeline({"hpo": {"n_trials": n_trials}}, DEMO_CONFIG, force=False, pin=None)
    _show(summary, api, json_out)


app.command()(compare)


@pipeline_app.command("run")
def pipeline_run(
    config: Path | None = typer.Option(None, help="Pipeline config YAML (see deployments/)."),
    experiment: str | None = typer.Option(None, help="Experiment name (run folder, study name)."),
    train: str | None = typer.Option(None, help="train.target: module:function or script path."),
    evaluate: str | None = typer.Option(
        None, help="evaluate.target: module:function or script path."
    ),
    space: str | None = typer.Option(None, help="Search space YAML file."),
    n_trials: int | None = typer.Option(None, help="hpo.n_trials: trials the study should hold."),
    workers: int | None = typer.Option(None, help="cluster.workers: trials at once."),
    cluster: str | None = typer.Option(None, help="cluster.kind: local, threads or slurm."),
    dask_address: str | None = typer.Option(
        None, help="cluster.address: use an existing Dask scheduler."
    ),
    objective: str | None = typer.Option(None, help="Metric HPO optimises."),
    direction: str | None = typer.Option(None, help="minimize or maximize."),
    storage: str | None = typer.Option(None, help="hpo.storage: journal file path or URL."),
    study_name: str | None = typer.Option(None, help="hpo.study_name (default: the experiment)."),
    gate: list[str] | None = typer.Option(None, help="Gate metric:op:value (repeatable)."),
    submit: bool | None = typer.Option(
        None, help="submit.enabled: write a submission bundle if the gates pass."
    ),
    submit_to: str | None = typer.Option(None, help="submit.to: folder for submission bundles."),
    param: list[str] | None = typer.Option(None, help="Fixed parameter name=value (repeatable)."),
    set_: list[str] | None = typer.Option(
        None,
        "--set",
        help="Any pipeline setting as dotted.key=YAML, e.g. hpo.budget='{epochs: 5}' "
        "or train.arg_style=hydra.",
    ),
    pin: str | None = typer.Option(None, help="PIN for the guarded submit (or EXPFLOW_PIN)."),
    force: bool = typer.Option(False, help="Submit without a PIN (written to the audit log)."),
    port: int = typer.Option(4200, help="Local Prefect server port."),
    server: bool = typer.Option(False, help="Start (or reuse) a local Prefect server."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run HPO → train → eval → submit."""
    overrides = _options_to_settings(
        {
            "experiment": experiment,
            "train.target": train,
            "evaluate.target": evaluate,
            "space": space,
            "hpo.n_trials": n_trials,
            "cluster.workers": workers,
            "cluster.kind": cluster,
            "cluster.address": dask_address,
            "objective": objective,
            "direction": direction,
            "hpo.storage": storage,
            "hpo.study_name": study_name,
            "gates": list(gate) if gate else None,
            "submit.enabled": submit,
            "submit.to": submit_to,
        },
        set_ or [],
    )
    if param:
        overrides["params"] = _parse_params(param, config)
    api = _ensure_server(port, server)
    summary = _run_pipeline(overrides, config, force=force, pin=pin)
    _show(summary, api, json_out)


def _settings_command(kind: str) -> Any:
    """``expflow <kind> settings``: the resolved settings, secret-looking values masked."""

    def show(
        config: Path | None = typer.Option(None, help=f"{kind.title()} config YAML."),
        set_: list[str] | None = typer.Option(
            None, "--set", help=f"A setting as dotted.key=YAML, as for `{kind} run` (repeatable)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
    ) -> None:
        from expflow_flows.secrets import scrub
        from expflow_flows.settings.pipeline import load_pipeline_settings
        from expflow_flows.settings.sweep import load_sweep_settings

        load = load_pipeline_settings if kind == "pipeline" else load_sweep_settings
        data = scrub(load(config, _options_to_settings({}, set_ or [])).to_dict())
        if json_out:
            typer.echo(json.dumps(data, indent=2))
            return
        import yaml

        typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())

    show.__doc__ = f"Show the settings a {kind} would use: defaults < config file < --set, checked."
    return show


pipeline_app.command("settings")(_settings_command("pipeline"))


@pipeline_app.command("delete-study")
def pipeline_delete_study(
    study_name: str = typer.Argument(..., help="Optuna study name."),
    storage: str | None = typer.Option(None, help="Optuna storage (default: the journal file)."),
    pin: str | None = typer.Option(None, help="PIN (or EXPFLOW_PIN)."),
    force: bool = typer.Option(False, help="Delete without a PIN (written to the audit log)."),
) -> None:
    """Delete an Optuna study and all its trials (PIN-guarded; irreversible)."""
    from expflow_flows import actions

    actions.delete_study(study_name, storage, pin=pin, force=force, via="cli")
    typer.echo(f"deleted study {study_name}")


def _options_to_settings(options: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Given CLI options (by their dotted setting) and ``--set key=value`` pairs (values read
    as YAML) as nested settings; the settings model checks the names and values."""

    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is not None:
            set_dotted(out, key, value)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ExpflowError(f"--set {item!r}: expected key=value, e.g. hpo.n_trials=20")
        if not raw.strip():
            raise ExpflowError(
                f"--set {item!r}: the value is empty; give one (null clears a setting "
                "that may be empty)"
            )
        set_dotted(out, key.strip(), _yaml_value(f"--set {item!r}", raw))
    return out


def _yaml_value(what: str, raw: str) -> Any:
    """A command-line value read as YAML (``20``, ``[a, b]``, ``{epochs: 5}``), one line if not."""
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ExpflowError(
            f"{what}: the value is not valid YAML ({problem}); put a string with YAML "
            "characters in quotes"
        ) from None


def _parse_params(items: list[str], config: Path | None) -> dict[str, Any]:

    from expflow_flows.settings.pipeline import load_pipeline_settings

    base = dict(load_pipeline_settings(config).params)
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ExpflowError(f"--param {item!r}: expected name=value")
        base[name] = _yaml_value(f"--param {item!r}", raw)
    return base


sweep_app.command("settings")(_settings_command("sweep"))


@sweep_app.command("run")
def sweep_run(
    config: Path | None = typer.Option(None, help="Sweep config YAML (see deployments/)."),
    name: str | None = typer.Option(None, help="Sweep name (its folder and cache)."),
    trainable: str | None = typer.Option(
        None, help="trainable.target: module:function or script path."
    ),
    space: str | None = typer.Option(None, help="Sweep space YAML file."),
    workers: int | None = typer.Option(None, help="cluster.workers: combinations at once."),
    cluster: str | None = typer.Option(None, help="cluster.kind: local, threads or slurm."),
    dask_address: str | None = typer.Option(
        None, help="cluster.address: use an existing Dask scheduler."
    ),
    force: bool = typer.Option(False, help="Run every combination again, cached or not."),
    set_: list[str] | None = typer.Option(
        None,
        "--set",
        help="Any sweep setting as dotted.key=YAML, e.g. resources.memory=2GB "
        "or trainable.arg_style=hydra.",
    ),
    port: int = typer.Option(4200, help="Local Prefect server port."),
    server: bool = typer.Option(False, help="Start (or reuse) a local Prefect server."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run a sweep: every combination of a space, cached and resumable."""
    overrides = _options_to_settings(
        {
            "name": name,
            "trainable.target": trainable,
            "space": space,
            "cluster.workers": workers,
            "cluster.kind": cluster,
            "cluster.address": dask_address,
            "force": True if force else None,
        },
        set_ or [],
    )
    from expflow_flows.flows.sweep import preflight, sweep
    from expflow_flows.settings.sweep import load_sweep_settings

    # Bad settings, space or trainable, a missing tracking SDK: one line, before
    # anything starts.
    preflight(load_sweep_settings(config, overrides))
    display, unsubscribe = _progress_display("sweep")
    api = _ensure_server(port, server)
    try:
        with display:  # a bar on a terminal, a line every few seconds elsewhere
            summary = sweep(
                config=str(config) if config else None, settings=hand_over(overrides) or None
            )
    finally:
        unsubscribe()
    if json_out:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    typer.echo(
        f"sweep {summary['name']}: {summary['combinations']} combinations "
        f"({summary['ran']} ran, {summary['cached']} cached): {counts}"
    )
    for i, row in enumerate(summary["best"], 1):
        params = ", ".join(
            f"{k.removeprefix('param:')}={v}" for k, v in row.items() if k.startswith("param:")
        )
        typer.echo(
            f"  #{i} {summary['objective']}={row.get('metric:' + summary['objective'])}  {params}"
        )
    typer.echo(f"dashboard: {summary['dashboard']}\nstatus:    {summary['status_page']}")
    typer.echo(f"results:   {summary['results_csv']}")
    if api:
        typer.echo(f"Prefect UI: {api.removesuffix('/api')}")


@sweep_app.command("status")
def sweep_status(name: str = typer.Argument(..., help="Sweep name.")) -> None:
    """Counts by status of a sweep, running or finished, read from its results store."""
    from expflow_flows import actions

    info = actions.sweep_info(actions.sweep_folder(name))
    counts = info["counts"]
    done = sum(counts.values())
    typer.echo(
        f"{name}: {done}/{info['combinations'] or '?'} rows: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    typer.echo(f"status page: {Path(info['folder']) / 'status.html'}")


@sweep_app.command("results")
def sweep_results(
    name: str = typer.Argument(..., help="Sweep name."),
    best: str | None = typer.Option(None, help="Show the best rows by this metric."),
    maximize: bool = typer.Option(False, help="Higher is better for --best."),
    n: int = typer.Option(10, help="How many best rows."),
    summary_by: list[str] | None = typer.Option(
        None,
        "--by",
        help="Statistics of --best's metric by these params (--by lr --by width, or lr,width): "
        "mean, std, 95% CI; other varying params are added, so only the replicate is pooled.",
    ),
    json_out: bool = typer.Option(
        False, "--json", help="JSON for scripts: one object per line, every column kept."
    ),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write all rows to this CSV file."),
    parquet_out: Path | None = typer.Option(
        None, "--parquet", help="Write all rows to this Parquet file."
    ),
    png: Path | None = typer.Option(
        None, help="Export the dashboard as a PNG (needs a Chromium on PATH)."
    ),
) -> None:
    """Read a sweep's results: best rows, statistics per parameter, CSV/Parquet exports."""
    from expflow_flows.actions import sweep_folder
    from expflow_flows.sweep.results import SweepResults

    by = [b.strip() for item in summary_by or [] for b in item.split(",") if b.strip()]
    if by and not best:
        raise ExpflowError("--by needs --best METRIC, the metric to summarise, e.g. --best loss")
    results = SweepResults.load(sweep_folder(name))
    if csv_out:
        results.to_csv(csv_out)
        typer.echo(f"wrote {csv_out}", err=json_out)  # stdout stays JSON with --json
    if parquet_out:
        results.to_parquet(parquet_out)
        typer.echo(f"wrote {parquet_out}", err=json_out)
    if best and json_out:
        note = results.grouping_note(by) if by else None
        if note:
            typer.echo(note, err=True)  # stdout stays JSON
        rows = results.summary(best, by=by) if by else results.best(best, maximize, n)
        for row in rows:
            typer.echo(json.dumps(row, default=str))
    elif best:
        table = results.summary_table(best, by) if by else results.best_table(best, maximize, n)
        table.print()
    if png:
        from expflow_flows.sweep.report import export_png

        shot = export_png(sweep_folder(name) / "dashboard.html", png)
        if shot is None:
            raise ExpflowError("no PNG written: no Chromium on PATH (apt-get install chromium)")
        typer.echo(f"wrote {shot}", err=json_out)
    if not (best or csv_out or parquet_out or png):
        if json_out:
            typer.echo(json.dumps(results.status_counts()))
        else:
            typer.echo("\n".join(results.overview()))


@app.command()
def version() -> None:
    """Print the versions of expflow-flows and the engines it drives."""
    from expflow_flows.runs.metadata import package_versions

    for name, ver in package_versions().items():
        typer.echo(f"{name} {ver}")


@app.command("mcp")
def mcp_serve() -> None:
    """Serve research agents over the Model Context Protocol on stdio (the mcp extra)."""
    from expflow_flows.integrations.tracking import require_sdk

    require_sdk("mcp", "mcp", "expflow mcp")
    from expflow_flows.mcp.server import serve

    serve()


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
