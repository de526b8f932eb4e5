"""The experiment lifecycle: states, events and the legal moves between them (on fysom).

====================  ==========================================  ==============
event                 from                                        to
====================  ==========================================  ==============
``enqueue``           DRAFT                                       ENQUEUED
``start``             ENQUEUED, DRAFT                             RUNNING
``complete``          RUNNING                                     COMPLETED
``fail``              RUNNING, ENQUEUED, CANCEL_PENDING           FAILED
``request_cancel``    ENQUEUED, RUNNING                           CANCEL_PENDING
``cancel``            CANCEL_PENDING, ENQUEUED, DRAFT             CANCELLED
``retry``             FAILED, CANCELLED                           ENQUEUED
====================  ==========================================  ==============

``start`` from DRAFT is for runs started directly from Python or the CLI,
without a queue. ``_TABLE`` in this module is the one definition; it is handed to
:class:`fysom.Fysom`, which decides every move.
"""

from __future__ import annotations

import functools
from collections import deque

from fysom import Fysom

from expflow_flows.errors import ExpflowError

DRAFT = "DRAFT"
ENQUEUED = "ENQUEUED"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCEL_PENDING = "CANCEL_PENDING"
CANCELLED = "CANCELLED"

STATES: tuple[str, ...] = (
    DRAFT,
    ENQUEUED,
    RUNNING,
    COMPLETED,
    FAILED,
    CANCEL_PENDING,
    CANCELLED,
)

# (event, sources, destination): the lifecycle's one definition, given to fysom.
_TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("enqueue", (DRAFT,), ENQUEUED),
    ("start", (ENQUEUED, DRAFT), RUNNING),
    ("complete", (RUNNING,), COMPLETED),
    ("fail", (RUNNING, ENQUEUED, CANCEL_PENDING), FAILED),
    ("request_cancel", (ENQUEUED, RUNNING), CANCEL_PENDING),
    ("cancel", (CANCEL_PENDING, ENQUEUED, DRAFT), CANCELLED),
    ("retry", (FAILED, CANCELLED), ENQUEUED),
)

EVENTS: tuple[str, ...] = tuple(name for name, _, _ in _TABLE)


class IllegalTransition(ExpflowError):
    """An event the lifecycle does not allow from the experiment's current state."""


# The order path_to tries events in: on a tie it takes the path through a run, since a
# DRAFT experiment that an outside run follows was started directly, never queued.
_SEARCH_ORDER: tuple[str, ...] = (
    "start",
    "complete",
    "fail",
    "request_cancel",
    "cancel",
    "retry",
    "enqueue",
)

# Over: no run is in progress. FAILED and CANCELLED can still be retried.
TERMINAL_STATES: frozenset[str] = frozenset({COMPLETED, FAILED, CANCELLED})


def _machine(state: str) -> Fysom:
    # A fresh machine per question: a Fysom object holds one current state and
    # is not thread-safe, while these functions are called from many threads.
    return Fysom(
        initial=state,
        events=[{"name": name, "src": list(src), "dst": dst} for name, src, dst in _TABLE],
    )


def check_state(state: object) -> str:
    """Return ``state`` in canonical (upper-case) form; an unknown state is an ExpflowError."""
    name = state.strip().upper() if isinstance(state, str) else None
    if name not in STATES:
        raise ExpflowError(
            f"experiment state {state!r} is not known; expected one of {', '.join(STATES)}"
        )
    return name


def check_event(event: object) -> str:
    """Return ``event`` in canonical (lower-case) form; an unknown event is an ExpflowError."""
    name = event.strip().lower() if isinstance(event, str) else None
    if name not in EVENTS:
        raise ExpflowError(
            f"experiment event {event!r} is not known; expected one of {', '.join(EVENTS)}"
        )
    return name


@functools.cache
def _allowed(state: str) -> tuple[str, ...]:
    machine = _machine(state)
    return tuple(event for event in EVENTS if machine.can(event))


def allowed_events(state: str) -> list[str]:
    """The events that may be applied to an experiment in ``state``, in :data:`EVENTS` order."""
    return list(_allowed(check_state(state)))


@functools.cache
def _next(state: str, event: str) -> str:
    machine = _machine(state)
    if not machine.can(event):
        allowed = ", ".join(_allowed(state)) or "none (it is final)"
        raise IllegalTransition(
            f"cannot {event} an experiment in state {state}; allowed from {state}: {allowed}"
        )
    getattr(machine, event)()
    return str(machine.current)


def next_state(state: str, event: str) -> str:
    """The state ``event`` moves ``state`` to.

    An illegal move raises :class:`IllegalTransition` (an ExpflowError) naming the allowed events.
    """
    return _next(check_state(state), check_event(event))


def is_terminal(state: str) -> bool:
    """True for COMPLETED, FAILED and CANCELLED: no run is in progress (the last two can be retried)."""
    return check_state(state) in TERMINAL_STATES


@functools.cache
def _path(state: str, target: str) -> tuple[str, ...] | None:
    # Breadth-first, so the path is the shortest; a fixed event order makes ties
    # always resolve the same way.
    seen = {state}
    queue: deque[tuple[str, tuple[str, ...]]] = deque([(state, ())])
    while queue:
        current, path = queue.popleft()
        if current == target:
            return path
        for event in (e for e in _SEARCH_ORDER if e in _allowed(current)):
            nxt = _next(current, event)
            if nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, (*path, event)))
    return None


def path_to(state: str, target: str) -> list[str]:
    """The shortest list of events that moves ``state`` to ``target`` (empty when equal).

    Used to follow an outside run's state (Prefect's), e.g. DRAFT to COMPLETED is
    ``[start, complete]``. No path raises :class:`IllegalTransition`.
    """
    src, dst = check_state(state), check_state(target)
    path = _path(src, dst)
    if path is None:
        raise IllegalTransition(
            f"cannot move an experiment from {src} to {dst}: no sequence of events leads there"
            f"; allowed from {src}: {', '.join(_allowed(src)) or 'none (it is final)'}"
        )
    return list(path)
