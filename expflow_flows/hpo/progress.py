"""Progress events from long stages (HPO trials), for whoever shows them.

The HPO loop publishes; the CLI subscribes and draws a live display, and the pipeline
flow puts the counts on its own run (:mod:`expflow_flows.flows.progress`). With no
subscriber, publishing costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Listener = Callable[["TrialProgress"], None]
_listeners: list[Listener] = []


@dataclass
class TrialProgress:
    """Counts of an HPO stage's trials, this run and in the study as a whole."""

    study: str
    target: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    def counts(self) -> str:
        """The counts, e.g. ``trials 5/12: 3 complete, 1 pruned, 1 failed, 2 running``."""
        return (
            f"trials {self.finished}/{self.target}: {self.complete} complete, "
            f"{self.pruned} pruned, {self.failed} failed, {self.running} running"
        )

    def line(self) -> str:
        """One log line: the counts and the best value so far, e.g. ``…, 2 running, best 0.1``."""
        best = f", best {self.best_value:.4g}" if self.best_value is not None else ""
        return self.counts() + best


def subscribe(listener: Listener) -> Callable[[], None]:
    """Receive every update; returns a function that unsubscribes."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def publish(update: TrialProgress) -> None:
    """Send an update to every listener; a broken listener never breaks the run."""
    for listener in list(_listeners):
        try:
            listener(update)
        except Exception:  # noqa: BLE001, S112 - display problems must not stop the work
            continue
