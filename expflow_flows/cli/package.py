"""``expflow package …``: reproducibility packages of sweeps and experiments."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from expflow_flows.errors import ExpflowError

package_app = typer.Typer(
    help="Reproducibility packages: create, verify, reproduce.", no_args_is_help=True
)


@package_app.command("create")
def package_create(
    sweep_name: str | None = typer.Option(None, "--sweep", help="Package this sweep."),
    experiment: str | None = typer.Option(None, help="Package this ledger experiment."),
    out: Path = typer.Option(Path("."), help="Folder (or .tar.gz path) for the archive."),
    include_data_up_to_mb: float = typer.Option(
        10.0, help="Include input data files up to this size."
    ),
    sign_key_env: str | None = typer.Option(
        None,
        help="Sign the manifest with the team key in this environment variable "
        "(default: EXPFLOW_PACKAGE_KEY when set).",
    ),
) -> None:
    """Package a sweep or an experiment: code, config, environment, data checksums, results."""
    from expflow_flows.actions import sweep_folder
    from expflow_flows.bundles.package import package_experiment, package_sweep

    key = None
    if sign_key_env is not None:
        key = os.environ.get(sign_key_env)
        if not key:
            raise ExpflowError(
                f"environment variable {sign_key_env!r} is not set or empty; --sign-key-env "
                "expects the name of a variable holding the team's package key"
            )
    if bool(sweep_name) == bool(experiment):
        raise ExpflowError("give exactly one of --sweep NAME or --experiment ID")
    if sweep_name:
        path = package_sweep(
            sweep_folder(sweep_name),
            out,
            include_data_up_to_mb=include_data_up_to_mb,
            sign_key=key,
        )
    else:
        path = package_experiment(
            experiment, out, include_data_up_to_mb=include_data_up_to_mb, sign_key=key
        )
    typer.echo(str(path))


@package_app.command("verify")
def package_verify(
    archive: Path = typer.Argument(..., help="A package (.tar.gz) or its folder."),
) -> None:
    """Check a package's integrity and how this environment differs; exit 1 when broken."""
    from expflow_flows.bundles.package import verify_package

    report = verify_package(archive)
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
    trust_modified: bool = typer.Option(
        False,
        "--trust-modified",
        help="Run a package that fails verification (changed since it was made) anyway.",
    ),
) -> None:
    """Unpack safely, verify, re-run chosen runs, compare metrics; exit 1 when any differs or
    fails. A package that fails verification runs nothing unless --trust-modified."""
    from expflow_flows.bundles.package import reproduce

    def warn(problems: list[str]) -> None:
        typer.echo(
            f"warning: running a MODIFIED package (--trust-modified): {len(problems)} "
            f"verification problem(s) overridden, the first: {problems[0]}",
            err=True,
        )

    report = reproduce(
        archive,
        combos=[c for c in (combos or "").split(",") if c] or None,
        first=first,
        tolerance=tolerance,
        workdir=workdir,
        trust_modified=trust_modified,
        on_trusted=warn,
    )
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)
