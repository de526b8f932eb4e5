"""The ``expflow`` command line.

Heavy imports (Prefect, Optuna, Dask) happen inside the commands that need them,
so ``expflow --help`` stays quick. Errors a user can cause print one line and
exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from expflow_flows.errors import ExpflowError

app = typer.Typer(
    help="Prefect flows for ML experiments: HPO → train → eval → submit, sweeps, audits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pipeline_app = typer.Typer(
    help="Run the HPO → train → eval → submit pipeline.", no_args_is_help=True
)
data_app = typer.Typer(
    help="PDEBench-style datasets: list problems, generate synthetic data.", no_args_is_help=True
)
server_app = typer.Typer(help="A local Prefect server (UI) on loopback.", no_args_is_help=True)
pin_app = typer.Typer(
    help="The PIN that guards destructive and irreversible acts.", no_args_is_help=True
)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(data_app, name="data")
app.add_typer(server_app, name="server")
app.add_typer(pin_app, name="pin")

DEMO_CONFIG = Path(__file__).parent / "pde" / "demo.yaml"


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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


def _progress_display():
    """A rich live display of HPO trials, fed by :mod:`expflow_flows.progress`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from expflow_flows import progress as prog

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]HPO[/bold] {task.fields[study]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        redirect_stderr=True,
        redirect_stdout=True,
        disable=not console.is_terminal,
    )
    ids: dict[str, Any] = {}

    def on_update(p: prog.TrialProgress) -> None:
        detail = (
            f"{p.running} running · {p.complete} done · {p.pruned} pruned · {p.failed} failed"
            + (f" · best {p.best_value:.4g}" if p.best_value is not None else "")
        )
        if p.study not in ids:
            ids[p.study] = bar.add_task("", total=p.target, study=p.study, detail=detail)
        bar.update(ids[p.study], completed=p.finished, detail=detail)

    return bar, prog.subscribe(on_update)


def _run_pipeline(
    overrides: dict[str, Any], config: Path | None, force: bool, pin: str | None
) -> dict:
    from expflow_flows.config import build_config

    if pin:
        os.environ["EXPFLOW_PIN"] = pin
    cfg = build_config(config, **overrides)
    from expflow_flows.flows.pipeline import _preflight, pipeline

    _preflight(cfg, force)
    bar, unsubscribe = _progress_display()
    try:
        with bar:
            return pipeline(config=str(config) if config else None, force=force, **overrides)
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
    try:
        api = _ensure_server(port, server)
        from expflow_flows.pde.generate import ensure_dataset

        typer.echo("Generating the 1D advection dataset (PDEBench layout) ...", err=True)
        path = ensure_dataset("advection")
        typer.echo(f"dataset: {path}", err=True)
        summary = _run_pipeline({"n_trials": n_trials}, DEMO_CONFIG, force=False, pin=None)
    except ExpflowError as exc:
        fail(str(exc))
        return
    _show(summary, api, json_out)


@pipeline_app.command("run")
def pipeline_run(
    config: Path | None = typer.Option(None, help="Pipeline config YAML (see deployments/)."),
    experiment: str | None = typer.Option(None, help="Experiment name (run folder, study name)."),
    train: str | None = typer.Option(None, help="Train trainable: module:function or script path."),
    evaluate: str | None = typer.Option(
        None, help="Eval trainable: module:function or script path."
    ),
    space: str | None = typer.Option(None, help="Search space YAML file."),
    n_trials: int | None = typer.Option(None, help="HPO trials the study should hold."),
    parallelism: int | None = typer.Option(None, help="Trials at once (Dask workers)."),
    runner: str | None = typer.Option(None, help="Task runner for trials: dask or threads."),
    dask_address: str | None = typer.Option(None, help="Use an existing Dask scheduler."),
    objective: str | None = typer.Option(None, help="Metric HPO optimises."),
    direction: str | None = typer.Option(None, help="minimize or maximize."),
    storage: str | None = typer.Option(None, help="Optuna storage: journal file path or URL."),
    study_name: str | None = typer.Option(None, help="Optuna study name (default: experiment)."),
    gate: list[str] | None = typer.Option(None, help="Gate metric:op:value (repeatable)."),
    submit: bool | None = typer.Option(None, help="Write a submission bundle if gates pass."),
    submit_to: str | None = typer.Option(None, help="Folder for submission bundles."),
    param: list[str] | None = typer.Option(None, help="Fixed parameter name=value (repeatable)."),
    pin: str | None = typer.Option(None, help="PIN for the guarded submit (or EXPFLOW_PIN)."),
    force: bool = typer.Option(False, help="Submit without a PIN (written to the audit log)."),
    port: int = typer.Option(4200, help="Local Prefect server port."),
    server: bool = typer.Option(False, help="Start (or reuse) a local Prefect server."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run HPO → train → eval → submit."""
    overrides: dict[str, Any] = {
        "experiment": experiment,
        "train": train,
        "evaluate": evaluate,
        "space": space,
        "n_trials": n_trials,
        "parallelism": parallelism,
        "runner": runner,
        "dask_address": dask_address,
        "objective": objective,
        "direction": direction,
        "storage": storage,
        "study_name": study_name,
        "gates": list(gate) if gate else None,
        "submit": submit,
        "submit_to": submit_to,
    }
    try:
        if param:
            overrides["params"] = _parse_params(param, config)
        api = _ensure_server(port, server)
        summary = _run_pipeline(overrides, config, force=force, pin=pin)
    except ExpflowError as exc:
        fail(str(exc))
        return
    _show(summary, api, json_out)


def _parse_params(items: list[str], config: Path | None) -> dict[str, Any]:
    import yaml

    from expflow_flows.config import build_config

    base = dict(build_config(config).params)
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ExpflowError(f"--param {item!r}: expected name=value")
        base[name] = yaml.safe_load(raw)
    return base


@data_app.command("problems")
def data_problems() -> None:
    """List PDEBench's forward problems and which ones this package can generate."""
    from rich.console import Console
    from rich.table import Table

    from expflow_flows.pde.registry import PROBLEMS

    table = Table(title="PDEBench forward problems")
    for col in ("key", "name", "dims", "channels", "parameters", "generate"):
        table.add_column(col)
    for p in PROBLEMS.values():
        table.add_row(
            p.key,
            p.name,
            str(p.dims),
            ", ".join(p.channels),
            "; ".join(f"{k}: {v}" for k, v in p.parameters.items()),
            "yes" if p.generatable else "-",
        )
    Console().print(table)


@data_app.command("generate")
def data_generate(
    problem: str = typer.Argument(..., help="Problem key, e.g. advection, diffusion, burgers."),
    out: Path | None = typer.Option(None, help="Output HDF5 path (default: the data cache)."),
    samples: int = typer.Option(100, help="Number of samples."),
    nx: int = typer.Option(128, help="Grid points in x."),
    nt: int = typer.Option(41, help="Time frames."),
    seed: int = typer.Option(0, help="Random seed."),
    param: list[str] | None = typer.Option(None, help="PDE parameter name=value, e.g. beta=0.4."),
) -> None:
    """Write a synthetic dataset in PDEBench's HDF5 layout."""
    try:
        from expflow_flows.pde.generate import generate

        kwargs: dict[str, float] = {}
        for item in param or []:
            name, sep, raw = item.partition("=")
            try:
                kwargs[name] = float(raw)
            except ValueError:
                raise ExpflowError(f"--param {item!r}: expected name=number") from None
            if not sep:
                raise ExpflowError(f"--param {item!r}: expected name=number")
        path = generate(problem, out, n_samples=samples, nx=nx, nt=nt, seed=seed, **kwargs)
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(str(path))


@server_app.command("start")
def server_start(port: int = typer.Option(4200, help="Loopback port.")) -> None:
    """Start a local Prefect server in the background (or reuse a running one)."""
    from expflow_flows import server

    try:
        url, started = server.start(port)
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(f"Prefect server {'started' if started else 'already running'}: {url}")
    typer.echo(f"UI: {url.removesuffix('/api')}   (export PREFECT_API_URL={url})")


@server_app.command("stop")
def server_stop(port: int = typer.Option(4200, help="Loopback port.")) -> None:
    """Stop the local Prefect server started by ``expflow server start``."""
    from expflow_flows import server

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


@pin_app.command("init")
def pin_init(
    new_pin: str | None = typer.Option(None, "--new-pin", help="The new PIN (4-12 digits)."),
    pin: str | None = typer.Option(None, help="The current PIN, when one is set."),
) -> None:
    """Set the PIN (replacing one needs the current PIN)."""
    from expflow_flows import pin as pin_mod

    try:
        if new_pin is None:
            if not sys.stdin.isatty():
                raise ExpflowError("no --new-pin given and no terminal to ask on")
            import getpass

            new_pin = getpass.getpass("New PIN (4-12 digits): ")
            if getpass.getpass("Repeat: ") != new_pin:
                raise ExpflowError("the two PINs differ")
        pin_mod.init_pin(new_pin, current=pin or os.environ.get("EXPFLOW_PIN"))
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo("PIN set.")


@pin_app.command("status")
def pin_status() -> None:
    """Whether a PIN is set, where from, and whether the guard is locked."""
    from expflow_flows import pin as pin_mod

    typer.echo(json.dumps(pin_mod.pin_status(), indent=2, default=str))


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
