"""The PIN guard: one check every destructive or irreversible act goes through.

The PIN (4 to 12 digits) is kept only as a salted argon2id hash: by default 64 MiB,
3 passes, 1 lane, a 16-byte salt and a 32-byte tag, about 0.2 s per check on a quiet
2-core machine, so guessing every 4-digit PIN from a stolen file takes about half an hour
of one core's time (``benchmarks/bench_pin.py``). The hash is the PHC string
``$argon2id$v=19$m=65536,t=3,p=1$salt$hash``, parameters included, so the default can be
raised later: a correct PIN rehashes a weaker hash, or the scrypt hash of earlier
versions, at the current default. It is read from ``<home>/pin.json`` (mode 0600, never a
symlink), else from ``$EXPFLOW_PIN_HASH``; with neither, no PIN is set and guarded acts
are allowed (and logged as such).

Setting a PIN also writes a row in the ledger's SQLite database (table ``pin_state``):
that a PIN is set, its hash and the SHA-256 of pin.json. A pin.json that is then missing,
replaced or a symlink refuses every guarded act until ``expflow pin clear`` is given the
PIN, checked against that row; deleting the file never turns the guard off.

Five wrong PINs in a row lock PIN entry for 30 s, doubling with each further lockout up
to 1 h. The count lives in that row and in ``<home>/pin_state.json`` (the stricter of the
two applies, so deleting the file lifts nothing); it holds across processes, and a correct
PIN resets it. Every guarded act, allowed, forced or refused, is appended to
``<home>/audit.log`` as one JSON line. The PIN and its hash never appear in messages, logs
or the audit log, and the PIN is never written anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import re
import socket
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from argon2 import Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.low_level import hash_secret, verify_secret

from expflow_flows import atomic
from expflow_flows.errors import ExpflowError, GuardRefused
from expflow_flows.governance.ledger import default_ledger_path
from expflow_flows.home import expflow_home
from expflow_flows.sqlite import BUSY_TIMEOUT_S, LOCK_RETRIES, connect, run_locked

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PIN_RE = re.compile(r"^[0-9]{4,12}$")
SALT_BYTES = 16
DKLEN = 32
MAX_FAILURES = 5
LOCKOUT_BASE_S = 30.0
LOCKOUT_MAX_S = 3600.0
PIN_HASH_ENV = "EXPFLOW_PIN_HASH"
PIN_ENV = "EXPFLOW_PIN"
_HASH_FORMAT = "$argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>$<hash>"
_LEGACY_FORMAT = "scrypt$n$r$p$salt_hex$hash_hex"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

Source = Literal["file", "env", "record"]
Outcome = Literal["allowed", "allowed-no-pin", "forced", "refused"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Argon2Cost:
    """argon2id cost parameters; lower them only explicitly (tests), never by default."""

    memory_kib: int = 65536
    time_cost: int = 3
    parallelism: int = 1

    def check(self) -> None:
        """Reject parameters argon2id cannot use or that would take unbounded memory or time."""
        if not 1 <= self.parallelism <= 16:
            raise ExpflowError(f"argon2id parallelism={self.parallelism} must be from 1 to 16")
        if not 8 * self.parallelism <= self.memory_kib <= 2**20:
            raise ExpflowError(
                f"argon2id memory={self.memory_kib} KiB must be from 8 KiB per lane "
                f"({8 * self.parallelism}) to 1048576 KiB (1 GiB)"
            )
        if not 1 <= self.time_cost <= 64:
            raise ExpflowError(f"argon2id time_cost={self.time_cost} must be from 1 to 64 passes")

    def weaker_than(self, other: Argon2Cost) -> bool:
        """True when ``other`` asks for more memory or more passes than this."""
        return self.memory_kib < other.memory_kib or self.time_cost < other.time_cost


@dataclass(frozen=True)
class ScryptCost:
    """scrypt cost parameters of PIN files from before argon2id; read and upgraded, not written."""

    n: int = 2**14
    r: int = 8
    p: int = 1

    def check(self) -> None:
        """Reject parameters scrypt cannot use or that would take unbounded memory."""
        if not (2 <= self.n <= 2**20 and self.n & (self.n - 1) == 0):
            raise ExpflowError(f"scrypt n={self.n} must be a power of two from 2 to 2**20")
        if not (1 <= self.r <= 32 and 1 <= self.p <= 16):
            raise ExpflowError(f"scrypt r={self.r}, p={self.p} must be r in 1..32, p in 1..16")
        if self.memory() > 2**30:
            raise ExpflowError(
                f"scrypt n={self.n}, r={self.r} would need {self.memory() >> 20} MiB; at most 1024"
            )

    def memory(self) -> int:
        """Bytes scrypt needs for these parameters (OpenSSL's own estimate)."""
        return 128 * self.r * (self.n + self.p + 2)


Cost = Argon2Cost | ScryptCost
DEFAULT_COST = Argon2Cost()


def pin_path() -> Path:
    """Where the PIN hash is stored: ``<home>/pin.json``."""
    return expflow_home() / "pin.json"


def state_path() -> Path:
    """Where a copy of the wrong-PIN count and lockout lives: ``<home>/pin_state.json``."""
    return expflow_home() / "pin_state.json"


def audit_path() -> Path:
    """The append-only audit log of guarded acts: ``<home>/audit.log``."""
    return expflow_home() / "audit.log"


def record_path() -> Path:
    """The SQLite database holding the PIN record: the ledger's (``$EXPFLOW_LEDGER``)."""
    return default_ledger_path()


# --- hashing -----------------------------------------------------------------


def _check_new_pin(pin: object) -> str:
    # The message must not echo the value: it is a PIN, even when malformed.
    if not isinstance(pin, str) or not PIN_RE.fullmatch(pin):
        raise ExpflowError("the PIN given is not valid; a PIN is 4 to 12 digits (0-9)")
    return pin


def _scrypt(pin: str, salt: bytes, cost: ScryptCost) -> bytes:
    return hashlib.scrypt(
        pin.encode("utf-8"),
        salt=salt,
        n=cost.n,
        r=cost.r,
        p=cost.p,
        dklen=DKLEN,
        # hashlib's default 32 MiB cap is too low for n=2**15 and up.
        maxmem=cost.memory() + 2**20,
    )


def hash_pin(pin: str, cost: Cost | None = None) -> str:
    """Hash a new PIN with a fresh random salt: argon2id at ``cost`` (default DEFAULT_COST).

    A :class:`ScryptCost` gives the legacy ``scrypt$n$r$p$salt_hex$hash_hex`` form.
    """
    _check_new_pin(pin)
    cost = DEFAULT_COST if cost is None else cost
    cost.check()
    salt = os.urandom(SALT_BYTES)
    if isinstance(cost, ScryptCost):
        digest = _scrypt(pin, salt, cost)
        return f"scrypt${cost.n}${cost.r}${cost.p}${salt.hex()}${digest.hex()}"
    return hash_secret(
        pin.encode("utf-8"),
        salt,
        time_cost=cost.time_cost,
        memory_cost=cost.memory_kib,
        parallelism=cost.parallelism,
        hash_len=DKLEN,
        type=Type.ID,
    ).decode("ascii")


@dataclass(frozen=True)
class _Verifier:
    encoded: str
    cost: Cost
    salt: bytes = b""
    digest: bytes = b""


def _decode(encoded: object, origin: str) -> _Verifier:
    bad = ExpflowError(
        f"the PIN hash in {origin} is not in the format {_HASH_FORMAT} "
        f"(or the older {_LEGACY_FORMAT})"
    )
    if not isinstance(encoded, str):
        raise bad
    text = encoded.strip()
    if text.startswith("$argon2id$"):
        try:
            params = extract_parameters(text)
        except (InvalidHashError, ValueError):
            raise bad from None
        if params.type is not Type.ID or params.version != 19 or params.hash_len < 16:
            raise bad
        if params.salt_len < 8:
            raise bad
        cost: Cost = Argon2Cost(params.memory_cost, params.time_cost, params.parallelism)
        salt = digest = b""
    else:
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise bad
        try:
            cost = ScryptCost(int(parts[1]), int(parts[2]), int(parts[3]))
            salt, digest = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
        except ValueError:
            raise bad from None
        if not salt or len(digest) != DKLEN:
            raise bad
    try:
        cost.check()
    except ExpflowError as exc:
        raise ExpflowError(f"the PIN hash in {origin} has unusable cost: {exc}") from None
    return _Verifier(text, cost, salt, digest)


def _matches(pin: str, encoded: str, origin: str) -> bool:
    verifier = _decode(encoded, origin)
    if not isinstance(pin, str):
        return False
    if isinstance(verifier.cost, ScryptCost):
        candidate = _scrypt(pin, verifier.salt, verifier.cost)
        return hmac.compare_digest(candidate, verifier.digest)
    try:
        return verify_secret(verifier.encoded.encode("ascii"), pin.encode("utf-8"), Type.ID)
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError, ValueError):
        raise ExpflowError(
            f"the PIN hash in {origin} is not in the format {_HASH_FORMAT}"
        ) from None


def _needs_upgrade(encoded: str) -> bool:
    """True when ``encoded`` is scrypt, or argon2id weaker than the current DEFAULT_COST."""
    cost = _decode(encoded, "the PIN file").cost
    return isinstance(cost, ScryptCost) or cost.weaker_than(DEFAULT_COST)


# --- private files -------------------------------------------------------------


def _write_private(path: Path, data: dict[str, Any]) -> bytes:
    """Write JSON atomically to a 0600 file (temp file, fsync, rename); the bytes written."""
    raw = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
    atomic.write_bytes(path, raw, mode=0o600, durable=True)
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    if mode != 0o600:
        raise ExpflowError(f"{path} has mode {oct(mode)} after writing; expected 0o600")
    return raw


def _read_private(path: Path, what: str) -> bytes | None:
    """The bytes of a 0600 regular file, or None when there is none; never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if path.is_symlink():
            raise ExpflowError(
                f"{what} {path} is a symbolic link, which is never followed; "
                "put the file itself there"
            ) from None
        raise ExpflowError(
            f"{what} {path} is unreadable ({exc.strerror or type(exc).__name__}); fix or remove it"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ExpflowError(f"{what} {path} is not a regular file; remove it")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ExpflowError(
                f"{what} {path} has mode {oct(mode)}, readable by others; expected 0o600 "
                f"(run: chmod 600 {path})"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ExpflowError(
            f"{what} {path} is unreadable ({exc.strerror or type(exc).__name__}); fix or remove it"
        ) from None
    finally:
        os.close(fd)


def _parse_private_json(raw: bytes, path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise ExpflowError(
            f"{what} {path} is unreadable ({type(exc).__name__}); fix or remove it"
        ) from None
    if not isinstance(data, dict):
        raise ExpflowError(f"{what} {path} is not a JSON object; fix or remove it")
    return data


# --- the record in the ledger database -----------------------------------------------

_RECORD_TABLE = """CREATE TABLE IF NOT EXISTS pin_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pin_set INTEGER NOT NULL DEFAULT 0,
    verifier TEXT,
    file_sha256 TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    lockouts INTEGER NOT NULL DEFAULT 0,
    locked_until REAL,
    updated_at TEXT NOT NULL
)"""
_RECORD_FIELDS = ("pin_set", "verifier", "file_sha256", "failures", "lockouts", "locked_until")


@dataclass(frozen=True)
class _Record:
    pin_set: bool = False
    verifier: str | None = None
    file_sha256: str | None = None
    failures: int = 0
    lockouts: int = 0
    locked_until: float | None = None


def _record_run(work: Callable[[sqlite3.Connection], Any], *, create: bool) -> Any:
    """Run ``work`` on the PIN table in one transaction; None without a database unless ``create``."""
    path = record_path()
    if not create and not path.exists():
        return None
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExpflowError(
                f"cannot create the folder of {path} for the PIN record ({exc.strerror or exc})"
            ) from None

    def fail(exc: sqlite3.Error) -> ExpflowError:
        return ExpflowError(
            f"the PIN record in {path} cannot be used ({exc}); guarded acts are refused "
            "until that database can be read and written"
        )

    def with_table(conn: sqlite3.Connection) -> Any:
        conn.execute(_RECORD_TABLE)
        return work(conn)

    return run_locked(
        lambda: connect(path, busy_timeout_s=BUSY_TIMEOUT_S, rows=True),
        with_table,
        begin="immediate",
        lock_retries=LOCK_RETRIES,
        busy_timeout_s=BUSY_TIMEOUT_S,
        fail=fail,
        what=f"PIN record in {path}",
    )


def _row_to_record(row: sqlite3.Row | None) -> _Record | None:
    if row is None:
        return None
    try:
        until = row["locked_until"]
        return _Record(
            pin_set=bool(row["pin_set"]),
            verifier=None if row["verifier"] is None else str(row["verifier"]),
            file_sha256=None if row["file_sha256"] is None else str(row["file_sha256"]),
            failures=int(row["failures"]),
            lockouts=int(row["lockouts"]),
            locked_until=None if until is None else float(until),
        )
    except (TypeError, ValueError):
        raise ExpflowError(
            f"the PIN record in {record_path()} has bad values; guarded acts are refused"
        ) from None


def _read_record() -> _Record | None:
    """The PIN row of the ledger database, or None when there is none."""

    def work(conn: sqlite3.Connection) -> _Record | None:
        return _row_to_record(conn.execute("SELECT * FROM pin_state WHERE id = 1").fetchone())

    return _record_run(work, create=False)


def _save_record(**changes: Any) -> None:
    """Change fields of the PIN row (created when missing), in one transaction."""

    def work(conn: sqlite3.Connection) -> None:
        old = _row_to_record(conn.execute("SELECT * FROM pin_state WHERE id = 1").fetchone())
        values = {name: getattr(old or _Record(), name) for name in _RECORD_FIELDS}
        values.update(changes)
        values["pin_set"] = int(bool(values["pin_set"]))
        values["updated_at"] = _iso(time.time())
        conn.execute(
            "INSERT OR REPLACE INTO pin_state (id, pin_set, verifier, file_sha256, failures, "
            "lockouts, locked_until, updated_at) VALUES (1, :pin_set, :verifier, :file_sha256, "
            ":failures, :lockouts, :locked_until, :updated_at)",
            values,
        )

    _record_run(work, create=True)


# --- where the PIN hash comes from -------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """The hash a PIN is checked against, where it came from, and why acts are refused."""

    encoded: str | None
    source: Source
    problem: str | None = None
    file_sha256: str | None = None

    def origin(self) -> str:
        if self.source == "file":
            return str(pin_path())
        if self.source == "env":
            return PIN_HASH_ENV
        return f"the PIN record in {record_path()}"


def _tampered(path: Path, what: str) -> str:
    return (
        f"the PIN file {path} {what}; a PIN was set, so guarded acts are refused "
        "until `expflow pin clear` is run with the PIN"
    )


def _load_stored() -> _Stored | None:
    """The stored hash and where it came from, or None when no PIN is set.

    A PIN file that exists but cannot be used is an error, never "no PIN": treating it
    as unset would open every guard. Once the record says a PIN is set, a PIN file that
    is missing, replaced or a symlink is a problem that only ``clear_pin`` undoes.
    """
    path = pin_path()
    record = _read_record()
    recorded = record if record is not None and record.pin_set and record.verifier else None

    def refused(problem: str) -> _Stored:
        if recorded is None:
            raise ExpflowError(problem)
        return _Stored(recorded.verifier, "record", problem)

    if path.is_symlink():
        if recorded is not None:
            return refused(_tampered(path, "was replaced by a symbolic link"))
        raise ExpflowError(
            f"the PIN file {path} is a symbolic link, which is never accepted; "
            "put the file itself there"
        )
    try:
        raw = _read_private(path, "PIN file")
    except ExpflowError as exc:
        return refused(str(exc))
    if raw is None:
        if recorded is not None:
            return refused(_tampered(path, "is missing"))
        env = os.environ.get(PIN_HASH_ENV, "").strip()
        if env:
            _decode(env, PIN_HASH_ENV)
            return _Stored(env, "env")
        return None
    digest = hashlib.sha256(raw).hexdigest()
    if recorded is not None and not hmac.compare_digest(digest, recorded.file_sha256 or ""):
        return refused(_tampered(path, "was replaced (its contents differ from the record)"))
    try:
        encoded = _parse_private_json(raw, path, "PIN file").get("hash")
        verifier = _decode(encoded, str(path))
    except ExpflowError as exc:
        return refused(str(exc))
    if recorded is None:
        # A PIN file from before the record existed: record it now, so that from here on
        # deleting or replacing it fails closed.
        _save_record(pin_set=True, verifier=verifier.encoded, file_sha256=digest)
    return _Stored(verifier.encoded, "file", None, digest)


# --- lockout state -----------------------------------------------------------------


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    # One verification at a time across processes, so parallel guesses cannot
    # race past the failure count.
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(expflow_home() / "pin_state.lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fresh_state() -> dict[str, Any]:
    return {"failures": 0, "lockouts": 0, "locked_until": None}


def _read_state_file() -> dict[str, Any]:
    path = state_path()
    raw = _read_private(path, "PIN lockout state")
    if raw is None:
        return _fresh_state()
    data = _parse_private_json(raw, path, "PIN lockout state")
    state = _fresh_state()
    try:
        state["failures"] = int(data.get("failures", 0))
        state["lockouts"] = int(data.get("lockouts", 0))
        until = data.get("locked_until")
        state["locked_until"] = float(until) if until is not None else None
    except (TypeError, ValueError):
        raise ExpflowError(
            f"PIN lockout state {path} has bad values; fix or remove it "
            "(the lockout is also kept in the ledger database)"
        ) from None
    return state


def _read_state() -> dict[str, Any]:
    """The lockout state: the stricter of the database record and the state file."""
    state = _read_state_file()
    record = _read_record()
    if record is not None:
        state["failures"] = max(state["failures"], record.failures)
        state["lockouts"] = max(state["lockouts"], record.lockouts)
        untils = [t for t in (state["locked_until"], record.locked_until) if t is not None]
        state["locked_until"] = max(untils) if untils else None
    return state


def _write_state(state: dict[str, Any]) -> None:
    # The database first: it is what holds when the file is deleted.
    _save_record(
        failures=state["failures"], lockouts=state["lockouts"], locked_until=state["locked_until"]
    )
    _write_private(state_path(), state)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def _lockout_seconds(lockouts: int) -> float:
    return min(LOCKOUT_BASE_S * 2 ** min(max(lockouts - 1, 0), 20), LOCKOUT_MAX_S)


def _attempt(pin: str, stored: _Stored, clock: Callable[[], float]) -> tuple[str, str]:
    """Check ``pin`` under the lockout rules: ("ok"|"wrong"|"locked"|"error", detail)."""
    try:
        return _attempt_locked(pin, stored, clock)
    except ExpflowError as exc:
        return "error", str(exc)
    except OSError as exc:
        # Unable to record a failure must not become unlimited guessing: refuse.
        return "error", f"cannot update the PIN lockout state ({exc.strerror or exc})"


def _attempt_locked(pin: str, stored: _Stored, clock: Callable[[], float]) -> tuple[str, str]:
    if stored.encoded is None:
        raise ExpflowError(stored.problem or "no PIN hash to check against")
    with _state_lock():
        state = _read_state()
        now = clock()
        until = state["locked_until"]
        if until is not None and now < until:
            return "locked", (
                f"PIN entry is locked until {_when(until)} (in {math.ceil(until - now)} s) "
                f"after {MAX_FAILURES} wrong PINs; try again then"
            )
        if _matches(pin, stored.encoded, stored.origin()):
            if state != _fresh_state():
                _write_state(_fresh_state())
            _upgrade(pin, stored, clock)
            return "ok", "correct PIN"
        state["locked_until"] = None
        state["failures"] += 1
        if state["failures"] >= MAX_FAILURES:
            state["failures"] = 0
            state["lockouts"] += 1
            seconds = _lockout_seconds(state["lockouts"])
            state["locked_until"] = now + seconds
            _write_state(state)
            return "wrong", (
                f"{MAX_FAILURES} wrong PINs in a row; PIN entry is locked for {seconds:g} s, "
                f"until {_when(now + seconds)}"
            )
        _write_state(state)
        left = MAX_FAILURES - state["failures"]
        return "wrong", f"{left} {'try' if left == 1 else 'tries'} left before lockout"


def _store_pin(encoded: str, clock: Callable[[], float]) -> None:
    """Write pin.json and its record (call under ``_state_lock``)."""
    raw = _write_private(pin_path(), {"hash": encoded, "set_at": _iso(clock())})
    _save_record(pin_set=True, verifier=encoded, file_sha256=hashlib.sha256(raw).hexdigest())


def _upgrade(pin: str, stored: _Stored, clock: Callable[[], float]) -> None:
    """Rehash a scrypt or weaker-than-default PIN file at DEFAULT_COST, after a correct PIN."""
    if stored.source != "file" or stored.problem is not None or not _needs_upgrade(stored.encoded):
        return
    raw = _read_private(pin_path(), "PIN file")
    if raw is None or hashlib.sha256(raw).hexdigest() != stored.file_sha256:
        return  # changed since it was read: leave it to whoever changed it
    _store_pin(hash_pin(pin, DEFAULT_COST), clock)
    log.info("PIN hash upgraded to argon2id %s", DEFAULT_COST)


# --- audit -----------------------------------------------------------------------


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name must not block the audit entry
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def audit(
    action: str,
    outcome: str,
    reason: str,
    *,
    target: str = "",
    clock: Callable[[], float] = time.time,
) -> None:
    """Append one JSON line for a guarded act to ``<home>/audit.log`` (0600, O_APPEND)."""
    entry = {
        "ts": _iso(clock()),
        "user": _user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "action": action,
        "target": target,
        "outcome": outcome,
        "reason": reason,
    }
    line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode("utf-8")
    path = audit_path()
    # O_APPEND with a single write per line keeps lines whole when processes append at once.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path} ({written} of {len(line)} bytes)")
    finally:
        os.close(fd)


def _record(
    action: str, target: str, outcome: Outcome, reason: str, clock: Callable[[], float]
) -> None:
    log.info("guard %s%s: %s (%s)", action, f" {target}" if target else "", outcome, reason)
    try:
        audit(action, outcome, reason, target=target, clock=clock)
    except OSError as exc:
        # An act that cannot be audited is not allowed.
        raise GuardRefused(
            f"cannot write the audit log {audit_path()} ({exc.strerror or exc}); refusing {action}"
        ) from None


def _refuse(action: str, target: str, message: str, clock: Callable[[], float]) -> GuardRefused:
    with contextlib.suppress(GuardRefused):
        _record(action, target, "refused", message, clock)
    return GuardRefused(message)


# --- public API -------------------------------------------------------------------


def refuse(action: str, target: str, message: str) -> GuardRefused:
    """Audit a refusal decided outside :func:`guard` (no approval came, a PIN was
    missing up front); returns the error to raise."""
    return _refuse(action, target, message, time.time)


def record_forced(action: str, target: str, reason: str) -> None:
    """Audit an act that skipped the PIN by a setting only administrators hold."""
    _record(action, target, "forced", reason, time.time)


def pin_status(clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Whether a PIN is set, from where, and the lockout state; never the hash."""
    status: dict[str, Any] = {
        "set": False,
        "source": None,
        "path": str(pin_path()),
        "locked": False,
        "locked_until": None,
        "failures": 0,
        "lockouts": 0,
        "problem": None,
    }
    try:
        stored = _load_stored()
    except ExpflowError as exc:
        present = pin_path().exists() or pin_path().is_symlink()
        status.update(set=True, source="file" if present else "env", problem=str(exc))
        stored = None
    if stored is not None:
        status.update(set=True, source=stored.source, problem=stored.problem)
    try:
        state = _read_state()
    except ExpflowError as exc:
        status["problem"] = status["problem"] or str(exc)
        return status
    until = state["locked_until"]
    status.update(failures=state["failures"], lockouts=state["lockouts"])
    if until is not None and clock() < until:
        status.update(locked=True, locked_until=_iso(until))
    return status


def verify_pin(pin: str, *, clock: Callable[[], float] = time.time) -> bool:
    """True when ``pin`` matches the stored PIN; wrong tries count toward the lockout.

    Raises :class:`GuardRefused` while PIN entry is locked or the PIN file was tampered
    with. False when no PIN is set.
    """
    try:
        stored = _load_stored()
    except ExpflowError as exc:
        raise GuardRefused(str(exc)) from None
    if stored is None:
        return False
    if stored.problem is not None:
        raise GuardRefused(stored.problem)
    outcome, detail = _attempt(pin, stored, clock)
    if outcome in ("locked", "error"):
        raise GuardRefused(detail)
    return outcome == "ok"


def _require_current(
    action: str, current: str | None, stored: _Stored, clock: Callable[[], float]
) -> None:
    if not current:
        where = {"file": "the PIN file", "env": PIN_HASH_ENV, "record": "the PIN record"}
        raise _refuse(
            action,
            "",
            f"a PIN is already set (from {where[stored.source]}); "
            "give the current PIN to change or clear it",
            clock,
        )
    outcome, detail = _attempt(current, stored, clock)
    if outcome != "ok":
        prefix = "wrong current PIN; " if outcome == "wrong" else ""
        raise _refuse(action, "", f"{prefix}{detail}", clock)


def init_pin(
    pin: str,
    current: str | None = None,
    *,
    cost: Cost | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Set the PIN (stored hashed in ``<home>/pin.json`` and recorded in the ledger database);
    changing one needs the current PIN."""
    _check_new_pin(pin)
    (DEFAULT_COST if cost is None else cost).check()
    try:
        stored = _load_stored()
    except ExpflowError as exc:
        raise _refuse("pin-set", "", f"{exc}; cannot check the current PIN", clock) from None
    action = "pin-change" if stored is not None else "pin-set"
    if stored is not None and stored.problem is not None:
        raise _refuse(action, "", stored.problem, clock)
    if stored is not None:
        _require_current(action, current, stored, clock)
    encoded = hash_pin(pin, cost)
    try:
        with _state_lock():
            _store_pin(encoded, clock)
            _write_state(_fresh_state())
    except OSError as exc:
        raise ExpflowError(
            f"cannot store the PIN in {pin_path()} ({exc.strerror or exc}); the PIN is unchanged "
            "unless `expflow pin status` says otherwise"
        ) from None
    _record(action, "", "allowed", "PIN stored in pin.json and recorded", clock)


def clear_pin(current: str, *, clock: Callable[[], float] = time.time) -> None:
    """Remove the PIN file and its record; needs the current PIN (checked against the
    record when the file is missing or was replaced). A PIN from the environment cannot
    be cleared here."""
    stored = _load_stored()
    if stored is None:
        raise ExpflowError("no PIN is set; nothing to clear")
    if stored.source == "env":
        raise ExpflowError(f"the PIN comes from {PIN_HASH_ENV}; unset that variable to clear it")
    _require_current("pin-clear", current, stored, clock)
    path = pin_path()
    try:
        with _state_lock():
            # unlink never follows a symlink: the link goes, never what it points to.
            path.unlink(missing_ok=True)
            _save_record(pin_set=False, verifier=None, file_sha256=None)
    except OSError as exc:
        raise ExpflowError(f"cannot remove the PIN file {path} ({exc.strerror or exc})") from None
    after = "" if not os.environ.get(PIN_HASH_ENV) else f"; {PIN_HASH_ENV} now applies"
    how = "PIN file removed" if stored.problem is None else "PIN record and the PIN file cleared"
    _record("pin-clear", "", "allowed", f"{how}{after}", clock)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


def _obtain_pin(action: str, target: str, pin: str | None, interactive: bool | None) -> str | None:
    if pin:
        return pin
    env = os.environ.get(PIN_ENV)
    if env:
        return env
    if interactive is False or not _stdin_is_tty():
        return None
    try:
        entered = getpass.getpass(f"PIN for {action}{f' {target}' if target else ''}: ")
    except EOFError:
        return None
    return entered or None


def guard(
    action: str,
    *,
    target: str = "",
    pin: str | None = None,
    force: bool = False,
    interactive: bool | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Allow ``action`` on ``target`` or raise :class:`GuardRefused`; every outcome is audited.

    No PIN set: allowed. ``force``: allowed and logged as forced. Otherwise the PIN
    comes from ``pin``, ``$EXPFLOW_PIN``, or a prompt when stdin is a TTY.
    """
    if not isinstance(action, str) or not action.strip():
        raise ExpflowError(
            f"guard action {action!r} is empty; expected a name such as 'cancel-run'"
        )
    target = str(target or "")
    problem = None
    try:
        stored = _load_stored()
    except ExpflowError as exc:
        stored, problem = None, str(exc)
    if stored is not None:
        problem = stored.problem
    if stored is None and problem is None:
        _record(action, target, "allowed-no-pin", "no PIN set", clock)
        return
    if force:
        reason = "force given" + (f"; {problem}" if problem else "")
        _record(action, target, "forced", reason, clock)
        return
    if problem is not None:
        raise _refuse(action, target, f"{action} refused: {problem}", clock)
    assert stored is not None
    given = _obtain_pin(action, target, pin, interactive)
    if given is None:
        why = "prompting is off" if interactive is False else "stdin is not a terminal"
        raise _refuse(
            action,
            target,
            f"{action} needs the PIN and none was given ({why}); pass --pin, "
            f"set {PIN_ENV}, or use --force for automation (forced acts are logged)",
            clock,
        )
    outcome, detail = _attempt(given, stored, clock)
    if outcome == "ok":
        _record(action, target, "allowed", detail, clock)
        return
    if outcome == "wrong":
        raise _refuse(action, target, f"wrong PIN for {action}; {detail}", clock)
    raise _refuse(action, target, f"{action} refused: {detail}", clock)


def guarded(action: str, *, target_arg: str | None = None) -> Callable[[F], F]:
    """Decorator: run :func:`guard` before the function, using its ``pin=``/``force=`` arguments.

    ``target_arg`` names the argument whose value is logged as the target. The
    function receives ``pin``/``force`` only if its signature declares them.
    """

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        declared = {name for name in ("pin", "force", "interactive") if name in sig.parameters}
        if target_arg is not None and target_arg not in sig.parameters:
            raise ExpflowError(
                f"guarded({action!r}): {fn.__name__} has no argument {target_arg!r} for the target"
            )

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            taken = {
                name: kwargs.pop(name)
                for name in ("pin", "force", "interactive")
                if name in kwargs and name not in declared
            }
            bound = sig.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            values = {**bound.arguments, **taken}
            target = values.get(target_arg, "") if target_arg else ""
            guard(
                action,
                target="" if target is None else str(target),
                pin=values.get("pin"),
                force=bool(values.get("force", False)),
                interactive=values.get("interactive"),
            )
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
