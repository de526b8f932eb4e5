"""Live progress for the commands that run work: HPO trials and sweep combinations.

On a terminal, a rich progress bar on stderr. Elsewhere (CI logs, a pipe) a bar would be
noise: HPO trials are in the flow's own log lines, and a sweep prints one short line at
most every ``EXPFLOW_PROGRESS_EVERY_S`` seconds (default 5) and its last one. stdout
stays for the summary (or ``--json``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import typer

from expflow_flows.sweep.status import SweepProgress, duration

LINE_EVERY_S = 5.0

Unsubscribe = Callable[[], None]


class _PrintAbove:
    """Stands in for a log handler's rich console while a bar is live: renders a line as
    that console would (its colours), then prints it through the bar's console, above the
    bar, instead of writing through it."""

    def __init__(self, own: Any, live: Any) -> None:
        self.own, self.live = own, live

    def print(self, *objects: Any, **kwargs: Any) -> None:
        from rich.text import Text

        with self.own.capture() as captured:
            self.own.print(*objects, **kwargs)
        self.live.print(Text.from_ansi(captured.get().rstrip("\n")), soft_wrap=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.own, name)


@contextlib.contextmanager
def _live(bar: Any) -> Iterator[None]:
    """The bar on screen, with Prefect's console log lines printed above it (its handlers
    hold the stderr they found at start-up, and would draw through the bar)."""
    with bar:
        swapped = []
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", []):
                own = getattr(handler, "console", None)  # Prefect's PrefectConsoleHandler
                if own is not None and not isinstance(own, _PrintAbove):
                    handler.console = _PrintAbove(own, bar.console)
                    swapped.append((handler, own))
        try:
            yield
        finally:
            for handler, own in swapped:
                handler.console = own


def hpo_display() -> tuple[Any, Unsubscribe]:
    """A rich live display of HPO trials (nothing off a terminal), fed by
    :mod:`expflow_flows.hpo.progress`; returns it and the function that unsubscribes it."""
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

    return (_live(bar) if console.is_terminal else bar), prog.subscribe(on_update)


class SweepLines:
    """Sweep progress as log lines: one at most every ``every`` seconds, and the last."""

    def __init__(
        self,
        write: Callable[[str], None],
        every: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.write, self.every, self.clock = write, every, clock
        self._at = clock()
        self._done = 0
        self._lock = threading.Lock()

    def show(self, p: SweepProgress) -> None:
        """Print ``p`` as a line if it is news and the last line is old enough (or it is the end)."""
        with self._lock:
            now = self.clock()
            end = p.done >= p.to_run
            if p.done == self._done or (not end and now - self._at < self.every):
                return
            self._at, self._done = now, p.done
        self.write(p.line())


def sweep_display() -> tuple[Any, Unsubscribe]:
    """A live display of a sweep's combinations (a bar on a terminal, lines elsewhere), fed
    by :mod:`expflow_flows.sweep.status`; returns it and the function that unsubscribes it."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from expflow_flows.flows.progress import progress_every_s
    from expflow_flows.sweep import status

    every = progress_every_s(LINE_EVERY_S)  # a bad value is one line before anything starts
    console = Console(stderr=True)
    if not console.is_terminal:
        lines = SweepLines(lambda line: typer.echo(line, err=True), every)
        return contextlib.nullcontext(), status.subscribe(lines.show)
    bar = Progress(
        TextColumn("[bold]sweep[/bold] {task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
        redirect_stderr=True,
        redirect_stdout=True,
    )
    ids: dict[str, Any] = {}

    def on_update(p: SweepProgress) -> None:
        counts = (
            f"[green]{p.ok} ok[/] · [yellow]{p.warning} warning[/] · [red]{p.failed} failed[/]"
            + "".join(f" · {n} {escape(s)}" for s, n in p.other.items() if n)
        )
        eta = "?" if p.eta_s is None else duration(p.eta_s)
        if p.name not in ids:
            ids[p.name] = bar.add_task(
                "", total=p.to_run, name=escape(p.name), counts=counts, eta=eta
            )
        bar.update(ids[p.name], completed=p.done, counts=counts, eta=eta)

    return _live(bar), status.subscribe(on_update)
