"""Small flows deployed to the `slurm` and `clearml` work pools by the worker tests."""

from __future__ import annotations

import os
import time

from prefect import flow


@flow(name="sleeper", log_prints=True)
def sleeper(seconds: float = 600) -> float:
    """Runs long enough to be cancelled, killed or timed out from outside."""
    print(f"sleeping {seconds} s in pid {os.getpid()}")
    time.sleep(seconds)
    return seconds


@flow(name="quick", log_prints=True)
def quick(x: int = 1) -> int:
    print(f"job {os.environ.get('SLURM_JOB_ID', '-')} squares {x}")
    return x * x


@flow(name="fails")
def fails() -> None:
    raise ValueError("this flow fails on purpose")


# The package's own sweep flow, deployed as a user would (a 3-minute training under a
# 1-minute Slurm limit, resumed across requeues).
from expflow_flows.flows.sweep import sweep  # noqa: E402,F401
