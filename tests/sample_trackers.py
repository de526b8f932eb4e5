"""Tracking adapters for tests: one that records every event, one that breaks."""

from __future__ import annotations

from expflow_flows.integrations.tracking import Tracker

EVENTS: list[tuple[str, object]] = []


class Recorder(Tracker):
    name = "recorder"

    def __init__(self, label: str = "default"):
        self.label = label

    def run_started(self, context):
        EVENTS.append(("started", context))

    def record(self, step):
        EVENTS.append(("record", step))

    def run_finished(self, status, metrics, artifacts, message=""):
        EVENTS.append(("finished", (status, dict(metrics), dict(artifacts), message)))

    def close(self):
        EVENTS.append(("closed", self.label))


class Broken(Tracker):
    name = "broken"

    def record(self, step):
        raise ConnectionError("tracking server went away")


class ComboRecorder(Recorder):
    """Asks for every sweep combination, as ClearML's table does."""

    name = "combos"
    wants_combinations = True
