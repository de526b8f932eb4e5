"""What keeping long runs alive costs: heartbeats, retries' bookkeeping and checkpoints,
at 1,000 trials.

* An HPO study of 1,000 trivial trials (a callable through ``run_trainable``, 2 threads,
  an Optuna journal file): wall time per trial, and, measured on the same study, what
  this issue's bookkeeping adds to each trial (a heartbeat and a checkpoint-folder user
  attribute, the retry check after a failed tell) and what one heartbeat tick costs with
  1,000 trials in the study (every ``HEARTBEAT_S`` seconds while trials run).
* The checkpoint folder of each run (made, looked into, counted, removed when empty):
  its cost per run, against a run of a trivial callable.
* The PDE baseline: one epoch against one checkpoint save and one resume (load).

.venv/bin/python benchmarks/bench_checkpoint.py      (part of `make bench`)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna  # noqa: E402
from mdreport import write_section  # noqa: E402

from expflow_flows.hpo import loop  # noqa: E402
from expflow_flows.hpo import study as hpo  # noqa: E402
from expflow_flows.runs.trainable import run_trainable  # noqa: E402
from expflow_flows.settings.pipeline import load_pipeline_settings  # noqa: E402

TRIALS = 1000


def trivial(params: dict) -> dict:
    return {"loss": (params["x"] - 2.0) ** 2}


class Threads:
    """Trials through the trainable contract in 2 threads, as the threads runner runs them."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(2)

    def start(self, spec: loop.TrialSpec):
        return self.pool.submit(
            run_trainable,
            "bench_checkpoint:trivial",
            spec.params,
            spec.run_dir,
            checkpoint_dir=spec.checkpoint_dir,
        )

    def next_finished(self, handles):
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return next(iter(done))

    def result(self, handle):
        return handle.result()


def hpo_figures(root: Path) -> dict[str, float]:
    settings = load_pipeline_settings(
        overrides={
            "experiment": "bench-ckpt",
            "train": {"target": "bench_checkpoint:trivial"},
            "space": {"x": {"type": "float", "low": 0.0, "high": 4.0}},
            "objective": "loss",
            "hpo": {
                "n_trials": TRIALS,
                "seed": 0,
                "pruner": "none",
                "storage": str(root / "journal.log"),
            },
            "cluster": {"kind": "threads", "workers": 2},
        }
    )
    study = hpo.open_study(str(root / "journal.log"), "bench-ckpt", pruner="none", seed=0)
    t0 = time.perf_counter()
    loop.run_study(settings, study, Threads(), root / "trials")
    per_trial_ms = 1000 * (time.perf_counter() - t0) / TRIALS

    trials = study.get_trials(deepcopy=False)
    # running trials in the same journal (the finished ones take no more attributes)
    side = optuna.create_study(storage=study._storage, study_name="bench-ckpt-attrs")
    ids = [side.ask()._trial_id for _ in range(200)]
    t0 = time.perf_counter()
    for trial_id in ids:  # what each trial's start writes for this issue
        study._storage.set_trial_user_attr(trial_id, hpo.HEARTBEAT_ATTR, time.time())
        study._storage.set_trial_user_attr(trial_id, hpo.CHECKPOINT_ATTR, "/x/checkpoints/t")
    attrs_ms = 1000 * (time.perf_counter() - t0) / len(ids)

    def median_ms(fn, runs: int = 7) -> float:
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        return 1000 * statistics.median(samples)

    tick_ms = median_ms(
        lambda: hpo.fail_stale_trials(study, now=time.time(), stale_after=hpo.STALE_AFTER_S)
    )
    told = [study._storage.get_trial(trials[-1]._trial_id)]
    retry_ms = median_ms(lambda: hpo.enqueue_retries(study, 2, told))
    return {
        "per_trial_ms": per_trial_ms,
        "attrs_ms": attrs_ms,
        "tick_ms": tick_ms,
        "retry_ms": retry_ms,
    }


def folder_figures(root: Path) -> dict[str, float]:
    runs = 300

    def many(checkpoint: bool) -> float:
        t0 = time.perf_counter()
        for i in range(runs):
            run_dir = root / f"{'c' if checkpoint else 'p'}{i}"
            run_trainable("bench_checkpoint:trivial", {"x": 1.0}, run_dir)
        return 1000 * (time.perf_counter() - t0) / runs

    per_run_ms = many(True)
    # the folder's own work, alone: made, looked into, counted, removed (it stays empty)
    t0 = time.perf_counter()
    for i in range(runs):
        folder = root / "alone" / str(i) / "checkpoint"
        folder.mkdir(parents=True)
        any(folder.iterdir())
        sum(1 for p in folder.rglob("*") if p.is_file())
        folder.rmdir()
    folder_ms = 1000 * (time.perf_counter() - t0) / runs
    return {"per_run_ms": per_run_ms, "folder_ms": folder_ms}


def pde_figures(root: Path) -> dict[str, float]:
    params = {"n_samples": 60, "nx": 64, "nt": 21, "initial_step": 2, "modes": 12}
    epochs = 20
    walls = {}
    for every in (0, 1):
        samples = []
        for k in range(3):
            result = run_trainable(
                "expflow_flows.pde.trainables:train",
                {**params, "checkpoint_every": every},
                root / f"pde-{every}-{k}",
                budget={"epochs": epochs},
                checkpoint_dir=root / f"pde-ckpt-{every}-{k}",
            )
            assert result.ok, result.reason
            samples.append(result.wall_s)
        walls[every] = statistics.median(samples)
    # resuming: a run whose checkpoint holds every epoch loads it and has nothing left to do
    t0 = time.perf_counter()
    again = run_trainable(
        "expflow_flows.pde.trainables:train",
        {**params, "checkpoint_every": 1},
        root / "pde-resumed",
        budget={"epochs": epochs},
        checkpoint_dir=root / "pde-ckpt-1-0",
    )
    resumed_s = time.perf_counter() - t0
    assert again.ok, again.reason
    return {
        "epoch_ms": 1000 * walls[0] / epochs,
        "save_ms": 1000 * (walls[1] - walls[0]) / epochs,
        "resume_s": resumed_s,
        "train_s": walls[0],
    }


def main() -> None:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        root = Path(tmp)
        h = hpo_figures(root / "hpo")
        f = folder_figures(root / "folders")
        p = pde_figures(root / "pde")
    added_ms = h["attrs_ms"] + f["folder_ms"]
    lines = [
        f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average {load:.1f} at the start.",
        "",
        "| at 1,000 trials | cost |",
        "|---|---|",
        f"| an HPO trial of a trivial callable, all in (2 threads, journal file) | "
        f"{h['per_trial_ms']:.1f} ms |",
        f"| of which: heartbeat + checkpoint-folder user attributes, per trial | "
        f"{h['attrs_ms']:.2f} ms |",
        f"| of which: the run's checkpoint folder (made, looked into, removed when empty) | "
        f"{f['folder_ms']:.2f} ms |",
        f"| the retry check after a failed trial | {h['retry_ms']:.1f} ms |",
        f"| one heartbeat tick (every {hpo.HEARTBEAT_S:g} s while trials run) | "
        f"{h['tick_ms']:.1f} ms = {100 * h['tick_ms'] / 1000 / hpo.HEARTBEAT_S:.2f}% of a core |",
        f"| a run of a trivial callable through the trainable contract | "
        f"{f['per_run_ms']:.1f} ms |",
        "",
        f"What this issue adds to a trivial trial: {added_ms:.2f} ms, "
        f"{100 * added_ms / h['per_trial_ms']:.0f}% of its {h['per_trial_ms']:.1f} ms.",
        f"PDE baseline (60 samples, nx 64, 20 epochs): {p['epoch_ms']:.0f} ms per epoch; a "
        f"checkpoint every epoch adds {p['save_ms']:.1f} ms per save "
        f"({100 * p['save_ms'] / p['epoch_ms']:.0f}% of an epoch; the default, every 5 "
        f"epochs, a fifth of that); resuming a finished checkpoint: {p['resume_s']:.2f} s "
        f"against {p['train_s']:.2f} s for the training (medians of 3).",
    ]
    print("\n".join(lines))
    write_section("Heartbeats and checkpoints", lines)


if __name__ == "__main__":
    main()
