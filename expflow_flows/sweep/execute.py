"""What a Dask worker does for one combination: run its chain of steps, skipping cached ones.

The flow plans each combination (keys, folders, which steps are cached) and the
workers only execute; every result is a plain row for the results store.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expflow_flows.runs.trainable import STOPPED_TO_RESUME, is_machine_failure, run_trainable

LOG_EXCERPT_LINES = 20


@dataclass(frozen=True)
class StepPlan:
    """One step of one combination: what to run, where, under which cache key."""

    name: str
    trainable: str
    key: str
    run_dir: str
    budget: dict[str, Any] | None = None
    timeout: float | None = None
    cached: bool = False  # completed before with this key: reuse its folder
    arg_style: str | None = None  # None: the combination's
    launch: dict[str, Any] | None = None  # how a script or command starts (runs.launch)
    checkpoint_dir: str | None = None  # kept across retries and re-runs: the step resumes


@dataclass(frozen=True)
class ComboPlan:
    """A combination and its steps, in order."""

    combo_id: str
    combo_index: int
    params: dict[str, Any]
    steps: tuple[StepPlan, ...] = field(default_factory=tuple)
    arg_style: str = "argparse"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for shipping to a worker."""
        return asdict(self)


def _excerpt(run_dir: Path, n: int = LOG_EXCERPT_LINES) -> str:
    log = run_dir / "output.log"
    try:
        lines = log.read_text("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_combination(
    plan: dict[str, Any],
    *,
    stop_file: str | None = None,
    devices: dict[str, Any] | None = None,
    retries: int = 0,
) -> list[dict[str, Any]]:
    """Run the combination's uncached steps in order; one result row per step that ran.

    A step the machine failed (its process killed) runs again, up to ``retries`` times,
    in the same folders: it resumes from its checkpoint folder. A failed step stops the
    chain: later steps would read missing outputs.
    """
    params = plan["params"]
    rows: list[dict[str, Any]] = []
    upstream: str | None = None
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if os.environ.get("SLURM_JOB_ID"):
        worker += f":{os.environ['SLURM_JOB_ID']}"
    for step in plan["steps"]:
        run_dir = Path(step["run_dir"])
        if step["cached"]:
            upstream = str(run_dir)
            continue
        started = time.time()
        for attempt in range(retries + 1):
            result = run_trainable(
                step["trainable"],
                params,
                run_dir,
                budget=step.get("budget"),
                upstream=upstream,
                timeout=step.get("timeout"),
                arg_style=step.get("arg_style") or plan.get("arg_style", "argparse"),
                launch=step.get("launch"),
                checkpoint_dir=step.get("checkpoint_dir"),
                stop_file=stop_file,
                devices=devices,
            )
            if (
                result.ok
                or STOPPED_TO_RESUME in result.reason
                or not is_machine_failure(result.reason)
                or attempt == retries
            ):
                break
            with open(run_dir / "output.log", "a", encoding="utf-8") as log:
                log.write(
                    f"expflow: {result.reason}; retry {attempt + 1} of {retries} resumes "
                    f"from {result.checkpoint_dir}\n"
                )
        rows.append(
            {
                "key": step["key"],
                "combo_id": plan["combo_id"],
                "combo_index": plan["combo_index"],
                "step": step["name"],
                "params": params,
                "metrics": result.metrics,
                "status": result.status,
                "reason": result.reason,
                "run_dir": str(run_dir),
                "started_at": started,
                "ended_at": started + result.wall_s,
                "wall_s": result.wall_s,
                "cpu_s": result.cpu_s,
                "peak_rss_mb": result.peak_rss_mb,
                "worker": worker,
                "log_excerpt": "" if result.status == "ok" else _excerpt(run_dir),
            }
        )
        if not result.ok:
            break
        upstream = str(run_dir)
    return rows


def failed_row(plan: dict[str, Any], reason: str) -> dict[str, Any]:
    """The row for a combination that could not run (its worker kept dying, or a bug)."""
    step = next(s for s in plan["steps"] if not s["cached"])
    now = time.time()
    return {
        "key": step["key"],
        "combo_id": plan["combo_id"],
        "combo_index": plan["combo_index"],
        "step": step["name"],
        "params": plan["params"],
        "metrics": {},
        "status": "failed",
        "reason": reason,
        "run_dir": step["run_dir"],
        "started_at": now,
        "ended_at": now,
        "wall_s": 0.0,
        "log_excerpt": "",
    }


def run_batch(
    plans: list[dict[str, Any]],
    stop_file: str | None = None,
    devices: dict[str, Any] | None = None,
    retries_in_place: int = 0,
) -> list[dict[str, Any]]:
    """Run several combinations in one Dask task, so Dask's per-task cost is shared.

    A combination that raises (a bug of ours, not a trainable failure, which is a row)
    becomes a failed row and the batch goes on.
    """
    rows: list[dict[str, Any]] = []
    for plan in plans:
        try:
            rows.extend(
                run_combination(
                    plan, stop_file=stop_file, devices=devices, retries=retries_in_place
                )
            )
        except Exception as exc:  # noqa: BLE001 - one combination must not sink its batch
            rows.append(failed_row(plan, f"{type(exc).__name__}: {exc}"))
    return rows


def batch_size(n_items: int, workers: int, seconds_each: float | None) -> int:
    """Combinations per Dask task: one until their duration is known, then enough to take
    about a quarter second (at most 16), keeping at least 8 tasks per worker for balance."""
    if seconds_each is None:
        return 1
    wanted = int(0.25 / max(seconds_each, 1e-4))
    return max(1, min(16, wanted, n_items // max(1, workers * 8)))


class ChunkRunner:
    """Fans chunks of combinations out over a Dask client and records each row at once.

    One runner serves one sweep run: it learns how long a combination takes and sizes
    later Dask tasks from it (see :func:`batch_size`).
    """

    def __init__(
        self,
        client: Any,
        store: Any,
        *,
        retries: int,
        resources: dict[str, float],
        stop_file: str | None = None,
        devices: dict[str, Any] | None = None,
    ) -> None:
        self.client, self.store = client, store
        self.retries, self.resources = retries, resources
        self.stop_file, self.devices = stop_file, devices
        self.seconds_each: float | None = None

    def run(self, index: int, plans: list[dict[str, Any]]) -> dict[str, int]:
        """Run one chunk; returns its counts by status (the last step of each combination)."""
        import uuid

        from distributed import as_completed

        workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        size = batch_size(len(plans), workers, self.seconds_each)
        batches = [plans[i : i + size] for i in range(0, len(plans), size)]
        keys = [f"batch-{index}-{i}-{uuid.uuid4().hex[:8]}" for i in range(len(batches))]
        by_key = dict(zip(keys, batches, strict=True))
        futures = self.client.map(
            run_batch,
            batches,
            key=keys,
            pure=False,
            retries=self.retries,
            resources=self.resources or None,
            stop_file=self.stop_file,
            devices=self.devices,
            # a killed process is retried in place (from its checkpoint); Dask's own
            # retries cover a lost worker
            retries_in_place=self.retries,
        )
        counts = {"ok": 0, "warning": 0, "pruned": 0, "failed": 0}
        buffer: list[dict[str, Any]] = []
        walls: list[float] = []
        flushed = time.monotonic()
        for future in as_completed(futures):
            try:
                rows = future.result()
            except Exception as exc:  # noqa: BLE001 - a lost worker or task error fails its combinations
                rows = [failed_row(p, f"{type(exc).__name__}: {exc}") for p in by_key[future.key]]
            future.release()
            last = {row["combo_id"]: row for row in rows}
            for row in last.values():
                counts[row["status"]] = counts.get(row["status"], 0) + 1
            buffer.extend(rows)
            walls.extend(float(r["wall_s"]) for r in rows if r.get("wall_s") is not None)
            if len(buffer) >= 200 or time.monotonic() - flushed > 0.5:
                self.store.record_many(buffer)
                buffer.clear()
                flushed = time.monotonic()
        if buffer:
            self.store.record_many(buffer)
        if walls:
            self.seconds_each = sum(walls) / len(walls)
        return counts
