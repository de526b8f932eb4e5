"""The PIN guard: one check every destructive or irreversible act goes through.

The PIN (4 to 12 digits) is kept only as a salted scrypt hash
(n=2**14, r=8, p=1, 16-byte salt, 32-byte key), encoded as
``scrypt$n$r$p$salt_hex$hash_hex``. It is read from ``<home>/pin.json``
(mode 0600), else from ``$EXPFLOW_PIN_HASH``; with neither, no PIN is set and
guarded acts are allowed (and logged as such).

Five wrong PINs in a row lock PIN entry for 30 s, doubling with each further
lockout up to 1 h; the count lives in ``<home>/pin_state.json`` so it holds
across processes, and a correct PIN resets it. Every guarded act, allowed,
forced or refused, is appended to ``<home>/audit.log`` as one JSON line.
The PIN and its hash never appear in messages, logs or the audit log.
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
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from expflow_flows import atomic
from expflow_flows.errors import ExpflowError, GuardRefused
from expflow_flows.home import expflow_home

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
_HASH_FORMAT = "scrypt$n$r$p$salt_hex$hash_hex"

Source = Literal["file", "env"]
Outcome = Literal["allowed", "allowed-no-pin", "forced", "refused"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ScryptCost:
    """scrypt cost parameters; lower them only explicitly (tests), never by default."""

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


DEFAULT_COST = ScryptCost()


def pin_path() -> Path:
    """Where the PIN hash is stored: ``<home>/pin.json``."""
    return expflow_home() / "pin.json"


def state_path() -> Path:
    """Where the wrong-PIN count and lockout live: ``<home>/pin_state.json``."""
    return expflow_home() / "pin_state.json"


def audit_path() -> Path:
    """The append-only audit log of guarded acts: ``<home>/audit.log``."""
    return expflow_home() / "audit.log"


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


def hash_pin(pin: str, cost: ScryptCost = DEFAULT_COST) -> str:
    """Hash a new PIN as ``scrypt$n$r$p$salt_hex$hash_hex`` with a fresh random salt."""
    _check_new_pin(pin)
    cost.check()
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(pin, salt, cost)
    return f"scrypt${cost.n}${cost.r}${cost.p}${salt.hex()}${digest.hex()}"


def _decode(encoded: object, origin: str) -> tuple[ScryptCost, bytes, bytes]:
    bad = ExpflowError(f"the PIN hash in {origin} is not in the format {_HASH_FORMAT}")
    if not isinstance(encoded, str):
        raise bad
    parts = encoded.strip().split("$")
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
    return cost, salt, digest


def _matches(pin: str, encoded: str, origin: str) -> bool:
    cost, salt, digest = _decode(encoded, origin)
    if not isinstance(pin, str):
        return False
    candidate = _scrypt(pin, salt, cost)
    return hmac.compare_digest(candidate, digest)


# --- private files -------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically to a 0600 file (temp file, fsync, rename)."""
    atomic.write_json(path, data, mode=0o600, durable=True, default=None)
    if _mode(path) != 0o600:
        raise ExpflowError(f"{path} has mode {oct(_mode(path))} after writing; expected 0o600")


def _read_private_json(path: Path, what: str) -> dict[str, Any]:
    mode = _mode(path)
    if mode & 0o077:
        raise ExpflowError(
            f"{what} {path} has mode {oct(mode)}, readable by others; expected 0o600 "
            f"(run: chmod 600 {path})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExpflowError(
            f"{what} {path} is unreadable ({type(exc).__name__}); fix or remove it"
        ) from None
    if not isinstance(data, dict):
        raise ExpflowError(f"{what} {path} is not a JSON object; fix or remove it")
    return data


def _load_stored() -> tuple[str, Source] | None:
    """The stored hash and where it came from, or None when no PIN is set.

    A PIN file that exists but cannot be used is an error, never "no PIN":
    treating it as unset would open every guard.
    """
    path = pin_path()
    if path.exists():
        data = _read_private_json(path, "PIN file")
        encoded = data.get("hash")
        _decode(encoded, str(path))
        return str(encoded), "file"
    env = os.environ.get(PIN_HASH_ENV, "").strip()
    if env:
        _decode(env, PIN_HASH_ENV)
        return env, "env"
    return None


# --- lockout state -----------------------------------------------------------------


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    # One verification at a time across processes, so parallel guesses cannot
    # race past the failure count.
    if fcntl is None:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(expflow_home() / "pin_state.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fresh_state() -> dict[str, Any]:
    return {"failures": 0, "lockouts": 0, "locked_until": None}


def _read_state() -> dict[str, Any]:
    path = state_path()
    if not path.exists():
        return _fresh_state()
    data = _read_private_json(path, "PIN lockout state")
    state = _fresh_state()
    try:
        state["failures"] = int(data.get("failures", 0))
        state["lockouts"] = int(data.get("lockouts", 0))
        until = data.get("locked_until")
        state["locked_until"] = float(until) if until is not None else None
    except (TypeError, ValueError):
        raise ExpflowError(
            f"PIN lockout state {path} has bad values; remove it to reset the lockout"
        ) from None
    return state


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def _lockout_seconds(lockouts: int) -> float:
    return min(LOCKOUT_BASE_S * 2 ** min(max(lockouts - 1, 0), 20), LOCKOUT_MAX_S)


def _attempt(pin: str, stored: tuple[str, Source], clock: Callable[[], float]) -> tuple[str, str]:
    """Check ``pin`` under the lockout rules: ("ok"|"wrong"|"locked"|"error", detail)."""
    try:
        return _attempt_locked(pin, stored, clock)
    except ExpflowError as exc:
        return "error", str(exc)
    except OSError as exc:
        # Unable to record a failure must not become unlimited guessing: refuse.
        return "error", f"cannot update the PIN lockout state ({exc.strerror or exc})"


def _attempt_locked(
    pin: str, stored: tuple[str, Source], clock: Callable[[], float]
) -> tuple[str, str]:
    encoded, source = stored
    origin = str(pin_path()) if source == "file" else PIN_HASH_ENV
    with _state_lock():
        state = _read_state()
        now = clock()
        until = state["locked_until"]
        if until is not None and now < until:
            return "locked", (
                f"PIN entry is locked until {_when(until)} (in {math.ceil(until - now)} s) "
                f"after {MAX_FAILURES} wrong PINs; try again then"
            )
        if _matches(pin, encoded, origin):
            if state != _fresh_state():
                _write_private(state_path(), _fresh_state())
            return "ok", "correct PIN"
        state["locked_until"] = None
        state["failures"] += 1
        if state["failures"] >= MAX_FAILURES:
            state["failures"] = 0
            state["lockouts"] += 1
            seconds = _lockout_seconds(state["lockouts"])
            state["locked_until"] = now + seconds
            _write_private(state_path(), state)
            return "wrong", (
                f"{MAX_FAILURES} wrong PINs in a row; PIN entry is locked for {seconds:g} s, "
                f"until {_when(now + seconds)}"
            )
        _write_private(state_path(), state)
        left = MAX_FAILURES - state["failures"]
        return "wrong", f"{left} {'try' if left == 1 else 'tries'} left before lockout"


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
        status.update(set=True, source="file" if pin_path().exists() else "env", problem=str(exc))
        stored = None
    if stored is not None:
        status.update(set=True, source=stored[1])
    try:
        state = _read_state()
    except ExpflowError as exc:
        status["problem"] = str(exc)
        return status
    until = state["locked_until"]
    status.update(failures=state["failures"], lockouts=state["lockouts"])
    if until is not None and clock() < until:
        status.update(locked=True, locked_until=_iso(until))
    return status


def verify_pin(pin: str, *, clock: Callable[[], float] = time.time) -> bool:
    """True when ``pin`` matches the stored PIN; wrong tries count toward the lockout.

    Raises :class:`GuardRefused` while PIN entry is locked. False when no PIN is set.
    """
    stored = _load_stored()
    if stored is None:
        return False
    outcome, detail = _attempt(pin, stored, clock)
    if outcome in ("locked", "error"):
        raise GuardRefused(detail)
    return outcome == "ok"


def _require_current(
    action: str, current: str | None, stored: tuple[str, Source], clock: Callable[[], float]
) -> None:
    if not current:
        raise _refuse(
            action,
            "",
            f"a PIN is already set (from {'the PIN file' if stored[1] == 'file' else PIN_HASH_ENV}); "
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
    cost: ScryptCost = DEFAULT_COST,
    clock: Callable[[], float] = time.time,
) -> None:
    """Set the PIN (stored hashed in ``<home>/pin.json``); changing one needs the current PIN."""
    _check_new_pin(pin)
    try:
        stored = _load_stored()
    except ExpflowError as exc:
        raise _refuse("pin-set", "", f"{exc}; cannot check the current PIN", clock) from None
    action = "pin-change" if stored is not None else "pin-set"
    if stored is not None:
        _require_current(action, current, stored, clock)
    encoded = hash_pin(pin, cost)
    with _state_lock():
        _write_private(pin_path(), {"hash": encoded, "set_at": _iso(clock())})
        if state_path().exists():
            _write_private(state_path(), _fresh_state())
    _record(action, "", "allowed", "PIN stored in pin.json", clock)


def clear_pin(current: str, *, clock: Callable[[], float] = time.time) -> None:
    """Remove the PIN file; needs the current PIN. A PIN from the environment cannot be cleared here."""
    stored = _load_stored()
    if stored is None:
        raise ExpflowError("no PIN is set; nothing to clear")
    if stored[1] == "env":
        raise ExpflowError(f"the PIN comes from {PIN_HASH_ENV}; unset that variable to clear it")
    _require_current("pin-clear", current, stored, clock)
    pin_path().unlink(missing_ok=True)
    after = "" if not os.environ.get(PIN_HASH_ENV) else f"; {PIN_HASH_ENV} now applies"
    _record("pin-clear", "", "allowed", f"PIN file removed{after}", clock)


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
