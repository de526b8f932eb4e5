"""The results store of one sweep: one SQLite file, ``<sweep_dir>/results.sqlite``.

Every finished run (one combination, or one step of a combination's chain) is
one row, keyed by its cache key, and is committed as soon as it is recorded, so
a ``kill -9`` of the sweep loses nothing that was recorded and a re-run can skip
what :meth:`ResultStore.completed_keys` reports as done.

Like the ledger, the file is in WAL mode (readers never wait for the writer and
never block it), every write is one ``BEGIN IMMEDIATE`` transaction, and each
operation opens its own connection, so one :class:`ResultStore` may be shared by
the threads of the writing process while CLIs and reports read the file from
other processes. ``synchronous = NORMAL``: a crash of the process never loses a
commit; only a power loss may roll back the last few, and the file stays consistent.

``params`` and ``metrics`` are stored as JSON text written by Python's ``json``
module, so NaN and infinities round-trip (as the tokens ``NaN``/``Infinity``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from expflow_flows.errors import ExpflowError, disk_full
from expflow_flows.runs.rundir import STATUSES
from expflow_flows.secrets import scrub
from expflow_flows.sqlite import (
    BUSY_TIMEOUT_S,
    LOCK_RETRIES,
    Begin,
    check_limits,
    connect,
    encode_mapping,
    ensure_schema,
    json_default,
    run_locked,
)

log = logging.getLogger(__name__)

RESULTS_FILENAME = "results.sqlite"
SCHEMA_VERSION = 1
# Statuses that count as done: a re-run skips them, and a failure never replaces them.
COMPLETED_STATUSES = ("ok", "warning")
# A log excerpt is the tail of output.log; more than this is cut from the front.
MAX_LOG_EXCERPT_CHARS = 16_000
# Rows fetched per read transaction by rows(): no read is held open while a
# caller works through a long iteration.
_PAGE_ROWS = 2_000
# Keys per IN (...) query; well under SQLite's smallest variable limit (999).
_IN_CHUNK = 900

T = TypeVar("T")

_SCHEMA: tuple[str, ...] = (
    # params and metrics are JSON objects stored as TEXT: a column declared JSON
    # would get NUMERIC affinity and could turn a JSON text such as "1" into a number.
    """CREATE TABLE IF NOT EXISTS results (
        key TEXT PRIMARY KEY NOT NULL,
        combo_id TEXT,
        combo_index INTEGER,
        step TEXT NOT NULL DEFAULT '',
        params TEXT NOT NULL DEFAULT '{}',
        metrics TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL CHECK (status IN ('ok', 'warning', 'pruned', 'failed')),
        reason TEXT NOT NULL DEFAULT '',
        run_dir TEXT,
        started_at REAL,
        ended_at REAL,
        wall_s REAL,
        cpu_s REAL,
        peak_rss_mb REAL,
        worker TEXT,
        attempts INTEGER NOT NULL DEFAULT 1,
        log_excerpt TEXT,
        recorded_at REAL NOT NULL
    )""",
    # (status, key) covers completed_keys() and counts() without touching the table.
    "CREATE INDEX IF NOT EXISTS results_status ON results (status, key)",
    "CREATE INDEX IF NOT EXISTS results_step ON results (step, status)",
    "CREATE INDEX IF NOT EXISTS results_combo ON results (combo_id, step)",
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    )""",
)

# Column order of the results table; the order of the dicts that get() and rows() return.
COLUMNS: tuple[str, ...] = (
    "key",
    "combo_id",
    "combo_index",
    "step",
    "params",
    "metrics",
    "status",
    "reason",
    "run_dir",
    "started_at",
    "ended_at",
    "wall_s",
    "cpu_s",
    "peak_rss_mb",
    "worker",
    "attempts",
    "log_excerpt",
    "recorded_at",
)
_FLOAT_FIELDS = ("started_at", "ended_at", "wall_s", "cpu_s", "peak_rss_mb", "recorded_at")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM results"
_DONE_SQL = ", ".join(f"'{s}'" for s in COMPLETED_STATUSES)
# Upsert by key. The WHERE keeps a completed row (ok/warning) from being
# replaced by a failed or pruned one: a late duplicate of a task that failed
# elsewhere must not undo a result. Everything else is replaced (latest wins).
_UPSERT = (
    f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT (key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "key")
    + f" WHERE results.status NOT IN ({_DONE_SQL}) OR excluded.status IN ({_DONE_SQL})"
)


def _optional_text(row: Mapping[str, Any], field: str, key: str) -> str | None:
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[return-value]
    if not isinstance(value, str):
        raise ExpflowError(
            f"row {key!r}: {field} {value!r} is not valid; expected a string or None"
        )
    return value


def _optional_float(row: Mapping[str, Any], field: str, key: str) -> float | None:
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # numpy scalars: accept their plain value.
        with contextlib.suppress(Exception):
            value = json_default(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExpflowError(
            f"row {key!r}: {field} {value!r} is not valid; expected a number or None"
        )
    return float(value)


def _optional_int(row: Mapping[str, Any], field: str, key: str, default: int | None) -> int | None:
    value = row.get(field, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        with contextlib.suppress(Exception):
            value = json_default(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ExpflowError(
            f"row {key!r}: {field} {value!r} is not valid; expected a non-negative integer"
        )
    return value


def _encode_row(row: Mapping[str, Any], now: float) -> tuple[Any, ...]:
    """Validate one row dict and return its column values in COLUMNS order."""
    if not isinstance(row, Mapping):
        raise ExpflowError(f"result row {row!r} is not a dict; expected a dict with a 'key' field")
    unknown = sorted(str(f) for f in row if f not in COLUMNS)
    if unknown:
        raise ExpflowError(
            f"result row field(s) {', '.join(unknown)} not known; expected some of {', '.join(COLUMNS)}"
        )
    key = row.get("key")
    if not isinstance(key, str) or not key.strip():
        raise ExpflowError(f"result row key {key!r} is not valid; expected a non-empty string")
    status = row.get("status")
    if status not in STATUSES:
        raise ExpflowError(
            f"row {key!r}: status {status!r} is not valid; expected one of {', '.join(STATUSES)}"
        )
    step = row.get("step")
    step = "" if step is None else step
    if not isinstance(step, str):
        raise ExpflowError(
            f"row {key!r}: step {step!r} is not valid; expected a string ('' for none)"
        )
    reason = row.get("reason")
    reason = "" if reason is None else str(reason)
    log_excerpt = _optional_text(row, "log_excerpt", key)
    if log_excerpt is not None and len(log_excerpt) > MAX_LOG_EXCERPT_CHARS:
        # The end of a log says why it failed; keep that.
        log_excerpt = log_excerpt[-MAX_LOG_EXCERPT_CHARS:]
    params = row.get("params")
    metrics = row.get("metrics")
    recorded_at = _optional_float(row, "recorded_at", key)
    values = {
        "key": key,
        "combo_id": _optional_text(row, "combo_id", key),
        "combo_index": _optional_int(row, "combo_index", key, None),
        "step": step,
        # secret-looking params reach the trainable, never the store or its exports
        "params": encode_mapping({} if params is None else scrub(params), f"row {key!r}: params"),
        "metrics": encode_mapping({} if metrics is None else metrics, f"row {key!r}: metrics"),
        "status": status,
        "reason": reason,
        "run_dir": _optional_text(row, "run_dir", key),
        "worker": _optional_text(row, "worker", key),
        "attempts": _optional_int(row, "attempts", key, 1),
        "log_excerpt": log_excerpt,
        "recorded_at": now if recorded_at is None else recorded_at,
    }
    for field in _FLOAT_FIELDS[:-1]:
        values[field] = _optional_float(row, field, key)
    return tuple(values[c] for c in COLUMNS)


def _decode(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    out = dict(zip(COLUMNS, tuple(row), strict=True))
    out["params"] = json.loads(out["params"])
    out["metrics"] = json.loads(out["metrics"])
    return out


def _check_status(status: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if status is None:
        return None
    wanted = (status,) if isinstance(status, str) else tuple(status)
    for s in wanted:
        if s not in STATUSES:
            raise ExpflowError(f"status {s!r} is not valid; expected one of {', '.join(STATUSES)}")
    return wanted


class ResultStore:
    """The results of one sweep; safe to share between threads and to read from other processes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        lock_retries: int = LOCK_RETRIES,
    ) -> None:
        """Open the store at ``path`` (a file, or an existing sweep folder holding ``results.sqlite``).

        With ``create=False`` a missing file is an error instead of a new, empty store.
        """
        if str(path).strip() in ("", ":memory:"):
            raise ExpflowError(
                f"results store path {str(path)!r} is not usable; expected a file path or sweep folder"
            )
        p = Path(path).expanduser()
        self.path = p / RESULTS_FILENAME if p.is_dir() else p
        self.busy_timeout_s, self.lock_retries = check_limits(busy_timeout_s, lock_retries)
        if not self.path.exists():
            if not create:
                raise ExpflowError(
                    f"no results store at {self.path}; expected a sweep folder holding "
                    f"{RESULTS_FILENAME} or the path of that file"
                )
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ExpflowError(
                    f"cannot create the folder of results store {self.path} "
                    f"({exc.strerror or exc}); expected a writable sweep folder"
                ) from None
        self._ensure_schema()

    @classmethod
    def for_sweep_dir(cls, sweep_dir: str | os.PathLike[str], **kwargs: Any) -> ResultStore:
        """The store ``<sweep_dir>/results.sqlite``, creating the folder if needed."""
        return cls(Path(sweep_dir).expanduser() / RESULTS_FILENAME, **kwargs)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    # --- connections and transactions --------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, busy_timeout_s=self.busy_timeout_s)

    def _fail(self, exc: sqlite3.Error) -> ExpflowError:
        full = disk_full(exc, self.path)
        if full is not None:
            return full
        text = str(exc)
        if "not a database" in text:
            hint = "expected a results.sqlite written by expflow; move the file away"
        elif "unable to open" in text or "readonly" in text:
            hint = "check the folder's permissions"
        else:
            hint = "check the disk and the file"
        return ExpflowError(f"results store {self.path} cannot be used ({text}); {hint}")

    def _run(self, work: Callable[[sqlite3.Connection], T], *, begin: Begin = "immediate") -> T:
        """Run ``work`` in one transaction, retrying while the file is locked (bounded)."""
        return run_locked(
            self._connect,
            work,
            begin=begin,
            lock_retries=self.lock_retries,
            busy_timeout_s=self.busy_timeout_s,
            fail=self._fail,
            what=f"results store {self.path}",
        )

    def _ensure_schema(self) -> None:
        ensure_schema(self._run, _SCHEMA, SCHEMA_VERSION, f"results store {self.path}")

    # --- writing -----------------------------------------------------------------------

    def record(self, row: Mapping[str, Any]) -> bool:
        """Upsert one row by ``key``, committed on return; False when refused (see :meth:`record_many`)."""
        return self.record_many([row]) == 1

    def record_many(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Upsert rows by ``key`` in one transaction; return how many were written.

        A row replaces the stored row of its key, except that an ok/warning row is
        never replaced by a failed or pruned one (that row is skipped, not an
        error); a failed row is replaced by its retry's result. ``recorded_at``
        defaults to now and ``attempts`` to 1. Rows are validated before anything is written.
        """
        now = time.time()
        values = [_encode_row(row, now) for row in rows]
        if not values:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(_UPSERT, values)
            return conn.total_changes - before

        return self._run(work)

    def set_meta(self, key: str, value: Any) -> None:
        """Store sweep-level metadata ``value`` (anything JSON can hold) under ``key``."""
        if not isinstance(key, str) or not key.strip():
            raise ExpflowError(f"meta key {key!r} is not valid; expected a non-empty string")
        try:
            text = json.dumps(value, sort_keys=True, default=json_default)
        except (TypeError, ValueError) as exc:
            raise ExpflowError(
                f"meta {key!r} value {value!r} cannot be stored as JSON ({exc}); expected numbers, "
                "strings, booleans, None, lists and dicts"
            ) from None
        self._run(
            lambda conn: conn.execute(
                "INSERT INTO meta (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, text, time.time()),
            )
        )

    # --- reading -----------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The metadata stored under ``key``, or ``default``."""
        found = self._run(
            lambda conn: conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone(),
            begin="deferred",
        )
        return default if found is None else json.loads(found[0])

    def meta(self) -> dict[str, Any]:
        """All sweep-level metadata, by key."""
        found = self._run(
            lambda conn: conn.execute("SELECT key, value FROM meta ORDER BY key").fetchall(),
            begin="deferred",
        )
        return {k: json.loads(v) for k, v in found}

    def get(self, key: str) -> dict[str, Any] | None:
        """The row stored under ``key`` (params and metrics decoded), or None."""
        found = self._run(
            lambda conn: conn.execute(f"{_SELECT} WHERE key = ?", (key,)).fetchone(),
            begin="deferred",
        )
        return None if found is None else _decode(found)

    def completed_keys(self, keys: Iterable[str] | None = None) -> set[str]:
        """Keys whose row is ok or warning (done: a re-run skips them); with ``keys``, only among those."""
        if keys is None:
            found = self._run(
                lambda conn: conn.execute(
                    f"SELECT key FROM results WHERE status IN ({_DONE_SQL})"
                ).fetchall(),
                begin="deferred",
            )
            return {k for (k,) in found}
        wanted = list(dict.fromkeys(k for k in keys if isinstance(k, str)))
        if not wanted:
            return set()

        def work(conn: sqlite3.Connection) -> set[str]:
            # Chunked IN lookups on the primary key, all in one read snapshot.
            done: set[str] = set()
            for i in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[i : i + _IN_CHUNK]
                sql = (
                    f"SELECT key FROM results WHERE key IN ({', '.join('?' * len(chunk))}) "
                    f"AND status IN ({_DONE_SQL})"
                )
                done.update(k for (k,) in conn.execute(sql, chunk))
            return done

        return self._run(work, begin="deferred")

    def rows(
        self, status: str | Iterable[str] | None = None, step: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Rows in the order first recorded, params and metrics decoded; filtered by status and step.

        Read in pages, each its own short read, so a slow consumer never holds the file.
        """
        statuses = _check_status(status)
        if step is not None and not isinstance(step, str):
            raise ExpflowError(f"step {step!r} is not valid; expected a step name ('' for none)")
        where = ["rowid > ?"]
        args: list[Any] = []
        if statuses is not None:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        if step is not None:
            where.append("step = ?")
            args.append(step)
        sql = f"SELECT rowid, {', '.join(COLUMNS)} FROM results WHERE {' AND '.join(where)} ORDER BY rowid LIMIT ?"

        def page(after: int) -> list[tuple[Any, ...]]:
            return self._run(
                lambda conn: conn.execute(sql, (after, *args, _PAGE_ROWS)).fetchall(),
                begin="deferred",
            )

        def pages() -> Iterator[dict[str, Any]]:
            last = -(2**63)
            while True:
                batch = page(last)
                for found in batch:
                    yield _decode(found[1:])
                if len(batch) < _PAGE_ROWS:
                    return
                last = batch[-1][0]

        # A plain function returning a generator: bad filters fail at the call, not later.
        return pages()

    def counts(self) -> dict[str, int]:
        """How many rows have each status; every status is present, 0 when none."""
        found = self._run(
            lambda conn: conn.execute(
                "SELECT status, COUNT(*) FROM results GROUP BY status"
            ).fetchall(),
            begin="deferred",
        )
        out = dict.fromkeys(STATUSES, 0)
        out.update({s: int(n) for s, n in found})
        return out

    def __len__(self) -> int:
        return int(
            self._run(
                lambda conn: conn.execute("SELECT COUNT(*) FROM results").fetchone()[0],
                begin="deferred",
            )
        )

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` verdict: ``"ok"`` for a sound file."""
        found = self._run(
            lambda conn: conn.execute("PRAGMA integrity_check").fetchall(), begin="deferred"
        )
        return "; ".join(str(r[0]) for r in found)
