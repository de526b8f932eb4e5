"""The experiment ledger: every experiment, its lifecycle state and its history, in SQLite.

One database, ``<expflow home>/ledger.sqlite`` (or ``$EXPFLOW_LEDGER``, or the
path given to :class:`Ledger`), in WAL mode so readers never wait for the
writer. Every write is one ``BEGIN IMMEDIATE`` transaction: a transition reads
the state and writes the new one under the write lock, so two processes can
never both make the same move. Each operation opens its own connection, because
sqlite3 connections must not be shared between threads or carried across a
fork, while one :class:`Ledger` may be used from many threads.

Experiment ids are snowflake-style integers, shown as decimal strings:
milliseconds since 2024-01-01 UTC << 22 | (pid mod 1024) << 12 | a per-process
sequence. They sort by creation time, and the primary key rejects the rare
collision (two processes whose pids agree mod 1024, in the same millisecond),
which is then retried with a fresh id.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from expflow_flows.errors import ExpflowError
from expflow_flows.governance import fsm
from expflow_flows.home import expflow_home
from expflow_flows.sqlite import (
    BUSY_TIMEOUT_S,
    LOCK_RETRIES,
    Begin,
    check_limits,
    connect,
    encode_mapping,
    ensure_schema,
    run_locked,
)

LEDGER_ENV = "EXPFLOW_LEDGER"
SCHEMA_VERSION = 2  # 2: the processes table (reconciling runs whose process died)
MIN_PREFIX = 6
_ID_EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
_ID_RE = re.compile(r"^[0-9]{1,19}$")
_MAX_ID = 2**63 - 1
_ID_COLLISION_TRIES = 5

T = TypeVar("T")

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS experiments (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        trainable TEXT NOT NULL DEFAULT '',
        params TEXT NOT NULL DEFAULT '{}',
        metrics TEXT NOT NULL DEFAULT '{}',
        tags TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL,
        flow_run_id TEXT,
        run_dir TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS experiments_state ON experiments (state)",
    "CREATE INDEX IF NOT EXISTS experiments_name ON experiments (name)",
    "CREATE INDEX IF NOT EXISTS experiments_flow_run ON experiments (flow_run_id)",
    """CREATE TABLE IF NOT EXISTS transitions (
        seq INTEGER PRIMARY KEY,
        experiment_id INTEGER NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
        from_state TEXT,
        to_state TEXT NOT NULL,
        event TEXT NOT NULL,
        at TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS transitions_experiment ON transitions (experiment_id, seq)",
    # The process a RUNNING experiment runs in: when it is gone, the run crashed.
    """CREATE TABLE IF NOT EXISTS processes (
        experiment_id INTEGER PRIMARY KEY REFERENCES experiments (id) ON DELETE CASCADE,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started TEXT NOT NULL DEFAULT ''
    )""",
)

_COLUMNS = (
    "id, name, kind, trainable, params, metrics, tags, state, flow_run_id, run_dir, "
    "created_at, updated_at, message"
)


# --- processes -------------------------------------------------------------------------


def process_start(pid: int) -> str:
    """When process ``pid`` started, as the kernel counts it ('' where unknown): a pid
    reused by another process has another start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def process_alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` (started at ``started``) still runs on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if started and process_start(int(pid)) not in ("", started):
        return False  # the pid now belongs to another process
    return True


# --- ids -----------------------------------------------------------------------------


class _IdSource:
    """Per-process snowflake ids: strictly increasing within the process, even if the clock steps back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._seq = 0

    def reset(self) -> None:
        # A child forked while another thread held the lock would deadlock on it.
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            now = max(int(time.time() * 1000) - _ID_EPOCH_MS, self._last_ms)
            if now == self._last_ms:
                self._seq = (self._seq + 1) & 0xFFF
                if self._seq == 0:
                    # 4096 ids in one millisecond: borrow the next one rather than wait.
                    now += 1
            else:
                self._seq = 0
            self._last_ms = now
            return now << 22 | (os.getpid() & 0x3FF) << 12 | self._seq


_IDS = _IdSource()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_IDS.reset)


def new_experiment_id() -> str:
    """A fresh time-ordered experiment id (decimal digits)."""
    return str(_IDS.next())


# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """One ledger row, with params, metrics and tags decoded."""

    id: str
    name: str
    kind: str
    trainable: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    tags: tuple[str, ...]
    state: str
    flow_run_id: str | None
    run_dir: str | None
    created_at: str
    updated_at: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        """The experiment as plain JSON-ready values (tags as a list)."""
        out = asdict(self)
        out["tags"] = list(self.tags)
        return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _normalize_tags(tags: object) -> tuple[str, ...]:
    if tags is None:
        return ()
    # One string is one tag, not a sequence of one-letter tags.
    items: Iterable[object] = (tags,) if isinstance(tags, str) else tags  # type: ignore[assignment]
    try:
        items = list(items)
    except TypeError:
        raise ExpflowError(f"tags {tags!r} is not a list; expected a list of strings") from None
    out: list[str] = []
    for tag in items:
        if not isinstance(tag, str) or not tag.strip():
            raise ExpflowError(f"tag {tag!r} is not a non-empty string; expected a list of strings")
        if tag.strip() not in out:
            out.append(tag.strip())
    return tuple(out)


def _text(value: object, what: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise ExpflowError(f"{what} {value!r} is not valid; expected a non-empty string")
    return value.strip()


def _optional_text(value: object, what: str) -> str | None:
    # Paths and UUIDs (Prefect's flow run ids) are stored as their string form.
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        raise ExpflowError(f"{what} {value!r} is empty; expected a value or None")
    return text


def _row(row: sqlite3.Row) -> Experiment:
    return Experiment(
        id=str(row["id"]),
        name=row["name"],
        kind=row["kind"],
        trainable=row["trainable"],
        params=json.loads(row["params"]),
        metrics=json.loads(row["metrics"]),
        tags=tuple(json.loads(row["tags"])),
        state=row["state"],
        flow_run_id=row["flow_run_id"],
        run_dir=row["run_dir"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        message=row["message"],
    )


def default_ledger_path() -> Path:
    """``$EXPFLOW_LEDGER`` or ``<expflow home>/ledger.sqlite``."""
    env = os.environ.get(LEDGER_ENV, "").strip()
    return Path(env).expanduser() if env else expflow_home() / "ledger.sqlite"


# --- the ledger ------------------------------------------------------------------------


# --- the ledger ------------------------------------------------------------------------


class Ledger:
    """The experiment ledger; safe to share between threads and to open from many processes."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        lock_retries: int = LOCK_RETRIES,
    ) -> None:
        """Open (and create, with its schema, if needed) the ledger at ``path`` or the default."""
        if path is not None and str(path).strip() in ("", ":memory:"):
            raise ExpflowError(
                f"ledger path {str(path)!r} is not usable; expected a file path "
                "(each operation opens its own connection, so an in-memory database would be lost)"
            )
        self.path = Path(path).expanduser() if path is not None else default_ledger_path()
        self.busy_timeout_s, self.lock_retries = check_limits(busy_timeout_s, lock_retries)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExpflowError(
                f"cannot create the folder of ledger {self.path} ({exc.strerror or exc}); "
                f"set {LEDGER_ENV} to a writable path"
            ) from None
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    # --- connections and transactions --------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, busy_timeout_s=self.busy_timeout_s, rows=True, foreign_keys=True)

    def _fail(self, exc: sqlite3.Error) -> ExpflowError:
        text = str(exc)
        if "not a database" in text:
            hint = f"move it away or set {LEDGER_ENV} to another path"
        elif "unable to open" in text or "readonly" in text:
            hint = f"check the folder's permissions or set {LEDGER_ENV} to a writable path"
        else:
            hint = "check the disk and the file, or restore it from a copy"
        return ExpflowError(f"ledger {self.path} cannot be used ({text}); {hint}")

    def _run(self, work: Callable[[sqlite3.Connection], T], *, begin: Begin = "immediate") -> T:
        """Run ``work`` in one transaction, retrying while the file is locked (bounded)."""
        return run_locked(
            self._connect,
            work,
            begin=begin,
            lock_retries=self.lock_retries,
            busy_timeout_s=self.busy_timeout_s,
            fail=self._fail,
            what=f"ledger {self.path}",
        )

    def _ensure_schema(self) -> None:
        ensure_schema(self._run, _SCHEMA, SCHEMA_VERSION, f"ledger {self.path}")

    # --- helpers inside a transaction --------------------------------------------------

    def _resolve(self, conn: sqlite3.Connection, exp_id: object) -> int:
        """The full id for ``exp_id``: an exact id, or a unique prefix of at least MIN_PREFIX digits."""
        text = str(exp_id).strip() if isinstance(exp_id, (str, int)) else ""
        if isinstance(exp_id, bool) or not _ID_RE.fullmatch(text):
            raise ExpflowError(
                f"experiment id {exp_id!r} is not valid; expected its digits "
                f"(or a unique prefix of at least {MIN_PREFIX})"
            )
        if int(text) <= _MAX_ID:
            row = conn.execute("SELECT id FROM experiments WHERE id = ?", (int(text),)).fetchone()
            if row is not None:
                return int(row[0])
        if len(text) < MIN_PREFIX:
            raise ExpflowError(
                f"no experiment has id {text} in ledger {self.path}; "
                f"an id prefix needs at least {MIN_PREFIX} digits"
            )
        rows = conn.execute(
            "SELECT id FROM experiments WHERE substr(CAST(id AS TEXT), 1, ?) = ? "
            "ORDER BY id DESC LIMIT 3",
            (len(text), text),
        ).fetchall()
        if not rows:
            raise ExpflowError(f"no experiment has id or id prefix {text} in ledger {self.path}")
        if len(rows) > 1:
            shown = ", ".join(str(r[0]) for r in rows[:2])
            raise ExpflowError(
                f"id prefix {text} matches more than one experiment ({shown}, ...); give more digits"
            )
        return int(rows[0][0])

    @staticmethod
    def _fetch(conn: sqlite3.Connection, eid: int) -> Experiment:
        row = conn.execute(f"SELECT {_COLUMNS} FROM experiments WHERE id = ?", (eid,)).fetchone()
        return _row(row)

    @staticmethod
    def _record(
        conn: sqlite3.Connection,
        eid: int,
        src: str | None,
        dst: str,
        event: str,
        at: str,
        message: str,
    ) -> None:
        conn.execute(
            "INSERT INTO transitions (experiment_id, from_state, to_state, event, at, message) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (eid, src, dst, event, at, message),
        )

    # --- public API --------------------------------------------------------------------

    def register(
        self,
        name: str,
        *,
        kind: str = "pipeline",
        trainable: str = "",
        params: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        run_dir: str | os.PathLike[str] | None = None,
        flow_run_id: object | None = None,
        state: str = fsm.DRAFT,
    ) -> Experiment:
        """Add an experiment (state DRAFT unless given) and its first history row, event ``register``."""
        name = _text(name, "experiment name")
        kind = _text(kind, "experiment kind")
        trainable = _text(trainable, "trainable", empty_ok=True)
        params_json = encode_mapping({} if params is None else params, "params")
        tags_json = json.dumps(list(_normalize_tags(tags)))
        state = fsm.check_state(state)
        run_dir_text = _optional_text(run_dir, "run_dir")
        flow_run_text = _optional_text(flow_run_id, "flow_run_id")

        def work(conn: sqlite3.Connection, eid: int) -> Experiment:
            at = _now()
            conn.execute(
                f"INSERT INTO experiments ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, '{{}}', ?, ?, ?, ?, ?, ?, '')",
                (
                    eid,
                    name,
                    kind,
                    trainable,
                    params_json,
                    tags_json,
                    state,
                    flow_run_text,
                    run_dir_text,
                    at,
                    at,
                ),
            )
            self._record(conn, eid, None, state, "register", at, "")
            return self._fetch(conn, eid)

        # The id is drawn once per try, outside the lock retries: a retried
        # transaction reuses it, so a retry can never add the row twice.
        for attempt in range(1, _ID_COLLISION_TRIES + 1):
            eid = int(new_experiment_id())
            try:
                return self._run(lambda conn, eid=eid: work(conn, eid))
            except sqlite3.IntegrityError as exc:
                # Only the id can collide (another process, same pid mod 1024, same ms).
                if attempt == _ID_COLLISION_TRIES:
                    raise self._fail(exc) from exc
                time.sleep(random.uniform(0.001, 0.005))
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, exp_id: str | int) -> Experiment:
        """The experiment with id ``exp_id`` (or a unique prefix of at least 6 digits)."""
        return self._run(
            lambda conn: self._fetch(conn, self._resolve(conn, exp_id)), begin="deferred"
        )

    def find_by_flow_run(self, flow_run_id: object) -> Experiment | None:
        """The newest experiment tied to ``flow_run_id`` (a Prefect flow run id), or None."""
        key = _optional_text(flow_run_id, "flow_run_id")

        def work(conn: sqlite3.Connection) -> Experiment | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM experiments WHERE flow_run_id = ? ORDER BY id DESC LIMIT 1",
                (key,),
            ).fetchone()
            return None if row is None else _row(row)

        return self._run(work, begin="deferred")

    @staticmethod
    def _filters(
        state: str | None, name: str | None, kind: str | None, tag: str | None
    ) -> tuple[str, list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        if state is not None:
            where.append("state = ?")
            args.append(fsm.check_state(state))
        if name is not None:
            where.append("name = ?")
            args.append(_text(name, "experiment name"))
        if kind is not None:
            where.append("kind = ?")
            args.append(_text(kind, "experiment kind"))
        if tag is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(experiments.tags) WHERE value = ?)")
            args.append(_text(tag, "tag"))
        return (" WHERE " + " AND ".join(where) if where else ""), args

    def list(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        kind: str | None = None,
        tag: str | None = None,
        limit: int | None = 100,
    ) -> list[Experiment]:
        """Experiments matching every filter given, newest first; ``limit=None`` for all."""
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ExpflowError(f"limit {limit!r} is not valid; expected a positive integer or None")
        where, args = self._filters(state, name, kind, tag)
        sql = f"SELECT {_COLUMNS} FROM experiments{where} ORDER BY id DESC LIMIT ?"
        args.append(-1 if limit is None else limit)
        return self._run(
            lambda conn: [_row(r) for r in conn.execute(sql, args).fetchall()], begin="deferred"
        )

    def count(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        kind: str | None = None,
        tag: str | None = None,
    ) -> int:
        """How many experiments match every filter given (the filters of :meth:`list`)."""
        where, args = self._filters(state, name, kind, tag)
        sql = f"SELECT COUNT(*) FROM experiments{where}"
        return self._run(lambda conn: int(conn.execute(sql, args).fetchone()[0]), begin="deferred")

    def transition(self, exp_id: str | int, event: str, message: str = "") -> Experiment:
        """Apply lifecycle ``event`` atomically; an illegal move raises and changes nothing."""
        event = fsm.check_event(event)
        message = str(message or "")

        def work(conn: sqlite3.Connection) -> Experiment:
            eid = self._resolve(conn, exp_id)
            src = conn.execute("SELECT state FROM experiments WHERE id = ?", (eid,)).fetchone()[0]
            try:
                dst = fsm.next_state(src, event)
            except fsm.IllegalTransition as exc:
                raise fsm.IllegalTransition(f"experiment {eid}: {exc}") from None
            at = _now()
            conn.execute(
                "UPDATE experiments SET state = ?, message = ?, updated_at = ? WHERE id = ?",
                (dst, message, at, eid),
            )
            self._record(conn, eid, src, dst, event, at, message)
            return self._fetch(conn, eid)

        return self._run(work)

    def move_to(self, exp_id: str | int, target_state: str, message: str = "") -> Experiment:
        """Move to ``target_state`` by the shortest legal events (one history row each); no-op if there."""
        target = fsm.check_state(target_state)
        message = str(message or "")

        def work(conn: sqlite3.Connection) -> Experiment:
            eid = self._resolve(conn, exp_id)
            src = conn.execute("SELECT state FROM experiments WHERE id = ?", (eid,)).fetchone()[0]
            if src == target:
                return self._fetch(conn, eid)
            try:
                events = fsm.path_to(src, target)
            except fsm.IllegalTransition as exc:
                raise fsm.IllegalTransition(f"experiment {eid}: {exc}") from None
            at = _now()
            state = src
            for event in events:
                nxt = fsm.next_state(state, event)
                self._record(conn, eid, state, nxt, event, at, message)
                state = nxt
            conn.execute(
                "UPDATE experiments SET state = ?, message = ?, updated_at = ? WHERE id = ?",
                (state, message, at, eid),
            )
            return self._fetch(conn, eid)

        return self._run(work)

    def claim(self, exp_id: str | int, *, pid: int | None = None) -> None:
        """Record that this process (or ``pid``) on this host runs the experiment."""
        pid = os.getpid() if pid is None else int(pid)
        host = socket.gethostname()
        started = process_start(pid)

        def work(conn: sqlite3.Connection) -> None:
            eid = self._resolve(conn, exp_id)
            conn.execute(
                "INSERT OR REPLACE INTO processes (experiment_id, host, pid, started) "
                "VALUES (?, ?, ?, ?)",
                (eid, host, pid, started),
            )

        self._run(work)

    def reconcile(self) -> list[Experiment]:
        """Fail the RUNNING experiments of this host whose process is gone (killed, the
        machine rebooted): nothing else would ever end them. Returns those failed."""
        host = socket.gethostname()

        def running(conn: sqlite3.Connection) -> list[tuple[int, int, str]]:
            return conn.execute(
                "SELECT e.id, p.pid, p.started FROM experiments e "
                "JOIN processes p ON p.experiment_id = e.id "
                "WHERE e.state IN ('RUNNING', 'CANCEL_PENDING') AND p.host = ?",
                (host,),
            ).fetchall()

        ended = []
        for eid, pid, started in self._run(running, begin="deferred"):
            if process_alive(pid, started):
                continue
            message = f"crashed: its process (pid {pid} on {host}) is gone"
            try:
                ended.append(self.move_to(eid, fsm.FAILED, message=message))
            except (ExpflowError, fsm.IllegalTransition):
                continue  # moved on meanwhile
        return ended

    def update(
        self,
        exp_id: str | int,
        *,
        metrics: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Iterable[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        flow_run_id: object | None = None,
    ) -> Experiment:
        """Change fields: ``metrics`` are merged into the stored ones, the others replace them.

        A field left as None is not changed.
        """
        sets: list[str] = []
        args: list[Any] = []
        if params is not None:
            sets.append("params = ?")
            args.append(encode_mapping(params, "params"))
        if tags is not None:
            sets.append("tags = ?")
            args.append(json.dumps(list(_normalize_tags(tags))))
        if run_dir is not None:
            sets.append("run_dir = ?")
            args.append(_optional_text(run_dir, "run_dir"))
        if flow_run_id is not None:
            sets.append("flow_run_id = ?")
            args.append(_optional_text(flow_run_id, "flow_run_id"))
        if metrics is not None:
            encode_mapping(metrics, "metrics")  # validate before taking the write lock

        def work(conn: sqlite3.Connection) -> Experiment:
            eid = self._resolve(conn, exp_id)
            fields, values = list(sets), list(args)
            if metrics is not None:
                # Merged inside the write transaction, so concurrent updates never drop a metric.
                old = conn.execute(
                    "SELECT metrics FROM experiments WHERE id = ?", (eid,)
                ).fetchone()
                merged = {**json.loads(old[0]), **dict(metrics)}
                fields.append("metrics = ?")
                values.append(encode_mapping(merged, "metrics"))
            if fields:
                fields.append("updated_at = ?")
                values.append(_now())
                conn.execute(
                    f"UPDATE experiments SET {', '.join(fields)} WHERE id = ?", (*values, eid)
                )
            return self._fetch(conn, eid)

        return self._run(work)

    def history(self, exp_id: str | int) -> list[dict[str, Any]]:
        """The experiment's transitions, oldest first: ``from``, ``to``, ``event``, ``at``, ``message``."""

        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            eid = self._resolve(conn, exp_id)
            rows = conn.execute(
                "SELECT seq, experiment_id, from_state, to_state, event, at, message "
                "FROM transitions WHERE experiment_id = ? ORDER BY seq",
                (eid,),
            ).fetchall()
            return [
                {
                    "seq": r["seq"],
                    "experiment_id": str(r["experiment_id"]),
                    "from": r["from_state"],
                    "to": r["to_state"],
                    "event": r["event"],
                    "at": r["at"],
                    "message": r["message"],
                }
                for r in rows
            ]

        return self._run(work, begin="deferred")

    def delete(self, exp_id: str | int) -> None:
        """Remove the experiment and its history."""

        def work(conn: sqlite3.Connection) -> None:
            eid = self._resolve(conn, exp_id)
            conn.execute("DELETE FROM transitions WHERE experiment_id = ?", (eid,))
            conn.execute("DELETE FROM experiments WHERE id = ?", (eid,))

        self._run(work)
