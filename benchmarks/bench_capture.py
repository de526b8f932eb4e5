"""The cost of reading metrics from code that was not written for expflow.

* How fast the output follower reads a run's output (tqdm bars with ``\\r`` updates, ANSI
  colours, epoch lines) with three patterns, in MB/s.
* The extra wall time per run of following the output and reading result files, against
  the same script run through the trainable contract with its metrics in
  ``$EXPFLOW_METRICS_FILE`` (median of several runs each).

.venv/bin/python benchmarks/bench_capture.py      (part of `make bench`)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mdreport import write_section  # noqa: E402

from expflow_flows.runs.capture import OutputFollower  # noqa: E402
from expflow_flows.runs.trainable import run_trainable  # noqa: E402

PATTERNS = [
    r"Epoch (?P<step>\d+)/\d+ loss=(?P<loss>\S+) val=(?P<val_loss>\S+)",
    r"lr: (?P<lr>\S+)",
    r"test nrmse: (?P<nrmse>\S+)",
]

SCRIPT = """
import json, os, sys
n = int(sys.argv[1]); capture = sys.argv[2] == "capture"
for epoch in range(1, n + 1):
    for i in range(0, 101, 5):
        sys.stdout.write(f"\\repoch {epoch}: {i:3d}%|{'#' * (i // 10):10s}| {i}/100")
    sys.stdout.write("\\n")
    print(f"\\x1b[32mEpoch {epoch}/{n} loss={1 / epoch:.5f} val={2 / epoch:.5f}\\x1b[0m")
    if capture:
        with open("history.csv", "a") as f:
            f.write(("epoch,val\\n" if epoch == 1 else "") + f"{epoch},{2 / epoch}\\n")
if not capture:
    json.dump({"val_loss": 2 / n}, open(os.environ["EXPFLOW_METRICS_FILE"], "w"))
"""


def output(epochs: int) -> str:
    lines = []
    for epoch in range(1, epochs + 1):
        bar = "".join(
            f"\repoch {epoch}: {i:3d}%|{'█' * (i // 10):10s}| {i}/100" for i in range(101)
        )
        lines.append(bar + "\n")
        lines.append(
            f"\x1b[32mEpoch {epoch}/{epochs} loss={1 / epoch:.5f} val={2 / epoch:.5f}\x1b[0m\n"
        )
        lines.append(f"lr: {1e-3 / epoch:.6f}\n")
    return "".join(lines)


def follower_rate() -> tuple[float, float]:
    text = output(2000)
    size_mb = len(text.encode()) / 1e6
    rates = []
    for _ in range(3):
        follower = OutputFollower(PATTERNS)
        t0 = time.perf_counter()
        for i in range(0, len(text), 65536):  # arrives in chunks
            follower.feed(text[i : i + 65536])
        follower.close()
        rates.append(size_mb / (time.perf_counter() - t0))
    return size_mb, statistics.median(rates)


def per_run_cost(epochs: int = 200, repeats: int = 7) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "train.py"
        script.write_text(SCRIPT)
        times: dict[str, list[float]] = {"plain": [], "capture": []}
        for i in range(repeats):
            for mode in ("plain", "capture"):
                launch = {"command": [sys.executable, str(script), str(epochs), mode]}
                if mode == "capture":
                    launch["metrics"] = {"patterns": PATTERNS, "files": ["history.csv"]}
                t0 = time.perf_counter()
                result = run_trainable("train", {}, Path(tmp) / f"{mode}-{i}", launch=launch)
                times[mode].append(time.perf_counter() - t0)
                assert result.ok, result.reason
        return statistics.median(times["plain"]), statistics.median(times["capture"])


def main() -> None:
    size_mb, rate = follower_rate()
    plain, captured = per_run_cost()
    lines = [
        f"2 cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Output follower, 3 patterns, tqdm bars with \\r updates and ANSI colours: "
        f"{rate:.0f} MB/s ({size_mb:.0f} MB read in 64 KiB chunks, median of 3)",
        f"Per run, a script printing 200 epochs of bars and epoch lines: {1000 * plain:.0f} ms "
        f"with $EXPFLOW_METRICS_FILE, {1000 * captured:.0f} ms with patterns and a polled "
        f"CSV = {1000 * (captured - plain):+.0f} ms per run (median of 7)",
    ]
    for line in lines[2:]:
        print(line)
    write_section("Metric capture", lines)


if __name__ == "__main__":
    main()
