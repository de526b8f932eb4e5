"""What a PIN guess costs: one scrypt hash offline, and the lockout schedule online.

.venv/bin/python benchmarks/bench_pin.py      (part of `make bench`)
"""

from __future__ import annotations

import statistics
import time

from expflow_flows.governance import pin


def main() -> None:
    cost = pin.DEFAULT_COST
    samples = []
    for _ in range(10):
        t0 = time.perf_counter()
        pin.hash_pin("1234", cost)
        samples.append(time.perf_counter() - t0)
    per_hash = statistics.median(samples)
    print(
        f"scrypt n={cost.n} r={cost.r} p={cost.p}: {1000 * per_hash:.1f} ms per hash (median of 10)"
    )
    for digits in (4, 6, 8):
        space = 10**digits
        print(
            f"offline, stolen pin.json, {digits}-digit PIN: {space:>11,} guesses x {1000 * per_hash:.0f} ms"
            f" = {space * per_hash / 3600:10.2f} core-hours for all"
        )
    # Online: 5 tries, then a lockout that doubles from 30 s up to 1 h.
    tries, seconds, lockouts = 0, 0.0, 0
    while tries < 10**4:
        tries += pin.MAX_FAILURES
        lockouts += 1
        seconds += pin._lockout_seconds(lockouts)
    print(
        f"online, through the guard, 4-digit PIN: {tries:,} guesses take {seconds / 86400:.0f} days "
        f"of lockouts ({pin.MAX_FAILURES} tries per lockout, 30 s doubling to 1 h)"
    )


if __name__ == "__main__":
    main()
