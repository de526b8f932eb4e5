"""A running sweep's state: this space's results, and the live status page kept current."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from expflow_flows.sweep.report import write_status_page
from expflow_flows.sweep.results import SweepResults
from expflow_flows.sweep.store import ResultStore


def current_results(store: ResultStore, keys: set[str]) -> SweepResults:
    """This space's results: rows of earlier code versions or settings stay in the store as history."""
    return SweepResults([r for r in store.rows() if r["key"] in keys])


class StatusWriter:
    """Rewrites the live status page every few seconds while the sweep runs."""

    def __init__(
        self, store: ResultStore, keys: set[str], path: Path, title: str, total: int, every: float
    ):
        self.store, self.keys, self.path = store, keys, path
        self.title, self.total, self.every = title, total, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _write(self, refresh: int | None) -> None:
        rows = current_results(self.store, self.keys).rows
        write_status_page(rows, self.path, title=self.title, total=self.total, refresh_s=refresh)

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
