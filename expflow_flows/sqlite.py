"""SQLite files shared by threads and processes: one connection per operation, WAL mode,
a bounded retry while the file is locked, and a schema version checked on open.

The experiment ledger and each sweep's results store are such files. A connection is
opened per operation because sqlite3 connections must not be shared between threads or
carried across a fork; every write is one ``BEGIN IMMEDIATE`` transaction, and
``synchronous = NORMAL`` in WAL mode means a crash of the process never loses a commit
(only a power loss may roll back the last ones, and the file stays consistent).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from expflow_flows.errors import ExpflowError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
# Extra tries for the "database is locked" that SQLite returns without waiting
# (WAL recovery, a journal-mode switch); bounded by attempts and by time.
LOCK_RETRIES = 8
_BACKOFF_START_S = 0.01
_BACKOFF_MAX_S = 0.5

T = TypeVar("T")
Begin = Literal["immediate", "deferred", "none"]


def check_limits(busy_timeout_s: float, lock_retries: int) -> tuple[float, int]:
    """``(busy_timeout_s, lock_retries)`` as float and int; a bad pair is one ExpflowError line."""
    if not busy_timeout_s > 0 or lock_retries < 1:
        raise ExpflowError(
            f"busy_timeout_s={busy_timeout_s!r}, lock_retries={lock_retries!r} are not valid; "
            "expected a positive timeout and at least 1 try"
        )
    return float(busy_timeout_s), int(lock_retries)


def connect(
    path: Path | str, *, busy_timeout_s: float, rows: bool = False, foreign_keys: bool = False
) -> sqlite3.Connection:
    """A new connection without implicit transactions (:func:`run_locked` begins and commits).

    ``rows`` returns :class:`sqlite3.Row` rows; ``foreign_keys`` enforces foreign keys.
    """
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    if rows:
        conn.row_factory = sqlite3.Row
    if foreign_keys:
        conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def json_default(value: Any) -> Any:
    """The plain JSON value of a numpy scalar, path or set; TypeError for anything else."""
    # numpy scalars and paths are common in params and metrics; store their plain value.
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            plain = item()
            if isinstance(plain, (int, float, str, bool)) or plain is None:
                return plain
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(type(value).__name__)


def encode_mapping(value: object, what: str) -> str:
    """A dict of name: value as JSON text for a TEXT column; anything else is one ExpflowError line."""
    if not isinstance(value, Mapping):
        raise ExpflowError(f"{what} {value!r} is not a mapping; expected a dict of name: value")
    for key in value:
        if not isinstance(key, str):
            raise ExpflowError(f"{what} key {key!r} is not a string; expected string names")
    try:
        return json.dumps(dict(value), sort_keys=True, default=json_default)
    except (TypeError, ValueError) as exc:
        raise ExpflowError(
            f"{what} {value!r} cannot be stored as JSON ({exc}); expected numbers, strings, "
            "booleans, None, lists and dicts"
        ) from None


def is_locked(exc: sqlite3.OperationalError) -> bool:
    """True when SQLite refused because another connection holds the file."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return True
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def ensure_schema(
    run: Callable[..., Any], statements: Iterable[str], schema_version: int, what: str
) -> None:
    """Put an SQLite file in WAL mode and bring its schema to ``schema_version``.

    ``run`` is the owner's ``_run`` (one transaction through :func:`run_locked`). A file
    with a newer schema is refused with one line.
    """

    def wal(conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            # Persistent in the file: set once, by whichever process gets there first.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("%s: WAL mode is unavailable (got %s)", what, mode)

    def version(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def create(conn: sqlite3.Connection) -> None:
        found = version(conn)
        if found > schema_version:
            raise ExpflowError(
                f"{what} has schema version {found}, newer than this expflow-flows supports "
                f"({schema_version}); upgrade expflow-flows"
            )
        if found < schema_version:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {schema_version}")

    run(wal, begin="none")
    # A read first, so an up-to-date file is opened without taking the write lock.
    if run(version, begin="deferred") != schema_version:
        run(create)


def run_locked(
    connect: Callable[[], sqlite3.Connection],
    work: Callable[[sqlite3.Connection], T],
    *,
    begin: Begin,
    lock_retries: int,
    busy_timeout_s: float,
    fail: Callable[[sqlite3.Error], ExpflowError],
    what: str,
) -> T:
    """Run ``work`` in one transaction on a fresh connection, retrying while the file is locked.

    Bounded by ``lock_retries`` tries and ``busy_timeout_s`` in all. An integrity error is
    the caller's to handle.
    """
    started = time.monotonic()
    delay = _BACKOFF_START_S
    for attempt in range(1, lock_retries + 1):
        conn: sqlite3.Connection | None = None
        try:
            conn = connect()
            if begin != "none":
                conn.execute("BEGIN IMMEDIATE" if begin == "immediate" else "BEGIN")
            result = work(conn)
            if conn.in_transaction:
                conn.execute("COMMIT")
            return result
        except sqlite3.IntegrityError:
            raise
        except sqlite3.OperationalError as exc:
            if not is_locked(exc):
                raise fail(exc) from exc
            waited = time.monotonic() - started
            if attempt == lock_retries or waited >= busy_timeout_s:
                raise ExpflowError(
                    f"{what} stayed locked by another writer for {waited:.1f} s "
                    f"({attempt} tries); try again, or stop the process that holds it"
                ) from exc
            log.debug("%s locked (try %d): %s", what, attempt, exc)
        except sqlite3.DatabaseError as exc:
            raise fail(exc) from exc
        finally:
            if conn is not None:
                # An error (ours or SQLite's) leaves nothing half-written.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                conn.close()
        # Jitter keeps processes that collided from colliding again in lockstep.
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, _BACKOFF_MAX_S)
    raise AssertionError("unreachable")  # pragma: no cover
