"""``expflow pde …``: PDEBench's equations and synthetic data in its HDF5 layout."""

from __future__ import annotations

from pathlib import Path

import typer

from expflow_flows.errors import ExpflowError

pde_app = typer.Typer(
    help="PDEBench's equations and synthetic data in its HDF5 layout.", no_args_is_help=True
)


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
    typer.echo(str(path))
