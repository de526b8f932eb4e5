"""A background tick: a function called every few seconds while something runs."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Ticker:
    """Calls ``tick()`` every ``every`` seconds in a daemon thread until :meth:`stop`.

    A tick that raises is skipped, not fatal: what it polls (a half-written file, a busy
    storage) is tried again at the next one.
    """

    def __init__(self, every: float, tick: Callable[[], None], name: str) -> None:
        self.every, self.tick = every, tick
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def start(self) -> Ticker:
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - tried again at the next tick
                continue

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
