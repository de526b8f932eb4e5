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


def run_sweep(name: str, fn_name: str, n: int, **kw) -> tuple[float, dict, float]:
    from expflow_flows.flows.sweep import sweep

    with PeakRSS() as rss:
        t0 = time.perf_counter()
        summary = sweep(
            name=name, trainable=f"trivial:{fn_name}", space={"grid": {"x": list(range(n))}}, **kw
        )
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
            if fn == "sweep_trivial" and n == 1000:
                cached, summary2, _ = run_sweep(f"bench-{fn}-{n}", fn, n)
                assert summary2["ran"] == 0
                cold_wall = wall
        say("")
        say(
            f"Cached re-run of 1,000: {cached:.1f} s vs cold {cold_wall:.1f} s ({100 * cached / cold_wall:.0f}%)"
        )
        wall, summary, _ = run_sweep("bench-cpu", "cpu_half_second", 200)
        ideal = 200 * 0.5 / 2
        say(
            f"Utilisation, 200 x 0.5 s CPU on 2 workers: ideal {ideal:.0f} s, actual {wall - start:.1f} s (+{start:.1f} s cluster start) = {100 * ideal / (wall - start):.0f}%"
        )
        wall, summary, _ = run_sweep("bench-meta", "cpu_one_second", 40)
        sweep_dir = Path(summary["sweep_dir"])
        runs = sweep_dir / "runs"
        meta_bytes = (
            sum(p.stat().st_size for p in runs.rglob("metadata.json"))
            + (sweep_dir / "metadata.json").stat().st_size
        )
        result_bytes = sum(
            p.stat().st_size for p in runs.rglob("*") if p.is_file() and p.name != "metadata.json"
        )
        result_bytes += (sweep_dir / "results.sqlite").stat().st_size
        ideal = 40 * 1.0 / 2
        say(
            f"1-second combinations: 40 in {wall - start:.1f} s vs ideal {ideal:.0f} s: overhead {100 * (wall - start - ideal) / ideal:.1f}% of compute"
        )
        say(
            f"Metadata size: {meta_bytes / 1024:.0f} KiB against {result_bytes / 1024:.0f} KiB of results ({100 * meta_bytes / result_bytes:.1f}%)"
        )
        time.sleep(3)
    out = HERE.parent / "BENCHMARKS.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
