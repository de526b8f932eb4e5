"""The experiment ledger: rows, lookups, the lifecycle, and many writers at once."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.governance import ledger as ledger_mod
from expflow_flows.governance.fsm import IllegalTransition
from expflow_flows.governance.ledger import Experiment, Ledger

PYTHON = sys.executable
WORKERS = 8
PER_WORKER = 50
# A hang must fail the test, not the session.
GROUP_TIMEOUT_S = 120.0

# Each worker signals it is ready, waits for "go", then does its part, so all
# eight write at the same moment rather than one after another as they start.
_PRELUDE = r"""
import json, sys, time
from pathlib import Path
from expflow_flows.errors import ExpflowError
from expflow_flows.governance.ledger import Ledger
path, sync, index = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ledger = Ledger(path)
(sync / f"ready-{index}").touch()
deadline = time.monotonic() + 60
while not (sync / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.002)
"""

LIFECYCLE_WORKER = (
    _PRELUDE
    + r"""
count = int(sys.argv[4])
ids = []
for i in range(count):
    exp = ledger.register(f"w{index}", kind="sweep", params={"worker": index, "i": i}, tags=["conc"])
    ledger.transition(exp.id, "start")
    ledger.update(exp.id, metrics={"loss": 1.0 / (i + 1)})
    ledger.update(exp.id, metrics={"acc": i / count})
    ledger.transition(exp.id, "complete", message="done")
    ids.append(exp.id)
print(json.dumps(ids))
"""
)

RACE_WORKER = (
    _PRELUDE
    + r"""
try:
    ledger.transition(sys.argv[4], "start", message=f"worker {index}")
    print("ok")
except ExpflowError as exc:
    print("refused:", exc)
"""
)


def run_group(code: str, db: Path, sync: Path, extra: list[str]) -> list[str]:
    """Start WORKERS processes of ``code``, release them together, return their stdout."""
    sync.mkdir()
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", code, str(db), str(sync), str(i), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        while len(list(sync.glob("ready-*"))) < WORKERS:
            assert time.monotonic() < deadline, "workers did not start in time"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        (sync / "go").touch()
        outputs = []
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            assert p.returncode == 0, err
            outputs.append(out)
        return outputs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("EXPFLOW_HOME", str(root))
    monkeypatch.delenv("EXPFLOW_LEDGER", raising=False)
    return root


@pytest.fixture
def ledger(home: Path) -> Ledger:
    return Ledger()


def raw(path: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, args).fetchall()


# --- the file -------------------------------------------------------------------------


def test_file_under_expflow_home_in_wal_mode(home: Path) -> None:
    led = Ledger()
    assert led.path == home / "ledger.sqlite"
    assert led.path.is_file()
    assert raw(led.path, "PRAGMA journal_mode") == [("wal",)]
    assert raw(led.path, "PRAGMA user_version") == [(ledger_mod.SCHEMA_VERSION,)]
    # Opening again is idempotent and keeps the rows.
    exp = led.register("a")
    assert Ledger().get(exp.id) == exp


def test_path_from_env_and_argument(home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EXPFLOW_LEDGER", str(tmp_path / "env" / "l.db"))
    assert Ledger().path == tmp_path / "env" / "l.db"
    assert Ledger(tmp_path / "arg.db").path == tmp_path / "arg.db"
    assert (tmp_path / "env" / "l.db").is_file()
    with pytest.raises(ExpflowError, match="':memory:' is not usable; expected a file path"):
        Ledger(":memory:")


def test_refuses_newer_schema_and_non_database(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger(path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(ExpflowError, match="schema version 99, newer than"):
        Ledger(path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ExpflowError, match=r"junk.db cannot be used \(file is not a database\)"):
        Ledger(junk)


# --- rows --------------------------------------------------------------------------------


def test_register_and_get(ledger: Ledger, tmp_path: Path) -> None:
    exp = ledger.register(
        "pde-fno",
        kind="sweep",
        trainable="pkg.mod:train",
        params={"lr": 0.01, "layers": [4, 8], "path": tmp_path},
        tags=["pde", "fno", "pde"],
        run_dir=tmp_path / "run",
        flow_run_id="7c2e",
    )
    assert isinstance(exp, Experiment)
    assert exp.id.isdigit()
    assert (exp.name, exp.kind, exp.trainable, exp.state) == (
        "pde-fno",
        "sweep",
        "pkg.mod:train",
        "DRAFT",
    )
    assert exp.params == {"lr": 0.01, "layers": [4, 8], "path": str(tmp_path)}
    assert exp.metrics == {} and exp.tags == ("pde", "fno")
    assert exp.run_dir == str(tmp_path / "run") and exp.flow_run_id == "7c2e"
    assert exp.created_at == exp.updated_at and exp.message == ""
    assert ledger.get(exp.id) == exp
    assert ledger.get(int(exp.id)) == exp
    assert json.loads(json.dumps(exp.as_dict()))["tags"] == ["pde", "fno"]
    assert ledger.history(exp.id) == [
        {
            "seq": ledger.history(exp.id)[0]["seq"],
            "experiment_id": exp.id,
            "from": None,
            "to": "DRAFT",
            "event": "register",
            "at": exp.created_at,
            "message": "",
        }
    ]
    queued = ledger.register("q", state="enqueued", tags="one tag")
    assert queued.state == "ENQUEUED" and queued.tags == ("one tag",)


def test_register_refuses_bad_values(ledger: Ledger) -> None:
    with pytest.raises(ExpflowError, match="experiment name '' is not valid"):
        ledger.register("")
    with pytest.raises(ExpflowError, match="state 'DONE' is not known; expected one of DRAFT"):
        ledger.register("a", state="DONE")
    with pytest.raises(ExpflowError, match="params .* cannot be stored as JSON"):
        ledger.register("a", params={"f": object()})
    with pytest.raises(ExpflowError, match="params 3 is not a mapping"):
        ledger.register("a", params=3)  # type: ignore[arg-type]
    with pytest.raises(ExpflowError, match="tag 5 is not a non-empty string"):
        ledger.register("a", tags=["ok", 5])  # type: ignore[list-item]
    assert ledger.list() == []


def test_get_unknown_and_prefix(ledger: Ledger) -> None:
    exp = ledger.register("a")
    with pytest.raises(ExpflowError, match="no experiment has id or id prefix 999999999 in ledger"):
        ledger.get("999999999")
    with pytest.raises(ExpflowError, match="experiment id 'abc' is not valid; expected its digits"):
        ledger.get("abc")
    # A unique prefix of at least 6 digits finds it; a shorter one does not.
    assert ledger.get(exp.id[:6]) == exp
    with pytest.raises(ExpflowError, match="an id prefix needs at least 6 digits"):
        ledger.get(exp.id[:5])
    others = [ledger.register("b") for _ in range(3)]
    with pytest.raises(ExpflowError, match=f"id prefix {exp.id[:6]} matches more than one"):
        ledger.get(exp.id[:6])
    last = others[-1]
    unique = next(
        last.id[:n]
        for n in range(6, len(last.id) + 1)
        if all(not o.id.startswith(last.id[:n]) for o in [exp, *others[:-1]])
    )
    assert ledger.get(unique) == last


def test_ids_are_time_ordered_within_a_process() -> None:
    ids = [int(ledger_mod.new_experiment_id()) for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_list_filters_newest_first(ledger: Ledger) -> None:
    a = ledger.register("alpha", kind="pipeline", tags=["x"])
    b = ledger.register("beta", kind="sweep", tags=["x", "y"])
    c = ledger.register("alpha", kind="sweep")
    ledger.transition(b.id, "start")
    assert [e.id for e in ledger.list()] == [c.id, b.id, a.id]
    assert [e.id for e in ledger.list(name="alpha")] == [c.id, a.id]
    assert [e.id for e in ledger.list(kind="sweep")] == [c.id, b.id]
    assert [e.id for e in ledger.list(tag="x")] == [b.id, a.id]
    assert [e.id for e in ledger.list(tag="y", kind="sweep")] == [b.id]
    assert [e.id for e in ledger.list(state="running")] == [b.id]
    assert [e.id for e in ledger.list(state="DRAFT", limit=1)] == [c.id]
    assert len(ledger.list(limit=None)) == 3
    assert ledger.count() == 3 and ledger.count(name="alpha", kind="sweep") == 1
    assert ledger.count(state="RUNNING", tag="y") == 1 and ledger.count(tag="none") == 0
    with pytest.raises(ExpflowError, match="state 'done' is not known; expected one of DRAFT, "):
        ledger.list(state="done")
    with pytest.raises(ExpflowError, match="limit 0 is not valid; expected a positive integer"):
        ledger.list(limit=0)


def test_update_merges_metrics(ledger: Ledger, tmp_path: Path) -> None:
    exp = ledger.register("a", params={"lr": 1}, tags=["t"])
    ledger.update(exp.id, metrics={"loss": 0.5, "acc": 0.1})
    got = ledger.update(
        exp.id,
        metrics={"acc": 0.9},
        params={"lr": 2},
        tags=["u"],
        run_dir=tmp_path,
        flow_run_id="flow-1",
    )
    assert got.metrics == {"loss": 0.5, "acc": 0.9}
    assert got.params == {"lr": 2} and got.tags == ("u",)
    assert got.run_dir == str(tmp_path) and got.flow_run_id == "flow-1"
    assert got.state == "DRAFT" and got.updated_at >= exp.updated_at
    assert ledger.get(exp.id) == got
    assert ledger.update(exp.id) == got
    assert ledger.find_by_flow_run("flow-1") == got
    assert ledger.find_by_flow_run("flow-2") is None
    with pytest.raises(ExpflowError, match="metrics 'x' is not a mapping"):
        ledger.update(exp.id, metrics="x")  # type: ignore[arg-type]
    with pytest.raises(ExpflowError, match="no experiment has id or id prefix 1234567"):
        ledger.update("1234567", metrics={"a": 1})


def test_delete_removes_row_and_history(ledger: Ledger) -> None:
    keep = ledger.register("keep")
    gone = ledger.register("gone")
    ledger.transition(gone.id, "start")
    ledger.delete(gone.id)
    with pytest.raises(ExpflowError, match=f"no experiment has id or id prefix {gone.id}"):
        ledger.get(gone.id)
    assert raw(
        ledger.path, "SELECT COUNT(*) FROM transitions WHERE experiment_id = ?", int(gone.id)
    ) == [(0,)]
    assert [e.id for e in ledger.list()] == [keep.id]
    assert len(ledger.history(keep.id)) == 1
    with pytest.raises(ExpflowError, match="no experiment has id"):
        ledger.delete(gone.id)


# --- the lifecycle -------------------------------------------------------------------------


def test_transitions_and_history(ledger: Ledger) -> None:
    exp = ledger.register("a")
    ledger.transition(exp.id, "enqueue")
    running = ledger.transition(exp.id[:10], "start", message="worker 3")
    assert running.state == "RUNNING" and running.message == "worker 3"
    failed = ledger.transition(exp.id, "fail", message="CUDA out of memory")
    assert failed.state == "FAILED" and failed.message == "CUDA out of memory"
    assert ledger.transition(exp.id, "retry").state == "ENQUEUED"
    steps = [(h["from"], h["to"], h["event"], h["message"]) for h in ledger.history(exp.id)]
    assert steps == [
        (None, "DRAFT", "register", ""),
        ("DRAFT", "ENQUEUED", "enqueue", ""),
        ("ENQUEUED", "RUNNING", "start", "worker 3"),
        ("RUNNING", "FAILED", "fail", "CUDA out of memory"),
        ("FAILED", "ENQUEUED", "retry", ""),
    ]


def test_illegal_transition_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    exp = ledger.transition(ledger.register("a").id, "start")
    done = ledger.transition(exp.id, "complete", message="ok")
    before = ledger.history(exp.id)
    with pytest.raises(
        IllegalTransition,
        match=f"experiment {exp.id}: cannot start an experiment in state COMPLETED; "
        "allowed from COMPLETED: none",
    ):
        ledger.transition(exp.id, "start", message="again")
    assert ledger.get(exp.id) == done
    assert ledger.history(exp.id) == before
    with pytest.raises(ExpflowError, match="event 'finish' is not known; expected one of"):
        ledger.transition(exp.id, "finish")


def test_move_to_follows_the_shortest_path(ledger: Ledger) -> None:
    exp = ledger.register("a")
    done = ledger.move_to(exp.id, "COMPLETED", message="prefect: Completed")
    assert done.state == "COMPLETED" and done.message == "prefect: Completed"
    events = [h["event"] for h in ledger.history(exp.id)]
    assert events == ["register", "start", "complete"]
    # Already there: nothing changes, no history row.
    assert ledger.move_to(exp.id, "completed") == done
    assert len(ledger.history(exp.id)) == 3
    with pytest.raises(
        IllegalTransition, match="cannot move an experiment from COMPLETED to RUNNING"
    ):
        ledger.move_to(exp.id, "RUNNING")
    assert ledger.get(exp.id) == done
    with pytest.raises(ExpflowError, match="state 'Crashed' is not known"):
        ledger.move_to(exp.id, "Crashed")


# --- many users at once ---------------------------------------------------------------------


def test_shared_between_threads(ledger: Ledger) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(25):
                exp = ledger.register(f"t{n}", params={"i": i})
                ledger.transition(exp.id, "start")
                ledger.update(exp.id, metrics={"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    rows = ledger.list(limit=None)
    assert len(rows) == 100 and {e.state for e in rows} == {"RUNNING"}


def test_waits_for_a_held_lock_then_gives_up_without_hanging(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.db", busy_timeout_s=0.3)
    # Released from a timer thread, hence check_same_thread=False.
    holder = sqlite3.connect(led.path, isolation_level=None, check_same_thread=False)
    try:
        # Held briefly: the write waits and succeeds.
        holder.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.15, lambda: holder.execute("COMMIT"))
        timer.start()
        assert led.register("waited").name == "waited"
        timer.join()
        # Held for good: a bounded wait, then a clear error, and no row.
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(ExpflowError, match=r"l.db stayed locked by another writer for"):
            led.register("blocked")
        assert time.monotonic() - started < 5
    finally:
        holder.close()
    assert [e.name for e in led.list()] == ["waited"]


def test_locked_midway_rolls_back_and_retries_once(ledger: Ledger, monkeypatch) -> None:
    real = Ledger._record
    calls = {"n": 0}

    def flaky(*args: object) -> None:
        # Fails after the experiment row was inserted, inside the same transaction.
        calls["n"] += 1
        if calls["n"] <= 2:
            raise sqlite3.OperationalError("database is locked")
        real(*args)

    monkeypatch.setattr(Ledger, "_record", staticmethod(flaky))
    exp = ledger.register("retried")
    assert calls["n"] == 3
    assert ledger.list(limit=None) == [exp]
    assert [h["event"] for h in ledger.history(exp.id)] == ["register"]


def test_eight_processes_write_at_once(home: Path, tmp_path: Path) -> None:
    led = Ledger()
    started = time.monotonic()
    outputs = run_group(LIFECYCLE_WORKER, led.path, tmp_path / "sync", [str(PER_WORKER)])
    elapsed = time.monotonic() - started
    print(f"{WORKERS} writers x {PER_WORKER} experiments: {elapsed:.2f} s")
    per_worker = [json.loads(out) for out in outputs]
    for ids in per_worker:
        assert len(ids) == PER_WORKER
        assert [int(i) for i in ids] == sorted(int(i) for i in ids)  # time-ordered in a process
    all_ids = [i for ids in per_worker for i in ids]
    total = WORKERS * PER_WORKER
    assert len(set(all_ids)) == total

    rows = led.list(limit=None)
    # The writers really overlapped: each one's first row is older than every one's last.
    spans = [
        (
            min(e.created_at for e in rows if e.name == f"w{i}"),
            max(e.created_at for e in rows if e.name == f"w{i}"),
        )
        for i in range(WORKERS)
    ]
    assert max(first for first, _ in spans) < min(last for _, last in spans)
    assert len(rows) == total
    assert {e.id for e in rows} == set(all_ids)
    assert {e.state for e in rows} == {"COMPLETED"}
    assert all(set(e.metrics) == {"loss", "acc"} for e in rows)
    assert all(e.message == "done" and e.tags == ("conc",) for e in rows)
    assert led.count(state="COMPLETED", tag="conc") == total
    history = raw(
        led.path,
        "SELECT experiment_id, group_concat(event, ',') FROM "
        "(SELECT * FROM transitions ORDER BY seq) GROUP BY experiment_id",
    )
    assert len(history) == total
    assert {events for _, events in history} == {"register,start,complete"}
    assert raw(led.path, "SELECT COUNT(*) FROM transitions") == [(3 * total,)]
    assert raw(led.path, "PRAGMA integrity_check") == [("ok",)]


def test_racing_start_succeeds_exactly_once(home: Path, tmp_path: Path) -> None:
    led = Ledger()
    exp = led.register("contested", state="ENQUEUED")
    outputs = run_group(RACE_WORKER, led.path, tmp_path / "sync", [exp.id])
    results = [out.strip() for out in outputs]
    assert sum(r == "ok" for r in results) == 1, results
    refused = [r for r in results if r != "ok"]
    assert len(refused) == WORKERS - 1
    assert all("cannot start an experiment in state RUNNING" in r for r in refused), refused
    assert led.get(exp.id).state == "RUNNING"
    assert [h["event"] for h in led.history(exp.id)] == ["register", "start"]
