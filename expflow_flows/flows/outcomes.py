"""How a flow ends on a user's mistake or a full disk: one line in its log and its state
message, no traceback (Prefect logs one for any exception a flow raises)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.states import Failed

from expflow_flows.errors import ExpflowError, disk_full


def failed_outcome(exc: Exception, where: Path | str) -> Any:
    """The Failed state for an :class:`ExpflowError`, or for a full disk at ``where``;
    anything else is raised again (a bug keeps its traceback)."""
    error = exc if isinstance(exc, ExpflowError) else disk_full(exc, where)
    if error is None:
        raise exc
    get_run_logger().error("%s", error)
    return Failed(message=str(error), data=error)
