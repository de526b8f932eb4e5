"""What a PIN guess costs: offline against a stolen pin.json, and online through the guard.

* One check at the default cost (argon2id, parameters from ``pin.DEFAULT_COST``), median of
  several, against the scrypt hash of earlier versions.
* Offline guessing on every core of this machine at once (one process per core, each
  checking wrong PINs against one stolen hash): guesses per second, and the projected
  wall time to try all 10^4 4-digit PINs (and 10^6 6-digit ones).
* One guarded act end to end (``pin.guard`` with the PIN: record, lockout state, audit).
* The online lockout schedule: what 10^4 guesses through the guard cost in waiting.

.venv/bin/python benchmarks/bench_pin.py      (part of `make bench`)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mdreport import write_section  # noqa: E402

from expflow_flows.governance import pin  # noqa: E402

CHECKS = 15
GUESSES_PER_CORE = 12


def median_ms(fn, runs: int = CHECKS) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1000 * statistics.median(samples)


def guess(encoded: str, start: int, count: int) -> int:
    """What an attacker runs on each core: wrong PINs against the stolen hash."""
    for i in range(start, start + count):
        assert not pin._matches(f"{i:04d}", encoded, "bench")
    return count


def offline_rate(encoded: str, cores: int) -> float:
    """Guesses per second with one process per core (pool start-up excluded)."""
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(guess, [encoded] * cores, range(cores), [1] * cores))  # warm the workers
        t0 = time.perf_counter()
        starts = [1000 + 100 * k for k in range(cores)]
        done = sum(pool.map(guess, [encoded] * cores, starts, [GUESSES_PER_CORE] * cores))
        return done / (time.perf_counter() - t0)


def guard_ms() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EXPFLOW_HOME"] = tmp
        os.environ.pop("EXPFLOW_LEDGER", None)
        pin.init_pin("739164")
        return median_ms(lambda: pin.guard("bench", pin="739164"), runs=7)


def main() -> None:
    cost = pin.DEFAULT_COST
    cores = os.cpu_count() or 1
    encoded = pin.hash_pin("739164", cost)
    legacy = pin.hash_pin("739164", pin.ScryptCost())
    # Side by side, alternating, so both see the same load.
    new_s: list[float] = []
    old_s: list[float] = []
    for _ in range(CHECKS):
        for stored, samples in ((encoded, new_s), (legacy, old_s)):
            t0 = time.perf_counter()
            pin._matches("0000", stored, "bench")
            samples.append(time.perf_counter() - t0)
    check, old = 1000 * statistics.median(new_s), 1000 * statistics.median(old_s)
    rate = offline_rate(encoded, cores)
    guarded = guard_ms()

    tries, waited, lockouts = 0, 0.0, 0
    while tries < 10**4:
        tries += pin.MAX_FAILURES
        lockouts += 1
        waited += pin._lockout_seconds(lockouts)

    name = f"argon2id m={cost.memory_kib // 1024} MiB, t={cost.time_cost}, p={cost.parallelism}"
    lines = [
        f"{cores} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average {os.getloadavg()[0]:.1f} at the start.",
        "",
        "| | wall time per guess | 10^4 guesses (4 digits) | 10^6 guesses (6 digits) |",
        "|---|---|---|---|",
        f"| {name}, one core | {check:.0f} ms | {1e4 * check / 60000:.0f} min "
        f"| {1e6 * check / 3.6e6:.0f} h |",
        f"| {name}, all {cores} cores at once (measured) | {1000 / rate:.0f} ms "
        f"| {1e4 / rate / 60:.0f} min | {1e6 / rate / 3600:.0f} h |",
        f"| scrypt n=2^14 r=8 p=1 (before), one core | {old:.0f} ms "
        f"| {1e4 * old / 60000:.1f} min | {1e6 * old / 3.6e6:.1f} h |",
        "",
        f"One check costs {check / old:.1f}x the scrypt check of before, measured side by side "
        "(under load both slow down; the ratio holds better than the absolute figures).",
        f"One guarded act with the right PIN (`pin.guard`: record, lockout state, audit line): "
        f"{guarded:.0f} ms (median of 7).",
        f"Online, through the guard, a 4-digit PIN: {tries:,} guesses take "
        f"{waited / 86400:.0f} days of lockouts ({pin.MAX_FAILURES} tries per lockout, "
        "30 s doubling to 1 h).",
    ]
    print("\n".join(lines))
    print(f"\nwritten to {write_section('PIN guard', lines)}")


if __name__ == "__main__":
    main()
