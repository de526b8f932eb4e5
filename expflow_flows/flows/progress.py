"""Live progress on a flow run: a Prefect progress artifact kept current with few API calls,
and the HPO stage's trials carried on the pipeline's own run.

Updates may come as fast as work finishes (thousands of sweep combinations); the API sees
at most one every ``EXPFLOW_PROGRESS_EVERY_S`` seconds (default 2), the latest always
within that delay, and the last one when the work ends.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from expflow_flows.errors import ExpflowError
from expflow_flows.hpo import progress as trials
from expflow_flows.runs.ticker import Ticker

EVERY_ENV = "EXPFLOW_PROGRESS_EVERY_S"
ARTIFACT_EVERY_S = 2.0
# A log line on the pipeline run for finished trials: the first, the last, and in between
# at most one this often (the nested hpo run logs every trial).
LOG_EVERY_S = 30.0
_MAX_DESCRIPTION = 500

log = logging.getLogger(__name__)


def progress_every_s(default: float) -> float:
    """Seconds between progress updates: ``EXPFLOW_PROGRESS_EVERY_S`` when set, else ``default``."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ExpflowError(f"{EVERY_ENV}={raw!r} is not usable; expected seconds >= 0, e.g. 2")
    return value


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:100]


class LiveProgress:
    """A progress artifact on the current flow run. :meth:`show` may be called from any
    thread as often as wanted; a background tick sends what changed, and :meth:`close`
    sends the last value."""

    def __init__(self, key: str, description: str) -> None:
        self.every = progress_every_s(ARTIFACT_EVERY_S)
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        self._sent: tuple[float, str] = (0.0, description)
        self._latest = self._sent
        self._lock = threading.Lock()
        # The tick thread talks to the API this flow run uses (a context setting).
        context = contextvars.copy_context()
        self._ticker = Ticker(
            max(self.every, 0.05), lambda: context.run(self._flush), f"expflow-progress-{key}"
        ).start()

    def show(self, percent: float, description: str) -> None:
        """The progress now (0-100) and one line saying what it counts."""
        with self._lock:
            self._latest = (min(100.0, max(0.0, float(percent))), description[:_MAX_DESCRIPTION])

    def _flush(self) -> None:
        with self._lock:
            latest = self._latest
        if latest != self._sent:
            update_progress_artifact(self.id, latest[0], latest[1])
            self._sent = latest

    def close(self) -> None:
        """Stop the tick and send the last value."""
        self._ticker.stop()
        try:
            self._flush()
        except Exception as exc:  # noqa: BLE001 - progress must not fail the work it shows
            log.warning("progress artifact %s not updated: %s", self.id, exc)


def _trial_text(experiment: str, p: trials.TrialProgress, objective: str) -> str:
    text = f"HPO {experiment}: {p.counts()}"
    if p.best_value is not None:
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.best_params.items()
        )
        text += f"; best {objective} = {p.best_value:.4g}" + (f" ({params})" if params else "")
    return text


class _TrialLog:
    """Log lines for finished trials: the first and the last, and at most one in between
    every ``LOG_EVERY_S`` seconds."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.start: int | None = None
        self.logged = 0
        self.at = -math.inf

    def __call__(self, p: trials.TrialProgress, text: str) -> None:
        if self.start is None:
            self.start = self.logged = p.finished  # a resumed study's earlier trials
            return
        now = time.monotonic()
        if p.finished == self.logged:
            return
        if p.finished >= p.target or self.logged == self.start or now - self.at >= LOG_EVERY_S:
            self.logger.info("%s", text)
            self.logged, self.at = p.finished, now


@contextmanager
def trial_progress(experiment: str, study: str, objective: str) -> Iterator[None]:
    """While the HPO stage runs, its trial counts and best value so far on this flow run: a
    progress artifact ``<experiment>-hpo-progress`` and log lines as trials finish."""
    live = LiveProgress(
        artifact_key(experiment, "hpo-progress"), f"HPO {experiment}: no trial finished yet"
    )
    line = _TrialLog(get_run_logger())  # bound to this run, not the nested hpo run

    def on_update(p: trials.TrialProgress) -> None:
        if p.study != study:
            return  # another pipeline in this process
        text = _trial_text(experiment, p, objective)
        live.show(100.0 * p.finished / p.target if p.target else 100.0, text)
        line(p, text)

    unsubscribe = trials.subscribe(on_update)
    try:
        yield
    finally:
        unsubscribe()
        live.close()
