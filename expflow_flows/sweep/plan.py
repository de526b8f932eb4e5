"""Planning a sweep: which combinations still need running, and where each step goes.

Every step of every combination gets a cache key (the trainable's code, the
parameters, the inputs' checksums, the upstream step's key, the version and the
budget). A step whose key the results store holds as completed is reused, unless
forced; a step after one that runs again runs again too. Planning streams the space
in batches, so a space of 100,000 combinations is planned in bounded memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expflow_flows.settings.sweep import SweepSettings
from expflow_flows.sweep.execute import ComboPlan, StepPlan
from expflow_flows.sweep.identity import cache_key, file_checksum, trainable_fingerprint
from expflow_flows.sweep.space import SweepSpace
from expflow_flows.sweep.store import ResultStore

PLAN_BATCH = 5000


def input_checksums(settings: SweepSettings) -> dict[str, str]:
    """The checksum of every declared input file, by its expanded path."""
    paths = [str(Path(p).expanduser()) for p in settings.inputs]
    return {p: file_checksum(p) for p in paths}


def plan_combinations(
    settings: SweepSettings, space: SweepSpace, store: ResultStore, sweep_dir: Path
) -> tuple[list[dict[str, Any]], int, set[str]]:
    """The combinations that still need running (as worker plans), the total count, and the
    keys of every step of every combination of this space (older results are history)."""
    steps = settings.chain()
    fingerprints = {s.name: trainable_fingerprint(s.label, s.launch()) for s in steps}
    inputs = input_checksums(settings)
    pending: list[dict[str, Any]] = []
    current: set[str] = set()
    total = 0
    batch: list[tuple[Any, list[tuple[Any, str]]]] = []

    def flush() -> None:
        keys = [k for _, ks in batch for _, k in ks]
        done = store.completed_keys(keys)
        for combo, step_keys in batch:
            plans = []
            rerun = False
            for step, key in step_keys:
                cached = key in done and not settings.forced(step.name) and not rerun
                rerun = rerun or not cached
                plans.append(
                    StepPlan(
                        name=step.name,
                        trainable=step.label,
                        key=key,
                        run_dir=str(sweep_dir / "runs" / combo.id / f"{step.name}-{key[:10]}"),
                        budget=step.budget.as_dict() if step.budget else None,
                        timeout=step.timeout,
                        cached=cached,
                        arg_style=step.arg_style,
                        launch=step.launch(),
                        checkpoint_dir=str(
                            sweep_dir / "checkpoints" / combo.id / f"{step.name}-{key[:10]}"
                        ),
                    )
                )
            if rerun:
                pending.append(
                    ComboPlan(combo.id, combo.index, combo.params, tuple(plans)).to_dict()
                )
        batch.clear()

    for combo in space.combinations():
        total += 1
        upstream = ""
        step_keys = []
        for step in steps:
            upstream = cache_key(
                fingerprints[step.name],
                combo.params,
                inputs=inputs,
                upstream=upstream,
                version=step.version or settings.version,
                budget=step.budget.as_dict() if step.budget else None,
            )
            step_keys.append((step, upstream))
            current.add(upstream)
        batch.append((combo, step_keys))
        if len(batch) >= PLAN_BATCH:
            flush()
    if batch:
        flush()
    return pending, total, current
