"""How fast the CLI starts, and that the core imports no optional SDK.

.venv/bin/python benchmarks/bench_cli.py      (part of `make bench`)

`expflow --help` is what a user types first and what shell completion runs; it must
start in well under a second. The optional SDKs (clearml, langfuse, mcp) are heavy
and must load only when a command uses them.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from mdreport import write_section

BIN = Path(sys.executable).parent
OPTIONAL = ("clearml", "clearml_agent", "langfuse", "mcp", "dask_jobqueue", "psycopg")
CORE = (
    "expflow_flows, expflow_flows.cli.app, expflow_flows.flows.pipeline, "
    "expflow_flows.flows.sweep, expflow_flows.workers, expflow_flows.integrations.tracking"
)


def timed(argv: list[str], runs: int = 10) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), max(samples)


def main() -> None:
    lines = [f"2 cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 10 runs each.", ""]
    lines += ["| command | median | slowest |", "|---|---|---|"]
    for label, argv in (
        ("`expflow --help`", [str(BIN / "expflow"), "--help"]),
        ("`expflow runs --help`", [str(BIN / "expflow"), "runs", "--help"]),
        ("`python -c 'import expflow_flows'`", [sys.executable, "-c", "import expflow_flows"]),
        (
            "`python -c 'import expflow_flows.cli.app'`",
            [sys.executable, "-c", "import expflow_flows.cli.app"],
        ),
    ):
        median, slowest = timed(argv)
        lines.append(f"| {label} | {1000 * median:.0f} ms | {1000 * slowest:.0f} ms |")
    probe = (
        f"import sys, importlib; [importlib.import_module(m.strip()) for m in '{CORE}'.split(',')]; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r})))"
    )
    leaked = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    lines += ["", f"Optional SDKs imported by the core modules ({CORE}): {leaked.stdout.strip()}"]
    print("\n".join(lines))
    print(f"\nwritten to {write_section('CLI start-up', lines)}")


if __name__ == "__main__":
    main()
