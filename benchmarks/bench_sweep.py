"""Sweep benchmarks: orchestration overhead vs plain Dask, memory, caching, utilisation, metadata.

    make bench   (or: .venv/bin/python benchmarks/bench_sweep.py [--quick])

Writes the figures to BENCHMARKS.md beside this folder's parent, and prints them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)
sys.path.insert(0, str(HERE))
TMP = Path(tempfile.mkdtemp(prefix="expflow-bench-sweep-"))
os.environ["EXPFLOW_HOME"] = str(TMP / "home")
os.environ["PREFECT_HOME"] = str(TMP / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


class PeakRSS:
    """Samples the RSS of this process and all its children (Dask workers) every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total / 2**20)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def plain_dask(fn_name: str, n: int) -> float:
    """client.map of the bare function on a 2-worker LocalCluster (cluster start excluded)."""
    import trivial
    from distributed import Client, LocalCluster

    fn = getattr(trivial, fn_name)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as c,
        Client(c) as client,
    ):
        client.submit(fn, {"x": 0}).result()
        t0 = time.perf_counter()
        futures = client.map(fn, [{"x": i} for i in range(n)], pure=False)
        client.gather(futures)
        return time.perf_counter() - t0


def run_sweep(name: str, fn_name: str, n: int, **changes) -> tuple[float, dict, float]:
    """A sweep of ``trivial:<fn_name>`` over n values; ``changes`` are more sweep settings."""
    from expflow_flows.flows.sweep import sweep

    settings = {
        "name": name,
        "trainable": f"trivial:{fn_name}",
        "space": {"grid": {"x": list(range(n))}},
        **changes,
    }
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        summary = sweep(settings=settings)
        elapsed = time.perf_counter() - t0
    return elapsed, summary, rss.peak


def cluster_start() -> float:
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as c,
        Client(c),
    ):
        return time.perf_counter() - t0


def metadata_overhead() -> str:
    """Bookkeeping of one run (run folder, params, metrics, metadata, status, resource use)
    against a 1-second combination, plus the once-per-sweep environment capture."""
    import trivial

    from expflow_flows.runs.metadata import capture_environment
    from expflow_flows.runs.trainable import run_trainable

    t0 = time.perf_counter()
    capture_environment()
    env_s = time.perf_counter() - t0
    direct, wrapped = [], []
    for i in range(5):
        t0 = time.perf_counter()
        trivial.cpu_one_second({"x": i})
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_trainable("trivial:cpu_one_second", {"x": i}, TMP / "meta" / f"r{i}")
        wrapped.append(time.perf_counter() - t0)
    per = (sum(wrapped) - sum(direct)) / 5
    return (
        f"Metadata capture: {1000 * per:.2f} ms per 1-second combination ({100 * per:.2f}% of compute); "
        f"environment once per sweep {1000 * env_s:.0f} ms ({100 * env_s / 1000:.3f}% of a 1,000-combination sweep)"
    )


def metadata_size() -> str:
    """Metadata bytes against result bytes for the built-in PDE trainable (model, metrics)."""
    from expflow_flows.flows.sweep import sweep

    summary = sweep(
        settings={
            "name": "bench-meta-size",
            "trainable": {
                "target": "expflow_flows.pde.trainables:train",
                "budget": {"epochs": 2},
            },
            "space": {"fixed": {"problem": "advection"}, "grid": {"modes": [4, 8, 16, 32]}},
        }
    )
    sweep_dir = Path(summary["sweep_dir"])
    files = [p for p in (sweep_dir / "runs").rglob("*") if p.is_file()]
    meta = sum(p.stat().st_size for p in files if p.name == "metadata.json")
    meta += (sweep_dir / "metadata.json").stat().st_size
    results = sum(p.stat().st_size for p in files if p.name != "metadata.json")
    results += (sweep_dir / "results.sqlite").stat().st_size
    return (
        f"Metadata size, 4 PDE combinations: {meta / 1024:.0f} KiB against {results / 1024:.0f} KiB "
        f"of results ({100 * meta / results:.1f}%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    big = 2000 if args.quick else 10000
    lines = [
        "# Sweep benchmarks",
        "",
        f"2 cores, 2 Dask worker processes; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    start = cluster_start()
    say(f"LocalCluster start (included in every sweep's wall time): {start:.2f} s")
    say("")
    say(
        "| workload | sweep wall | plain client.map | overhead per combination | ratio | peak RSS |"
    )
    say("|---|---|---|---|---|---|")
    reruns: list[tuple[str, float, float]] = []
    with prefect_test_harness(server_startup_timeout=120):
        for label, fn, n in (
            ("1,000 trivial", "sweep_trivial", 1000),
            (f"{big:,} trivial", "sweep_trivial", big),
            ("1,000 x 50 ms", "sleep_50ms", 1000),
        ):
            base = plain_dask(fn, n)
            wall, summary, peak = run_sweep(f"bench-{fn}-{n}", fn, n)
            assert summary["counts"].get("ok") == n, summary["counts"]
            per = 1000 * (wall - start - base) / n
            say(
                f"| {label} | {wall:.1f} s | {base:.1f} s | {per:.2f} ms | {(wall - start) / base:.2f}x | {peak:.0f} MB |"
            )
            if fn == "sweep_trivial":
                cached, summary2, _ = run_sweep(f"bench-{fn}-{n}", fn, n)
                assert summary2["ran"] == 0
                reruns.append((label, cached, wall))
        say("")
        for label, cached, cold in reruns:
            say(
                f"Cached re-run of {label}: {cached:.1f} s vs cold {cold:.1f} s ({100 * cached / cold:.0f}%)"
            )
        wall, summary, _ = run_sweep("bench-cpu", "cpu_half_second", 200)
        ideal = 200 * 0.5 / 2
        say(
            f"Utilisation, 200 x 0.5 s CPU on 2 workers: ideal {ideal:.0f} s, actual {wall - start:.1f} s "
            f"(+{start:.1f} s cluster start) = {100 * ideal / (wall - start):.0f}%"
        )
        say(metadata_overhead())
        say(metadata_size())
        time.sleep(3)
    from mdreport import write_section

    out = write_section("Sweeps", [line for line in lines if not line.startswith("# ")])
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
