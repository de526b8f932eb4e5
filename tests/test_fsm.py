"""The experiment lifecycle: every legal move, every illegal one, and paths between states."""

from __future__ import annotations

import itertools

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.governance import fsm

# Written out here, independently of the module's table, so a change there shows up.
LEGAL = {
    ("DRAFT", "enqueue"): "ENQUEUED",
    ("ENQUEUED", "start"): "RUNNING",
    ("DRAFT", "start"): "RUNNING",
    ("RUNNING", "complete"): "COMPLETED",
    ("RUNNING", "fail"): "FAILED",
    ("ENQUEUED", "fail"): "FAILED",
    ("CANCEL_PENDING", "fail"): "FAILED",
    ("ENQUEUED", "request_cancel"): "CANCEL_PENDING",
    ("RUNNING", "request_cancel"): "CANCEL_PENDING",
    ("CANCEL_PENDING", "cancel"): "CANCELLED",
    ("ENQUEUED", "cancel"): "CANCELLED",
    ("DRAFT", "cancel"): "CANCELLED",
    ("FAILED", "retry"): "ENQUEUED",
    ("CANCELLED", "retry"): "ENQUEUED",
}
ILLEGAL = [pair for pair in itertools.product(fsm.STATES, fsm.EVENTS) if pair not in LEGAL]


def test_states_and_events() -> None:
    assert fsm.STATES == (
        "DRAFT",
        "ENQUEUED",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCEL_PENDING",
        "CANCELLED",
    )
    assert set(fsm.EVENTS) == {
        "enqueue",
        "start",
        "complete",
        "fail",
        "request_cancel",
        "cancel",
        "retry",
    }


@pytest.mark.parametrize(("state", "event"), sorted(LEGAL))
def test_every_legal_transition(state: str, event: str) -> None:
    assert fsm.next_state(state, event) == LEGAL[(state, event)]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_transition_is_refused(state: str, event: str) -> None:
    with pytest.raises(fsm.IllegalTransition) as info:
        fsm.next_state(state, event)
    assert str(info.value).startswith(
        f"cannot {event} an experiment in state {state}; allowed from {state}: "
    )
    assert isinstance(info.value, ExpflowError)


def test_illegal_message_lists_allowed_events() -> None:
    with pytest.raises(
        ExpflowError,
        match=r"^cannot complete an experiment in state DRAFT; "
        r"allowed from DRAFT: enqueue, start, cancel$",
    ):
        fsm.next_state("DRAFT", "complete")
    with pytest.raises(ExpflowError, match=r"allowed from COMPLETED: none"):
        fsm.next_state("COMPLETED", "retry")


def test_allowed_events_match_the_table() -> None:
    for state in fsm.STATES:
        expected = {event for (src, event) in LEGAL if src == state}
        assert set(fsm.allowed_events(state)) == expected
    assert fsm.allowed_events("RUNNING") == ["complete", "fail", "request_cancel"]
    assert fsm.allowed_events("COMPLETED") == []


def test_terminal_states() -> None:
    assert {s for s in fsm.STATES if fsm.is_terminal(s)} == {"COMPLETED", "FAILED", "CANCELLED"}


def test_names_are_normalized_and_unknown_ones_refused() -> None:
    assert fsm.next_state("draft", "START") == "RUNNING"
    with pytest.raises(ExpflowError, match=r"state 'PAUSED' is not known; expected one of DRAFT, "):
        fsm.next_state("PAUSED", "start")
    with pytest.raises(ExpflowError, match=r"event 'resume' is not known; expected one of enqueue"):
        fsm.next_state("DRAFT", "resume")
    with pytest.raises(ExpflowError, match="is not known"):
        fsm.allowed_events(None)  # type: ignore[arg-type]
    with pytest.raises(ExpflowError, match="is not known"):
        fsm.is_terminal("done")


@pytest.mark.parametrize(
    ("state", "target", "events"),
    [
        ("DRAFT", "COMPLETED", ["start", "complete"]),
        ("DRAFT", "RUNNING", ["start"]),
        ("DRAFT", "ENQUEUED", ["enqueue"]),
        ("DRAFT", "FAILED", ["start", "fail"]),
        ("DRAFT", "CANCELLED", ["cancel"]),
        ("ENQUEUED", "COMPLETED", ["start", "complete"]),
        ("RUNNING", "CANCELLED", ["request_cancel", "cancel"]),
        ("RUNNING", "ENQUEUED", ["fail", "retry"]),
        ("FAILED", "COMPLETED", ["retry", "start", "complete"]),
        ("CANCELLED", "RUNNING", ["retry", "start"]),
        ("RUNNING", "RUNNING", []),
        ("COMPLETED", "COMPLETED", []),
    ],
)
def test_path_to(state: str, target: str, events: list[str]) -> None:
    assert fsm.path_to(state, target) == events


@pytest.mark.parametrize(
    ("state", "target"),
    [("COMPLETED", "RUNNING"), ("COMPLETED", "FAILED"), ("RUNNING", "DRAFT"), ("FAILED", "DRAFT")],
)
def test_path_to_impossible(state: str, target: str) -> None:
    with pytest.raises(
        fsm.IllegalTransition, match=f"cannot move an experiment from {state} to {target}"
    ):
        fsm.path_to(state, target)


def test_every_path_is_legal_and_shortest() -> None:
    # Brute force: every state reachable in n steps, for n = 0, 1, 2, ...
    for state in fsm.STATES:
        reach = {state: 0}
        frontier = [state]
        for depth in range(1, len(fsm.STATES)):
            frontier = [LEGAL[(s, e)] for s in frontier for e in fsm.EVENTS if (s, e) in LEGAL]
            for s in frontier:
                reach.setdefault(s, depth)
        for target in fsm.STATES:
            if target not in reach:
                with pytest.raises(ExpflowError):
                    fsm.path_to(state, target)
                continue
            events = fsm.path_to(state, target)
            assert len(events) == reach[target]
            current = state
            for event in events:
                current = fsm.next_state(current, event)
            assert current == target
