"""Off-peak policies on a simulated clock: no real waiting."""

from __future__ import annotations

import datetime as dt

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.governance.offpeak import OffPeakPolicy, Window

BERLIN = dt.timezone(dt.timedelta(hours=1))  # November: CET, UTC+1


def at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    """A time in Berlin in November 2026 (the 23rd is a Monday)."""
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=BERLIN)


def policy(now: dt.datetime, **kw) -> OffPeakPolicy:
    data = {"windows": ["22:00-08:00"], "timezone": "Europe/Berlin", "weekends": True, **kw}
    return OffPeakPolicy.from_dict(data, clock=lambda: now)


def test_a_run_triggered_at_14_starts_at_22():
    decision = policy(at(23, 14)).decide()
    assert decision.action == "wait"
    assert decision.start_at == at(23, 22)


def test_inside_the_window_runs_now_across_midnight():
    assert policy(at(23, 23, 30)).decide().action == "run"
    assert policy(at(24, 7, 59)).decide().action == "run"
    assert policy(at(24, 8, 0)).decide().action == "wait"


def test_weekends_are_off_peak_all_day_when_preferred():
    saturday_noon = at(28, 12)
    assert policy(saturday_noon).decide().action == "run"
    assert policy(saturday_noon, weekends=False).decide().start_at == at(28, 22)
    # Friday afternoon waits for Friday night, not for Saturday.
    assert policy(at(27, 15)).decide().start_at == at(27, 22)


def test_maximum_wait_runs_anyway_or_fails():
    waited = policy(at(23, 14), max_wait_hours=2).decide()
    assert (waited.action, waited.start_at) == ("wait", at(23, 16))
    late = policy(at(23, 16, 1), max_wait_hours=2).decide(triggered_at=at(23, 14))
    assert late.action == "run" and "maximum wait" in late.reason
    failed = policy(at(23, 14), max_wait_hours=2, on_timeout="fail").decide()
    assert failed.action == "fail"


def test_a_busy_machine_defers_even_off_peak():
    busy = OffPeakPolicy.from_dict(
        {"windows": ["22:00-08:00"], "timezone": "Europe/Berlin", "max_load": 0.5},
        clock=lambda: at(23, 23),
        load=lambda: 0.9,
    )
    decision = busy.decide()
    assert decision.action == "wait" and "load 90%" in decision.reason
    idle = OffPeakPolicy.from_dict(
        {"windows": ["22:00-08:00"], "timezone": "Europe/Berlin", "max_load": 0.5},
        clock=lambda: at(23, 23),
        load=lambda: 0.1,
    )
    assert idle.decide().action == "run"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"windows": ["22-08"]}, "expected 'HH:MM-HH:MM'"),
        ({"windows": ["25:00-08:00"]}, "hours 0-24"),
        ({"windows": ["08:00-08:00"]}, "is empty"),
        ({"timezone": "Mars/Olympus"}, "timezone 'Mars/Olympus' is not known"),
        ({"on_timeout": "retry"}, "on_timeout='retry'"),
        ({"max_load": 2}, "max_load=2"),
        ({"window": ["22:00-08:00"]}, "off-peak setting 'window' is not known"),
        ({"max_wait_hours": -1}, "max_wait_hours=-1"),
    ],
)
def test_bad_policies_are_one_clear_error(data, needle):
    with pytest.raises(ExpflowError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        OffPeakPolicy.from_dict(data)


def test_window_parsing_and_containment():
    w = Window.parse("22:00-08:00")
    assert str(w) == "22:00-08:00"
    assert w.contains(dt.time(0, 0)) and not w.contains(dt.time(12, 0))
    day = Window.parse("09:00-17:00")
    assert day.contains(dt.time(9, 0)) and not day.contains(dt.time(17, 0))
