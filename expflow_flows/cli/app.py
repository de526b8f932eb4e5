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

from expflow_flows.cli.langfuse import langfuse_app
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
pde_app = typer.Typer(
    help="PDEBench's equations and synthetic data in its HDF5 layout.", no_args_is_help=True
)
audit_app = typer.Typer(
    help="Audits: experiments against competition rules, data files against PDEBench's layout.",
    no_args_is_help=True,
)
sweep_app = typer.Typer(help="Parameter sweeps: run, follow, read results.", no_args_is_help=True)
package_app = typer.Typer(
    help="Reproducibility packages: create, verify, reproduce.", no_args_is_help=True
)
system_app = typer.Typer(help="What is installed and reachable.", no_args_is_help=True)
server_app = typer.Typer(help="A local Prefect server (UI) on loopback.", no_args_is_help=True)
runs_app = typer.Typer(
    help="Experiments in the ledger: list, show, cancel, retry.", no_args_is_help=True
)
pin_app = typer.Typer(
    help="The PIN that guards destructive and irreversible acts.", no_args_is_help=True
)
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
    """A rich live display of HPO trials, fed by :mod:`expflow_flows.hpo.progress`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from expflow_flows.hpo import progress as prog

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
    set_: list[str] | None = typer.Option(
        None, "--set", help="Any pipeline setting as key=YAML, e.g. hpo_budget='{epochs: 5}'."
    ),
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
        overrides.update(_parse_settings(set_ or []))
        if param:
            overrides["params"] = _parse_params(param, config)
        api = _ensure_server(port, server)
        summary = _run_pipeline(overrides, config, force=force, pin=pin)
    except ExpflowError as exc:
        fail(str(exc))
        return
    _show(summary, api, json_out)


@pipeline_app.command("delete-study")
def pipeline_delete_study(
    study_name: str = typer.Argument(..., help="Optuna study name."),
    storage: str | None = typer.Option(None, help="Optuna storage (default: the journal file)."),
    pin: str | None = typer.Option(None, help="PIN (or EXPFLOW_PIN)."),
    force: bool = typer.Option(False, help="Delete without a PIN (written to the audit log)."),
) -> None:
    """Delete an Optuna study and all its trials (PIN-guarded; irreversible)."""
    from expflow_flows.governance import pin as pin_mod
    from expflow_flows.hpo import study as hpo

    try:
        store = hpo.open_storage(storage)
        names = [s.study_name for s in store.get_all_studies()]
        if study_name not in names:
            raise ExpflowError(
                f"study {study_name!r} is not in {hpo.resolve_storage(storage)}; "
                f"studies there: {', '.join(sorted(names)) or 'none'}"
            )
        pin_mod.guard("delete-study", target=study_name, pin=pin, force=force)
        store.delete_study(store.get_study_id_from_name(study_name))
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(f"deleted study {study_name}")


def _parse_settings(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs, values read as YAML; keys are checked by build_config."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ExpflowError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ExpflowError(f"--set {item!r}: the value is not valid YAML") from None
    return out


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


@pde_app.command("equations")
def pde_equations() -> None:
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


@pde_app.command("generate")
def pde_generate(
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
def server_start(
    port: int = typer.Option(4200, help="Loopback port."),
    database_url: str | None = typer.Option(
        None,
        envvar="EXPFLOW_SERVER_DATABASE_URL",
        help="postgresql+asyncpg://user@host/db for a team server (default: SQLite).",
    ),
) -> None:
    """Start a local Prefect server in the background (or reuse a running one)."""
    from expflow_flows import server

    try:
        url, started = server.start(port, database_url=database_url)
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


def _ask_pin(given: str | None, prompt: str, *, env: bool = True, confirm: bool = False) -> str:
    """A PIN from the option, else EXPFLOW_PIN, else a prompt when a terminal is attached."""
    if given:
        return given
    if env and os.environ.get("EXPFLOW_PIN"):
        return os.environ["EXPFLOW_PIN"]
    if not sys.stdin.isatty():
        raise ExpflowError(
            f"{prompt.lower()} is needed: pass it as an option (no terminal to ask on)"
        )
    import getpass

    value = getpass.getpass(f"{prompt}: ")
    if confirm and getpass.getpass("Repeat: ") != value:
        raise ExpflowError("the two PINs differ")
    return value


@pin_app.command("init")
def pin_init(
    new_pin: str | None = typer.Option(None, "--new-pin", help="The new PIN (4-12 digits)."),
    pin: str | None = typer.Option(None, help="The current PIN, when one is set (or EXPFLOW_PIN)."),
) -> None:
    """Set the PIN; over an existing PIN this needs the current one."""
    from expflow_flows.governance import pin as pin_mod

    try:
        current = None
        if pin_mod.pin_status().get("set"):
            current = _ask_pin(pin, "Current PIN")
        fresh = _ask_pin(new_pin, "New PIN (4-12 digits)", env=False, confirm=True)
        pin_mod.init_pin(fresh, current=current)
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(f"PIN set ({pin_mod.pin_path()}, mode 0600).")


@pin_app.command("change")
def pin_change(
    pin: str | None = typer.Option(None, help="The current PIN (or EXPFLOW_PIN)."),
    new_pin: str | None = typer.Option(None, "--new-pin", help="The new PIN (4-12 digits)."),
) -> None:
    """Replace the PIN (needs the current one)."""
    from expflow_flows.governance import pin as pin_mod

    try:
        if not pin_mod.pin_status().get("set"):
            raise ExpflowError("no PIN is set; use `expflow pin init`")
        current = _ask_pin(pin, "Current PIN")
        fresh = _ask_pin(new_pin, "New PIN (4-12 digits)", env=False, confirm=True)
        pin_mod.init_pin(fresh, current=current)
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo("PIN changed.")


@pin_app.command("check")
def pin_check(
    pin: str | None = typer.Option(None, help="The PIN to check (or EXPFLOW_PIN)."),
) -> None:
    """Check a PIN: exit 0 when right, 1 when wrong (wrong tries count towards the lockout)."""
    from expflow_flows.governance import pin as pin_mod

    try:
        if not pin_mod.pin_status().get("set"):
            raise ExpflowError("no PIN is set; use `expflow pin init`")
        ok = pin_mod.verify_pin(_ask_pin(pin, "PIN"))
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo("PIN is correct." if ok else "PIN is wrong.")
    if not ok:
        raise typer.Exit(1)


@pin_app.command("clear")
def pin_clear(
    pin: str | None = typer.Option(None, help="The current PIN (or EXPFLOW_PIN)."),
) -> None:
    """Remove the PIN (needs the current one); guarded acts are then allowed and still audited."""
    from expflow_flows.governance import pin as pin_mod

    try:
        if not pin_mod.pin_status().get("set"):
            raise ExpflowError("no PIN is set")
        pin_mod.clear_pin(_ask_pin(pin, "Current PIN"))
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo("PIN cleared.")


@pin_app.command("status")
def pin_status() -> None:
    """Whether a PIN is set, where from, and whether the guard is locked (never the hash)."""
    from expflow_flows.governance import pin as pin_mod

    typer.echo(json.dumps(pin_mod.pin_status(), indent=2, default=str))


@runs_app.command("list")
def runs_list(
    state: str | None = typer.Option(None, help="Only this state, e.g. RUNNING."),
    name: str | None = typer.Option(None, help="Only this experiment name."),
    limit: int = typer.Option(50, help="At most this many rows."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List experiments, newest first."""
    from rich.console import Console
    from rich.table import Table

    from expflow_flows.governance.ledger import Ledger

    try:
        rows = Ledger().list(state=state, name=name, limit=limit)
    except ExpflowError as exc:
        fail(str(exc))
        return
    if json_out:
        typer.echo(json.dumps([_row_dict(r) for r in rows], indent=2, default=str))
        return
    table = Table(title="Experiments")
    for col in ("id", "name", "kind", "state", "updated", "flow run"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.id, r.name, r.kind, r.state, _when(r.updated_at), r.flow_run_id or "")
    Console().print(table)


@runs_app.command("show")
def runs_show(
    exp_id: str = typer.Argument(..., help="Experiment id (or a unique prefix)."),
) -> None:
    """Everything the ledger knows about one experiment, with its state history."""
    from expflow_flows.governance.ledger import Ledger

    try:
        ledger = Ledger()
        row = ledger.get(exp_id)
        out = {**_row_dict(row), "history": ledger.history(row.id)}
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(json.dumps(out, indent=2, default=str))


@runs_app.command("cancel")
def runs_cancel(
    exp_id: str = typer.Argument(..., help="Experiment id (or a unique prefix)."),
    pin: str | None = typer.Option(None, help="PIN (or EXPFLOW_PIN)."),
    force: bool = typer.Option(False, help="Cancel without a PIN (written to the audit log)."),
    wait: float = typer.Option(90.0, help="Seconds to wait for Prefect to confirm."),
) -> None:
    """Cancel the experiment's flow run through the Prefect API (PIN-guarded)."""
    from expflow_flows.flows.flowruns import cancel_flow_run
    from expflow_flows.governance import pin as pin_mod
    from expflow_flows.governance.ledger import Ledger

    try:
        ledger = Ledger()
        row = ledger.get(exp_id)
        if not row.flow_run_id:
            raise ExpflowError(f"experiment {row.id} has no Prefect flow run to cancel")
        pin_mod.guard("cancel", target=f"{row.id} ({row.name})", pin=pin, force=force)
        ledger.move_to(row.id, "CANCEL_PENDING", message="cancel requested")
        final = cancel_flow_run(row.flow_run_id, wait)
        if final != "CANCELLED":
            raise ExpflowError(
                f"cancel requested, but Prefect reports flow run {row.flow_run_id} as {final} "
                f"after {wait:g} s; the ledger shows CANCEL_PENDING"
            )
        if ledger.get(row.id).state != "CANCELLED":
            ledger.move_to(row.id, "CANCELLED", message="Prefect confirmed the cancellation")
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(f"cancelled {row.id} ({row.name}); flow run {row.flow_run_id}")


@runs_app.command("delete")
def runs_delete(
    exp_id: str = typer.Argument(..., help="Experiment id (or a unique prefix)."),
    pin: str | None = typer.Option(None, help="PIN (or EXPFLOW_PIN)."),
    force: bool = typer.Option(False, help="Delete without a PIN (written to the audit log)."),
) -> None:
    """Delete an experiment's ledger entry and history (PIN-guarded; run folders stay)."""
    from expflow_flows.governance import pin as pin_mod
    from expflow_flows.governance.ledger import Ledger

    try:
        ledger = Ledger()
        row = ledger.get(exp_id)
        if row.state in ("RUNNING", "ENQUEUED", "CANCEL_PENDING"):
            raise ExpflowError(
                f"experiment {row.id} is {row.state}; cancel it first (expflow runs cancel)"
            )
        pin_mod.guard("delete-ledger-entry", target=f"{row.id} ({row.name})", pin=pin, force=force)
        ledger.delete(row.id)
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(f"deleted {row.id} ({row.name}) from the ledger")


@runs_app.command("retry")
def runs_retry(
    exp_id: str = typer.Argument(..., help="Experiment id (or a unique prefix)."),
) -> None:
    """Re-run a failed or cancelled experiment's deployment with the same parameters."""
    from expflow_flows.governance.ledger import Ledger

    try:
        ledger = Ledger()
        row = ledger.get(exp_id)
        if not row.flow_run_id:
            raise ExpflowError(f"experiment {row.id} has no Prefect flow run to retry")
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            old = client.read_flow_run(row.flow_run_id)
            if old.deployment_id is None:
                raise ExpflowError(
                    f"experiment {row.id} did not run from a deployment; run it again with "
                    "`expflow pipeline run` (it resumes its study)"
                )
            ledger.transition(row.id, "retry", message="retry requested")
            new = client.create_flow_run_from_deployment(
                old.deployment_id, parameters=old.parameters
            )
        ledger.update(row.id, flow_run_id=str(new.id))
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(f"retrying {row.id} ({row.name}) as flow run {new.id}")


def _row_dict(row: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(row)


def _when(ts: Any) -> str:
    """An ISO timestamp from the ledger, shortened for a table."""
    return str(ts).replace("T", " ")[:19]


@app.command()
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
    from expflow_flows.governance.ledger import Ledger
    from expflow_flows.metrics.compare import rank
    from expflow_flows.metrics.gates import parse_gates
    from expflow_flows.metrics.registry import load_registry

    try:
        gates = parse_gates(list(gate or []))
        if source == "ledger":
            rows = Ledger().list(state=state or None, name=name, limit=None)
        elif source == "clearml":
            if not project:
                raise ExpflowError("--source clearml needs --project (a ClearML project name)")
            from expflow_flows.integrations.clearml import read_tasks

            rows = read_tasks(project, tags=list(tag or []))
            rows = [r for r in rows if name is None or r.name == name]
        else:
            raise ExpflowError(f"--source {source!r}: expected ledger or clearml")
        direction = None if ascending is None else ("minimize" if ascending else "maximize")
        ranking = rank(rows, metric, registry=load_registry(), direction=direction, gates=gates)
    except ExpflowError as exc:
        fail(str(exc))
        return
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


@audit_app.command("validate")
def audit_validate(
    experiment: str = typer.Argument(
        ..., help="Experiment id from the ledger (or a unique prefix)."
    ),
    rules: str | None = typer.Option(None, help="Audit rules YAML (primary, required_params)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Audit one experiment; exit 1 when any check fails."""
    from expflow_flows.flows.audit import audit_reports

    try:
        (report,) = audit_reports([experiment], rules=rules)
    except ExpflowError as exc:
        fail(str(exc))
        return
    _print_audits([report], json_out)


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

    try:
        reports = audit_reports(None, state=state or None, rules=rules, limit=limit)
    except ExpflowError as exc:
        fail(str(exc))
        return
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


@sweep_app.command("run")
def sweep_run(
    config: Path | None = typer.Option(None, help="Sweep config YAML (see deployments/)."),
    name: str | None = typer.Option(None, help="Sweep name (its folder and cache)."),
    trainable: str | None = typer.Option(None, help="module:function or script path."),
    space: str | None = typer.Option(None, help="Sweep space YAML file."),
    workers: int | None = typer.Option(None, help="Dask workers of the local cluster."),
    dask_address: str | None = typer.Option(None, help="Use an existing Dask scheduler."),
    force: bool = typer.Option(False, help="Run every combination again, cached or not."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Any sweep setting as key=YAML, e.g. resources='{memory: 2GB}'."
    ),
    port: int = typer.Option(4200, help="Local Prefect server port."),
    server: bool = typer.Option(False, help="Start (or reuse) a local Prefect server."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run a sweep: every combination of a space, cached and resumable."""
    overrides: dict[str, Any] = {
        "name": name,
        "trainable": trainable,
        "space": space,
        "workers": workers,
        "dask_address": dask_address,
        "force": True if force else None,
    }
    try:
        overrides.update(_parse_settings(set_ or []))
        from expflow_flows.integrations.tracking import check_settings
        from expflow_flows.sweep.config import build_sweep_config

        # Bad settings or a missing tracking SDK: one line, before anything starts.
        check_settings(build_sweep_config(config, **overrides).tracking)
        api = _ensure_server(port, server)
        from expflow_flows.flows.sweep import sweep

        summary = sweep(config=str(config) if config else None, **overrides)
    except ExpflowError as exc:
        fail(str(exc))
        return
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


def _sweep_dir(name: str) -> Path:
    from expflow_flows.home import runs_root

    d = runs_root() / name
    if not (d / "results.sqlite").exists():
        raise ExpflowError(f"no sweep named {name!r} under {runs_root()}")
    return d


@sweep_app.command("status")
def sweep_status(name: str = typer.Argument(..., help="Sweep name.")) -> None:
    """Counts by status of a sweep, running or finished, read from its results store."""
    from expflow_flows.sweep.store import ResultStore

    try:
        d = _sweep_dir(name)
        counts = ResultStore(d / "results.sqlite", create=False).counts()
        meta = (
            json.loads((d / "metadata.json").read_text()) if (d / "metadata.json").exists() else {}
        )
    except ExpflowError as exc:
        fail(str(exc))
        return
    total = meta.get("combinations")
    done = sum(counts.values())
    typer.echo(
        f"{name}: {done}/{total or '?'} rows: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    typer.echo(f"status page: {d / 'status.html'}")


@sweep_app.command("results")
def sweep_results(
    name: str = typer.Argument(..., help="Sweep name."),
    best: str | None = typer.Option(None, help="Show the best rows by this metric."),
    maximize: bool = typer.Option(False, help="Higher is better for --best."),
    n: int = typer.Option(10, help="How many best rows."),
    summary_by: list[str] | None = typer.Option(
        None,
        "--by",
        help="Summarise --best's metric by these params (mean, std, 95% CI across seeds).",
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
    from expflow_flows.sweep.results import SweepResults

    try:
        results = SweepResults.load(_sweep_dir(name))
        if csv_out:
            results.to_csv(csv_out)
            typer.echo(f"wrote {csv_out}")
        if parquet_out:
            results.to_parquet(parquet_out)
            typer.echo(f"wrote {parquet_out}")
        if best:
            if summary_by:
                for row in results.summary(best, by=list(summary_by)):
                    typer.echo(json.dumps(row, default=str))
            else:
                for row in results.best(best, maximize=maximize, n=n):
                    typer.echo(json.dumps(row, default=str))
        if png:
            from expflow_flows.sweep.report import export_png

            shot = export_png(_sweep_dir(name) / "dashboard.html", png)
            if shot is None:
                raise ExpflowError("no PNG written: no Chromium on PATH (apt-get install chromium)")
            typer.echo(f"wrote {shot}")
        if not (best or csv_out or parquet_out or png):
            typer.echo(json.dumps(results.status_counts()))
    except ExpflowError as exc:
        fail(str(exc))


@package_app.command("create")
def package_create(
    sweep_name: str | None = typer.Option(None, "--sweep", help="Package this sweep."),
    experiment: str | None = typer.Option(None, help="Package this ledger experiment."),
    out: Path = typer.Option(Path("."), help="Folder (or .tar.gz path) for the archive."),
    include_data_up_to_mb: float = typer.Option(
        10.0, help="Include input data files up to this size."
    ),
) -> None:
    """Package a sweep or an experiment: code, config, environment, data checksums, results."""
    from expflow_flows.bundles.package import package_experiment, package_sweep

    try:
        if bool(sweep_name) == bool(experiment):
            raise ExpflowError("give exactly one of --sweep NAME or --experiment ID")
        if sweep_name:
            path = package_sweep(
                _sweep_dir(sweep_name), out, include_data_up_to_mb=include_data_up_to_mb
            )
        else:
            path = package_experiment(experiment, out, include_data_up_to_mb=include_data_up_to_mb)
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(str(path))


@package_app.command("verify")
def package_verify(
    archive: Path = typer.Argument(..., help="A package (.tar.gz) or its folder."),
) -> None:
    """Check a package's integrity and how this environment differs; exit 1 when broken."""
    from expflow_flows.bundles.package import verify_package

    try:
        report = verify_package(archive)
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@package_app.command("reproduce")
def package_reproduce(
    archive: Path = typer.Argument(..., help="A package (.tar.gz) or its folder."),
    combos: str | None = typer.Option(
        None, help="Comma-separated run ids to re-run (default: all)."
    ),
    first: int | None = typer.Option(None, help="Re-run only the first N runs."),
    tolerance: float = typer.Option(1e-6, help="Relative tolerance for metrics."),
    workdir: Path | None = typer.Option(None, help="Where to unpack and re-run."),
) -> None:
    """Unpack safely, re-run chosen runs, compare metrics; exit 1 when any differs or fails."""
    from expflow_flows.bundles.package import reproduce

    try:
        report = reproduce(
            archive,
            combos=[c for c in (combos or "").split(",") if c] or None,
            first=first,
            tolerance=tolerance,
            workdir=workdir,
        )
    except ExpflowError as exc:
        fail(str(exc))
        return
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the versions of expflow-flows and the engines it drives."""
    from expflow_flows.runs.metadata import package_versions

    for name, ver in package_versions().items():
        typer.echo(f"{name} {ver}")


@system_app.command("status")
def system_status(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Prefect API, Dask, Optuna storage, ledger, PIN, ClearML, Langfuse and Slurm: installed and reachable?"""
    from expflow_flows.system import status_rows

    rows = status_rows()
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="expflow system status")
    for col in ("part", "state", "detail"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["part"], r["state"], r["detail"])
    Console().print(table)


@app.command("mcp")
def mcp_serve() -> None:
    """Serve research agents over the Model Context Protocol on stdio (the mcp extra)."""
    from expflow_flows.integrations.tracking import require_sdk

    try:
        require_sdk("mcp", "mcp", "expflow mcp")
    except ExpflowError as exc:
        fail(str(exc))
        return
    from expflow_flows.mcp.server import serve

    serve()


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
