"""HPO orchestration overhead: the pipeline's HPO stage vs. a plain Optuna loop.

Both run the same trivial objective for N trials with 2 workers. The plain loop
is ``study.optimize(n_jobs=2)`` in memory; the HPO stage is the ``hpo`` flow
(ask/tell, one Prefect task per trial, journal storage, run folders) on a Dask
LocalCluster of 2 processes, and again on the thread runner. The Prefect API is
a test harness started before timing, so server start-up is not counted.

    make bench            (or: .venv/bin/python benchmarks/bench_hpo.py --trials 100)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)
sys.path.insert(0, str(HERE))
TMP = Path(tempfile.mkdtemp(prefix="expflow-bench-"))
os.environ["EXPFLOW_HOME"] = str(TMP / "home")
os.environ["PREFECT_HOME"] = str(TMP / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def plain(n: int) -> float:
    import optuna
    from trivial import objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    t0 = time.perf_counter()
    study.optimize(
        lambda t: objective({"x": t.suggest_float("x", -5, 5)})["loss"], n_trials=n, n_jobs=2
    )
    return time.perf_counter() - t0


def flow(n: int, kind: str) -> float:
    """The ``hpo`` flow for n trials on 2 workers of cluster kind ``kind``."""
    from expflow_flows.flows.clusters import task_runner
    from expflow_flows.flows.pipeline import hpo_flow
    from expflow_flows.settings.pipeline import load_pipeline_settings

    settings = load_pipeline_settings(
        None,
        {
            "experiment": f"bench-{kind}",
            "train": "trivial:objective",
            "space": {"x": {"type": "float", "low": -5, "high": 5}},
            "params": {},
            "objective": "loss",
            "hpo": {
                "n_trials": n,
                "pruner": "none",
                "storage": str(TMP / f"journal-{kind}.log"),
            },
            "cluster": {"kind": kind, "workers": 2},
        },
    )
    t0 = time.perf_counter()
    hpo_flow.with_options(task_runner=task_runner(settings.cluster))(
        settings, str(TMP / "runs" / kind)
    )
    return time.perf_counter() - t0


def cluster_startup() -> float:
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        with Client(c):
            elapsed = time.perf_counter() - t0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    n = args.trials
    from prefect.testing.utilities import prefect_test_harness

    base = plain(n)
    print(f"plain optuna optimize(n_jobs=2): {base:7.2f} s  ({1000 * base / n:7.1f} ms/trial)")
    start = cluster_startup()
    print(f"Dask LocalCluster (2 processes) start: {start:5.2f} s  (included in the dask line)")
    with prefect_test_harness(server_startup_timeout=120):
        # cluster.kind local is Dask (a LocalCluster of 2 worker processes).
        for runner, kind in (("dask", "local"), ("threads", "threads")):
            t = flow(n, kind)
            print(
                f"hpo flow, {runner:7s} runner:      {t:7.2f} s  ({1000 * t / n:7.1f} ms/trial)"
                f"  overhead {1000 * (t - base) / n:6.1f} ms/trial  ratio {t / base:6.1f}x"
            )
        # Let the API finish recording the last task runs before the harness stops.
        time.sleep(5)


if __name__ == "__main__":
    main()
