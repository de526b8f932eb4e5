"""A running sweep's state: this space's results, its progress counts as combinations
finish, and the live status page kept current.

Progress is published to whoever shows it (the CLI's bar, a flow's progress artifact);
with no subscriber, publishing costs nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from expflow_flows.sweep.report import write_status_page
from expflow_flows.sweep.results import SweepResults
from expflow_flows.sweep.store import ResultStore

# Statuses that let a chain of steps go on; any other ends its combination.
_GOES_ON = ("ok", "warning")


def current_results(store: ResultStore, keys: set[str]) -> SweepResults:
    """This space's results: rows of earlier code versions or settings stay in the store as history."""
    return SweepResults([r for r in store.rows() if r["key"] in keys])


def duration(seconds: float) -> str:
    """A short human duration: ``42s``, ``3m05s``, ``2h07m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class SweepProgress:
    """Counts of the combinations this sweep run has finished, by status, and its pace."""

    name: str
    to_run: int
    cached: int = 0
    ok: int = 0
    warning: int = 0
    failed: int = 0
    other: dict[str, int] = field(default_factory=dict)  # pruned, killed, ...
    elapsed_s: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + self.warning + self.failed + sum(self.other.values())

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.to_run if self.to_run else 100.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far; None before the first combination finished."""
        if not self.done:
            return None
        return self.elapsed_s / self.done * max(0, self.to_run - self.done)

    def counts(self) -> str:
        """``5 ok, 1 warning, 2 failed`` (other statuses only when there are some)."""
        shown = {"ok": self.ok, "warning": self.warning, "failed": self.failed, **self.other}
        return ", ".join(f"{n} {status}" for status, n in shown.items() if n or status in _SHOWN)

    def pace(self) -> str:
        """``12s elapsed, ETA 30s``, or ``done in 41s`` at the end."""
        if self.done >= self.to_run:
            return f"done in {duration(self.elapsed_s)}"
        eta = self.eta_s
        return f"{duration(self.elapsed_s)} elapsed, ETA {'?' if eta is None else duration(eta)}"

    def line(self) -> str:
        """One line, e.g. ``sweep grid: 40/108 (37%): 38 ok, 1 warning, 1 failed; 12s
        elapsed, ETA 20s``."""
        cached = f" ({self.cached} cached)" if self.cached else ""
        return (
            f"sweep {self.name}: {self.done}/{self.to_run}{cached} ({self.percent:.0f}%): "
            f"{self.counts()}; {self.pace()}"
        )


_SHOWN = ("ok", "warning", "failed")

Listener = Callable[[SweepProgress], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Receive every sweep progress update; returns a function that unsubscribes."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def publish(update: SweepProgress) -> None:
    """Send an update to every listener; a broken listener never breaks the sweep."""
    for listener in list(_listeners):
        try:
            listener(update)
        except Exception:  # noqa: BLE001, S112 - display problems must not stop the work
            continue


class ProgressTally:
    """The results store as a sweep run records into it: each combination counts once its
    last row arrives (its last step, or the step that ended its chain), and every change
    is published (and handed to ``on_update``)."""

    def __init__(
        self,
        store: ResultStore,
        name: str,
        pending: Iterable[Mapping[str, Any]],
        last_step: str,
        *,
        cached: int = 0,
        on_update: Listener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.last_step, self.on_update, self.clock = store, last_step, on_update, clock
        self._open = {plan["combo_id"] for plan in pending}
        self._progress = SweepProgress(name, len(self._open), cached)
        self._started = clock()
        self._lock = threading.Lock()
        self._send(self.progress())

    def progress(self) -> SweepProgress:
        """The counts now (a copy)."""
        with self._lock:
            return replace(
                self._progress,
                other=dict(self._progress.other),
                elapsed_s=self.clock() - self._started,
            )

    def record_many(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Record rows in the store, then count the combinations they finish."""
        rows = list(rows)
        written = self.store.record_many(rows)
        finished = False
        with self._lock:
            p = self._progress
            for row in rows:
                combo, status = row.get("combo_id"), str(row.get("status") or "failed")
                if combo not in self._open:
                    continue
                if row.get("step") != self.last_step and status in _GOES_ON:
                    continue  # the chain goes on
                self._open.discard(combo)
                finished = True
                if status in _SHOWN:
                    setattr(p, status, getattr(p, status) + 1)
                else:
                    p.other[status] = p.other.get(status, 0) + 1
        if finished:
            self._send(self.progress())
        return written

    def _send(self, update: SweepProgress) -> None:
        publish(update)
        if self.on_update is not None:
            try:
                self.on_update(update)
            except Exception:  # noqa: BLE001 - reporting must not stop the sweep
                pass


class StatusWriter:
    """Rewrites the live status page every few seconds while the sweep runs; the page
    reloads itself until the final write.

    ``rerun`` names the combinations this run runs (again): their rows recorded before
    it started are an earlier run's, so the live page shows them as still to do.
    """

    def __init__(
        self,
        store: ResultStore,
        keys: set[str],
        path: Path,
        title: str,
        total: int,
        every: float,
        rerun: Iterable[str] = (),
    ):
        self.store, self.keys, self.path = store, keys, path
        self.title, self.total, self.every = title, total, every
        self.rerun = set(rerun)
        self.since = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _write(self, refresh: int | None) -> None:
        rows = [
            r
            for r in self.store.rows()
            if r["key"] in self.keys
            and (
                refresh is None
                or r["combo_id"] not in self.rerun
                or float(r["recorded_at"] or 0) >= self.since
            )
        ]
        write_status_page(
            SweepResults(rows).rows,
            self.path,
            title=self.title,
            total=self.total,
            refresh_s=refresh,
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._write(max(2, int(self.every)))
            except Exception:  # noqa: BLE001, S112 - a status page must never stop the sweep
                continue

    def __enter__(self) -> StatusWriter:
        self._write(max(2, int(self.every)))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._write(None)
