"""Approvals in the Prefect UI for irreversible acts of deployment runs.

A deployment run cannot be given a PIN on a command line, and a `force` box that any UI
user can tick is no guard. So when a PIN is set, a deployment run that reaches an
irreversible act (the submission) pauses with Prefect's ``pause_flow_run(wait_for_input=…)``:
the UI's Resume form asks for approval and the PIN. A wrong PIN counts towards the
lockout; a decline or no answer in time means nothing is done, and the run says so.
Every outcome is in the audit log.

Automation that must not wait (a nightly run nobody watches) uses a server-side
setting instead: the Prefect Variable ``expflow-skip-approval`` set to ``true`` by an
administrator; each use is audited as forced.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import deployment
from pydantic import Field, SecretStr

from expflow_flows.governance import pin

SKIP_VARIABLE = "expflow-skip-approval"
POLL_S = 2


class Approval(RunInput):
    """The Resume form of a run waiting for approval."""

    approve: bool = Field(
        False, title="Approve", description="Approve the act named in the run's logs."
    )
    pin: SecretStr = Field(SecretStr(""), title="PIN", description="Your expflow PIN.")


def in_deployment() -> bool:
    """Whether this flow run is a deployment's (started from the UI, a schedule, a worker)."""
    return bool(deployment.get_id())


def skip_granted() -> bool:
    """Whether an administrator set the Prefect Variable that skips approval."""
    from prefect.variables import Variable

    try:
        value = Variable.get(SKIP_VARIABLE, default=None)
    except Exception:  # noqa: BLE001 - no server answer: no skip (fail closed)
        return False
    return str(value).strip().lower() in ("true", "yes", "1")


def approve(action: str, target: str, *, timeout_s: float, log: Callable[[str], None]) -> None:
    """Return once ``action`` on ``target`` is approved; raise GuardRefused (audited)
    otherwise. Without a PIN set the act is allowed (and audited as such)."""
    if not pin.pin_status().get("set"):
        pin.guard(action, target=target, interactive=False)
        return
    if os.environ.get(pin.PIN_ENV):  # a worker given the PIN by its operator
        pin.guard(action, target=target, interactive=False)
        return
    if skip_granted():
        pin.record_forced(action, target, f"Prefect Variable {SKIP_VARIABLE} is true")
        log(f"{action} of {target}: approval skipped by the Prefect Variable {SKIP_VARIABLE}")
        return
    minutes = timeout_s / 60
    log(
        f"{action} of {target} waits for approval: open this flow run in the Prefect UI, "
        f"press Resume, tick 'approve' and give the PIN (within {minutes:.0f} min)"
    )
    try:
        answer = pause_flow_run(
            wait_for_input=Approval,
            timeout=max(1, int(timeout_s)),
            poll_interval=POLL_S,
            key=f"approve-{action}",
        )
    except FlowPauseTimeout:
        _take_back()
        raise pin.refuse(
            action, target, f"{action} was not approved within {minutes:.0f} min: nothing was done"
        ) from None
    if not answer.approve:
        raise pin.refuse(action, target, f"{action} was declined in the UI: nothing was done")
    pin.guard(action, target=target, pin=answer.pin.get_secret_value(), interactive=False)


def _take_back() -> None:
    """After a pause ran out the server has failed the run with its own words ('never
    resumed'); it runs again so that it ends saying that nothing was submitted."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    run_id = flow_run.get_id()
    if not run_id:
        return
    with get_client(sync_client=True) as client:
        try:
            client.set_flow_run_state(run_id, Running(), force=True)
        except Exception:  # noqa: BLE001 - the refusal stands either way
            pass
