"""Off-peak policies: when a run triggered now should start.

A policy names preferred windows (``22:00-08:00`` in a timezone, windows may
cross midnight), whether weekends count as off-peak all day, a maximum wait,
what to do past it (run anyway or fail), and an optional load check. The clock
and the load probe are injectable, so tests need no real waiting.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from expflow_flows.errors import ExpflowError

_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
ON_TIMEOUT = ("run", "fail")
STEP = dt.timedelta(minutes=1)


def _now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Window:
    """A daily window ``start``–``end`` (local time); ``end`` before ``start`` crosses midnight."""

    start: dt.time
    end: dt.time

    @classmethod
    def parse(cls, text: str) -> Window:
        """``'22:00-08:00'`` → Window; anything else is one clear error."""
        m = _WINDOW_RE.match(str(text))
        if not m:
            raise ExpflowError(
                f"off-peak window {text!r}: expected 'HH:MM-HH:MM' such as '22:00-08:00'"
            )
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ExpflowError(f"off-peak window {text!r}: hours 0-24 and minutes 0-59 expected")
        end = dt.time(0, 0) if h2 == 24 else dt.time(h2, m2)
        if dt.time(h1, m1) == end:
            raise ExpflowError(f"off-peak window {text!r} is empty: start and end are equal")
        return cls(dt.time(h1, m1), end)

    def contains(self, t: dt.time) -> bool:
        """Whether the local time ``t`` falls in the window (start inclusive, end exclusive)."""
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class Decision:
    """What to do with a run triggered at ``now``."""

    action: str  # "run" now, "wait" until start_at, or "fail"
    start_at: dt.datetime
    reason: str


@dataclass(frozen=True)
class OffPeakPolicy:
    """Preferred windows, weekends, a maximum wait and a load check."""

    windows: tuple[Window, ...] = (Window(dt.time(22, 0), dt.time(8, 0)),)
    timezone: str = "UTC"
    weekends: bool = True
    max_wait: dt.timedelta | None = dt.timedelta(hours=24)
    on_timeout: str = "run"
    max_load: float | None = None  # fraction of CPUs busy above which "off-peak" is not free
    clock: Callable[[], dt.datetime] = field(default=_now_utc, compare=False, repr=False)
    load: Callable[[], float] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **injected: Any) -> OffPeakPolicy:
        """From config: ``{windows: ['22:00-08:00'], timezone, weekends, max_wait_hours, on_timeout, max_load}``."""
        allowed = {"windows", "timezone", "weekends", "max_wait_hours", "on_timeout", "max_load"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ExpflowError(
                f"off-peak setting {unknown[0]!r} is not known; accepted: {', '.join(sorted(allowed))}"
            )
        windows = data.get("windows", ["22:00-08:00"])
        if isinstance(windows, str):
            windows = [windows]
        if not windows:
            raise ExpflowError("off-peak windows are empty: expected at least one 'HH:MM-HH:MM'")
        hours = data.get("max_wait_hours", 24)
        if hours is not None and (not isinstance(hours, (int, float)) or hours < 0):
            raise ExpflowError(
                f"max_wait_hours={hours!r}: expected a number of hours >= 0, or null"
            )
        policy = cls(
            windows=tuple(Window.parse(w) for w in windows),
            timezone=str(data.get("timezone", "UTC")),
            weekends=bool(data.get("weekends", True)),
            max_wait=None if hours is None else dt.timedelta(hours=float(hours)),
            on_timeout=str(data.get("on_timeout", "run")),
            max_load=data.get("max_load"),
            **injected,
        )
        policy.validate()
        return policy

    def validate(self) -> None:
        """Refuse a timezone, on_timeout or max_load that cannot work."""
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ExpflowError(
                f"timezone {self.timezone!r} is not known; expected an IANA name such as 'Europe/Berlin'"
            ) from None
        if self.on_timeout not in ON_TIMEOUT:
            raise ExpflowError(
                f"on_timeout={self.on_timeout!r}: expected one of {', '.join(ON_TIMEOUT)}"
            )
        if self.max_load is not None and not 0 < float(self.max_load) <= 1:
            raise ExpflowError(f"max_load={self.max_load!r}: expected a fraction in (0, 1]")

    def is_off_peak(self, when: dt.datetime) -> bool:
        """Whether ``when`` (aware) is in a window, or on a weekend when weekends count."""
        local = when.astimezone(ZoneInfo(self.timezone))
        if self.weekends and local.weekday() >= 5:
            return True
        return any(w.contains(local.time()) for w in self.windows)

    def next_start(self, after: dt.datetime) -> dt.datetime:
        """The first off-peak minute at or after ``after`` (within 8 days)."""
        local = after.astimezone(ZoneInfo(self.timezone))
        if self.is_off_peak(local):
            return after
        # Window edges are whole minutes: step to the next minute, then minute by minute.
        t = local.replace(second=0, microsecond=0) + STEP
        for _ in range(8 * 24 * 60):
            if self.is_off_peak(t):
                return t.astimezone(after.tzinfo or dt.UTC)
            t += STEP
        raise ExpflowError("no off-peak time within 8 days: check the windows")

    def decide(self, triggered_at: dt.datetime | None = None) -> Decision:
        """Run now, wait until the window opens, or (past the maximum wait) run anyway or fail."""
        now = self.clock()
        triggered_at = triggered_at or now
        busy = self.load() if (self.load is not None and self.max_load is not None) else None
        if self.is_off_peak(now):
            if busy is not None and busy > float(self.max_load):
                return self._bounded(
                    now,
                    triggered_at,
                    now + dt.timedelta(minutes=15),
                    f"off-peak, but load {busy:.0%} is above {float(self.max_load):.0%}",
                )
            return Decision("run", now, "inside the off-peak window")
        start = self.next_start(now)
        return self._bounded(
            now, triggered_at, start, f"peak hours; off-peak from {self.shown(start)}"
        )

    def shown(self, when: dt.datetime) -> str:
        """A time as the policy's users read it: in its timezone, named."""
        local = when.astimezone(ZoneInfo(self.timezone))
        return f"{local:%Y-%m-%d %H:%M} {self.timezone}"

    def _bounded(
        self, now: dt.datetime, triggered_at: dt.datetime, start: dt.datetime, why: str
    ) -> Decision:
        if self.max_wait is None or start - triggered_at <= self.max_wait:
            return Decision("wait", start, why)
        deadline = triggered_at + self.max_wait
        if self.on_timeout == "fail":
            return Decision("fail", now, f"{why}; that is past the maximum wait of {self.max_wait}")
        if now >= deadline:
            return Decision("run", now, f"{why}; the maximum wait of {self.max_wait} is over")
        return Decision("wait", deadline, f"{why}; runs at the end of the maximum wait instead")
