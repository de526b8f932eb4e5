"""The sweep results store: rows, the upsert rules, big key sets, threads, readers, and kill -9."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.sweep import store as store_mod
from expflow_flows.sweep.store import RESULTS_FILENAME, ResultStore

PYTHON = sys.executable


def row(key: str, status: str = "ok", **extra) -> dict:
    base = {
        "key": key,
        "combo_id": f"combo-{key}",
        "combo_index": 0,
        "step": "",
        "params": {"lr": 0.1, "seed": 1},
        "metrics": {"loss": 0.5},
        "status": status,
    }
    base.update(extra)
    return base


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(tmp_path / "sweep" / RESULTS_FILENAME)


def test_record_and_get_round_trip(store: ResultStore) -> None:
    full = row(
        "k1",
        status="warning",
        combo_index=3,
        step="train",
        params={"lr": 0.01, "layers": [64, 64], "act": "relu"},
        metrics={"loss": 0.25, "nan": float("nan"), "inf": float("inf")},
        reason="slow convergence",
        run_dir=Path("/runs/a/1"),
        started_at=100.0,
        ended_at=102.5,
        wall_s=2.5,
        cpu_s=2,
        peak_rss_mb=123.4,
        worker="tcp://127.0.0.1:4000",
        attempts=2,
        log_excerpt="line 1\nline 2",
    )
    before = time.time()
    assert store.record(full) is True
    got = store.get("k1")
    assert got is not None
    assert list(got) == list(store_mod.COLUMNS)
    assert got["params"] == {"lr": 0.01, "layers": [64, 64], "act": "relu"}
    assert got["metrics"]["loss"] == 0.25
    assert math.isnan(got["metrics"]["nan"]) and got["metrics"]["inf"] == math.inf
    assert got["status"] == "warning" and got["step"] == "train" and got["combo_index"] == 3
    assert got["run_dir"] == "/runs/a/1" and got["cpu_s"] == 2.0 and got["attempts"] == 2
    assert got["log_excerpt"] == "line 1\nline 2"
    assert got["recorded_at"] >= before
    assert store.get("missing") is None
    assert len(store) == 1

    # Defaults: step "", attempts 1, empty params/metrics; a long log keeps its tail.
    store.record(
        {"key": "k2", "status": "failed", "log_excerpt": "x" * 20_000 + "the end", "params": None}
    )
    got = store.get("k2")
    assert got["step"] == "" and got["attempts"] == 1 and got["params"] == {}
    assert got["reason"] == "" and got["metrics"] == {}
    assert len(got["log_excerpt"]) == store_mod.MAX_LOG_EXCERPT_CHARS
    assert got["log_excerpt"].endswith("the end")


def test_upsert_rules(store: ResultStore) -> None:
    # failed -> ok on retry: replaced.
    assert store.record(row("a", "failed", reason="boom", attempts=1))
    assert store.record(row("a", "ok", metrics={"loss": 0.1}, attempts=2))
    got = store.get("a")
    assert got["status"] == "ok" and got["reason"] == "" and got["attempts"] == 2
    # ok -> failed (a late duplicate): refused, the ok row stays.
    assert store.record(row("a", "failed", reason="late duplicate")) is False
    assert store.get("a")["status"] == "ok" and store.get("a")["metrics"] == {"loss": 0.1}
    # ...and ok -> pruned is refused too; warning -> failed as well.
    assert store.record(row("a", "pruned")) is False
    store.record(row("w", "warning"))
    assert store.record(row("w", "failed")) is False
    assert store.get("w")["status"] == "warning"
    # ok -> ok (a forced re-run): the newer result wins.
    assert store.record(row("a", "ok", metrics={"loss": 0.05}))
    assert store.get("a")["metrics"] == {"loss": 0.05}
    # failed -> failed: the newer failure is kept.
    store.record(row("f", "failed", reason="first"))
    store.record(row("f", "failed", reason="second", attempts=2))
    assert store.get("f")["reason"] == "second"
    # Within one batch the rules apply in order.
    assert store.record_many([row("b", "failed"), row("b", "ok"), row("b", "failed")]) == 2
    assert store.get("b")["status"] == "ok"
    assert store.counts() == {"ok": 2, "warning": 1, "pruned": 0, "failed": 1}


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"status": "ok"}, "key"),
        (row("k", "done"), "status"),
        (row("k", metric={"x": 1}), "metric"),
        (row("k", params={"x": object()}), "params"),
        (row("k", params={1: 2}), "params"),
        (row("k", wall_s="slow"), "wall_s"),
        (row("k", combo_index=True), "combo_index"),
        (row("k", step=3), "step"),
        ("not a dict", "not a dict"),
    ],
)
def test_bad_rows_are_refused_whole(store: ResultStore, bad, word: str) -> None:
    with pytest.raises(ExpflowError, match=word):
        store.record_many([row("good"), bad])
    # Validation happens before the transaction: nothing from the batch is written.
    assert len(store) == 0


def test_record_many_empty_and_numpy_values(store: ResultStore) -> None:
    np = pytest.importorskip("numpy")
    assert store.record_many([]) == 0
    store.record(
        row(
            "n",
            params={"lr": np.float32(0.5)},
            metrics={"loss": np.float64(1.5)},
            wall_s=np.float64(2),
        )
    )
    got = store.get("n")
    assert got["params"]["lr"] == 0.5 and got["metrics"]["loss"] == 1.5 and got["wall_s"] == 2.0


def test_completed_keys_with_and_without_a_key_set(store: ResultStore) -> None:
    n = 30_000
    statuses = ("ok", "warning", "failed", "pruned")
    rows = [row(f"key-{i:06d}", statuses[i % 4], combo_index=i) for i in range(n)]
    store.record_many(rows)
    done = {r["key"] for r in rows if r["status"] in ("ok", "warning")}
    assert store.completed_keys() == done

    # 100,000 keys asked about: 30,000 stored, 70,000 never run.
    asked = [f"key-{i:06d}" for i in range(100_000)]
    assert store.completed_keys(asked) == done  # speed: the sweep throughput in make bench

    assert store.completed_keys(["key-000000", "key-000002", "nope"]) == {"key-000000"}
    assert store.completed_keys([]) == set()
    assert store.completed_keys(iter(["key-000001", "key-000001"])) == {"key-000001"}


def test_record_many_of_1000_in_one_call(store: ResultStore) -> None:
    # speed is part of the sweep throughput make bench measures, not a test
    rows = [row(f"k{i}", combo_index=i, log_excerpt="some log\n" * 5) for i in range(1000)]
    assert store.record_many(rows) == 1000
    assert [r["key"] for r in store.rows()] == [f"k{i}" for i in range(1000)]


def test_rows_filters_and_pages(store: ResultStore, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "_PAGE_ROWS", 7)
    steps = ("prep", "train")
    store.record_many(
        [
            row(f"k{i:03d}", "ok" if i % 3 else "failed", step=steps[i % 2], combo_index=i // 2)
            for i in range(50)
        ]
    )
    every = list(store.rows())
    assert [r["key"] for r in every] == [f"k{i:03d}" for i in range(50)]  # order first recorded
    assert all(isinstance(r["params"], dict) for r in every)
    failed = list(store.rows(status="failed"))
    assert len(failed) == 17 and {r["status"] for r in failed} == {"failed"}
    assert len(list(store.rows(status=["ok", "failed"], step="train"))) == 25
    assert {r["key"] for r in store.rows(status="ok", step="prep")} == {
        f"k{i:03d}" for i in range(0, 50, 2) if i % 3
    }
    assert list(store.rows(step="nope")) == []
    with pytest.raises(ExpflowError, match="status 'done'"):
        store.rows(status="done")
    # A replaced row keeps its place.
    store.record(row("k000", "ok", step="train"))
    assert next(iter(store.rows()))["key"] == "k000"


def test_meta_round_trip(store: ResultStore, tmp_path: Path) -> None:
    space = {"lr": {"loguniform": [1e-4, 1e-1]}, "seed": [0, 1, 2]}
    store.set_meta("space", space)
    store.set_meta("config", {"max_workers": 4, "path": tmp_path})
    store.set_meta("note", "first")
    store.set_meta("note", "second")
    assert store.get_meta("space") == space
    assert store.get_meta("config") == {"max_workers": 4, "path": str(tmp_path)}
    assert store.get_meta("note") == "second"
    assert store.get_meta("missing") is None and store.get_meta("missing", 7) == 7
    assert set(store.meta()) == {"config", "note", "space"}
    # Another handle on the same file sees it.
    assert ResultStore(store.path).get_meta("space") == space
    with pytest.raises(ExpflowError, match="meta key"):
        store.set_meta("", 1)
    with pytest.raises(ExpflowError, match="JSON"):
        store.set_meta("x", object())


def test_opening(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    with pytest.raises(ExpflowError, match="no results store"):
        ResultStore(sweep, create=False)
    made = ResultStore.for_sweep_dir(sweep)
    assert made.path == sweep / RESULTS_FILENAME and made.path.exists()
    # An existing sweep folder means the store inside it.
    assert ResultStore(sweep, create=False).path == made.path
    with sqlite3.connect(made.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ExpflowError, match="not usable"):
        ResultStore(":memory:")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ExpflowError, match="cannot be used"):
        ResultStore(junk)
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(ExpflowError, match="schema version 99"):
        ResultStore(newer)


def test_threads_write_at_once(store: ResultStore) -> None:
    threads, per_thread = 8, 40
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                if i % 4 == 0:
                    store.record_many([row(f"t{t}-{i}"), row(f"t{t}-{i}b", "failed")])
                else:
                    store.record(row(f"t{t}-{i}", combo_index=i))
                # Every thread also fights over the same few keys.
                store.record(row(f"shared-{i % 5}", "failed" if t % 2 else "ok"))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=60)
    assert not errors, errors
    assert len(store) == threads * per_thread + threads * per_thread // 4 + 5
    # Some thread wrote ok to each shared key, and a failure never replaced it.
    assert {f"shared-{i}" for i in range(5)} <= store.completed_keys()


_READER = r"""
import json, sys, time
from pathlib import Path
from expflow_flows.sweep.store import ResultStore
path, target = sys.argv[1], int(sys.argv[2])
store = ResultStore(path, create=False)
print("ready", flush=True)
seen = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    n = len(store)
    done = len(store.completed_keys())
    rows = sum(1 for _ in store.rows())
    seen.append([n, done, rows])
    if n >= target:
        break
print(json.dumps(seen), flush=True)
"""


def test_reader_in_another_process_while_writing(store: ResultStore) -> None:
    total, batch = 1500, 25
    store.record(row("first"))  # the file exists before the reader opens it
    child = subprocess.Popen(
        [PYTHON, "-c", _READER, str(store.path), str(total)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        for start in range(1, total, batch):
            store.record_many(
                [row(f"r{i}", "ok" if i % 5 else "failed") for i in range(start, start + batch)]
            )
            time.sleep(0.002)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert len(seen) >= 2 and seen[-1][0] >= total
    # What a reader sees only grows: never a rolled-back or half-written batch.
    for column in range(3):
        counts = [s[column] for s in seen]
        assert counts == sorted(counts)
    # Batches are whole: a count is always 1 (the first row) plus a multiple of the batch.
    assert all((n - 1) % batch == 0 for n, _, _ in seen)


_KILLED_WRITER = r"""
import sys
from expflow_flows.sweep.store import ResultStore
store = ResultStore(sys.argv[1])
i = 0
while True:
    key = f"kill-{i:06d}"
    store.record({"key": key, "status": "ok" if i % 7 else "failed", "combo_index": i,
                  "params": {"i": i}, "metrics": {"loss": i / 3}, "log_excerpt": "x" * (i % 500)})
    # Printed only after the commit returned: everything printed must survive.
    print(key, flush=True)
    i += 1
"""


def test_committed_rows_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "killed" / RESULTS_FILENAME
    child = subprocess.Popen(
        [PYTHON, "-c", _KILLED_WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reported: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while len(reported) < 300 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            reported.append(line.strip())
        # Killed while it is still writing, most likely inside a transaction.
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        # Lines it managed to print before the kill are committed too.
        reported += [
            ln.strip() for ln in child.stdout.read().splitlines(keepends=True) if ln.endswith("\n")
        ]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert len(reported) >= 300, "the writer did not get going"

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = ResultStore(path)
    assert store.integrity_check() == "ok"
    stored = {r["key"] for r in store.rows()}
    assert set(reported) <= stored
    # At most the one row being written when it died is there but unreported.
    assert len(stored) <= len(reported) + 1
    assert store.get(reported[-1])["params"]["i"] == len(reported) - 1
    # And the store takes new writes after the crash.
    assert store.record(row("after-crash"))
    assert "after-crash" in store.completed_keys(["after-crash"])
