"""The PIN guard: hashing, 0600 files, lockout across processes, audit log, no leaks."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError, GuardRefused
from expflow_flows.governance import pin

PIN = "739164"
WRONG = "112233"
# Lower cost for speed, passed explicitly (and made the upgrade target in-process, so a
# correct PIN does not rehash at full cost); the shipped default is REAL_DEFAULT.
REAL_DEFAULT = pin.DEFAULT_COST
FAST = pin.Argon2Cost(memory_kib=1024, time_cost=1, parallelism=1)
LEGACY = pin.ScryptCost(n=2**10, r=8, p=1)
PYTHON = sys.executable
EXPFLOW = str(Path(sys.executable).with_name("expflow"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("EXPFLOW_HOME", str(root))
    monkeypatch.delenv("EXPFLOW_PIN", raising=False)
    monkeypatch.delenv("EXPFLOW_PIN_HASH", raising=False)
    monkeypatch.delenv("EXPFLOW_LEDGER", raising=False)
    monkeypatch.setattr(pin, "DEFAULT_COST", FAST)
    return root


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def audit_entries(home: Path) -> list[dict]:
    return [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]


def stored_hash(home: Path) -> str:
    return json.loads((home / "pin.json").read_text())["hash"]


def assert_no_secret(text: str, home: Path | None = None) -> None:
    assert PIN not in text
    if home is not None and (home / "pin.json").exists():
        encoded = stored_hash(home)
        assert encoded.split("$")[-1] not in text
        assert encoded.split("$")[-2] not in text


def wrong_tries(n: int, clock: Clock, action: str = "cancel-run") -> list[str]:
    messages = []
    for _ in range(n):
        with pytest.raises(GuardRefused) as info:
            pin.guard(action, pin=WRONG, clock=clock)
        messages.append(str(info.value))
    return messages


def pin_record(home: Path) -> dict | None:
    """The PIN row kept in the ledger database, or None."""
    db = home / "ledger.sqlite"
    if not db.exists():
        return None
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM pin_state").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return dict(row) if row is not None else None


def b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text + "=" * (-len(text) % 4))


def test_default_cost_is_argon2id_64_mib_3_passes_with_16_byte_salt(home, monkeypatch) -> None:
    monkeypatch.setattr(pin, "DEFAULT_COST", REAL_DEFAULT)
    pin.init_pin(PIN)
    _, kind, version, params, salt, digest = stored_hash(home).split("$")
    assert (kind, version, params) == ("argon2id", "v=19", "m=65536,t=3,p=1")
    assert len(b64(salt)) == 16 and len(b64(digest)) == 32
    assert pin.verify_pin(PIN) is True
    # The parameters live in the file, so raising the default later still reads old files.
    assert pin.hash_pin(PIN, FAST).startswith("$argon2id$v=19$m=1024,t=1,p=1$")


def test_pin_file_is_0600_and_holds_no_pin(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    assert mode(home / "pin.json") == 0o600
    assert_no_secret((home / "pin.json").read_text())
    # Same PIN, fresh salt: two hashes differ.
    assert pin.hash_pin(PIN, FAST) != pin.hash_pin(PIN, FAST)


def test_pin_file_mode_is_0600_even_with_a_permissive_umask(home: Path) -> None:
    old = os.umask(0)
    try:
        pin.init_pin(PIN, cost=FAST)
    finally:
        os.umask(old)
    assert mode(home / "pin.json") == 0o600


@pytest.mark.parametrize("bad", ["123", "1234567890123", "12a4", " 1234", "1234\n", "", "١٢٣٤"])
def test_malformed_new_pin_is_refused_without_echoing_it(home: Path, bad: str) -> None:
    with pytest.raises(ExpflowError) as info:
        pin.init_pin(bad, cost=FAST)
    assert "4 to 12 digits" in str(info.value)
    if bad.strip():
        assert bad.strip() not in str(info.value)
    assert not (home / "pin.json").exists()


def test_no_pin_set_allows_and_logs(home: Path) -> None:
    pin.guard("cancel-run", target="run-1")
    (entry,) = audit_entries(home)
    assert entry["outcome"] == "allowed-no-pin"
    assert entry["action"] == "cancel-run" and entry["target"] == "run-1"
    assert {"ts", "user", "host", "pid", "reason"} <= set(entry)
    assert entry["pid"] == os.getpid()
    assert mode(home / "audit.log") == 0o600


def test_correct_pin_allows_and_wrong_pin_refuses(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    pin.guard("delete-study", target="s1", pin=PIN)
    with pytest.raises(GuardRefused) as info:
        pin.guard("delete-study", target="s1", pin=WRONG)
    assert str(info.value) == "wrong PIN for delete-study; 4 tries left before lockout"
    outcomes = [(e["action"], e["outcome"]) for e in audit_entries(home)]
    assert outcomes == [
        ("pin-set", "allowed"),
        ("delete-study", "allowed"),
        ("delete-study", "refused"),
    ]


def test_secrets_never_in_audit_log_errors_or_status(home: Path, monkeypatch) -> None:
    pin.init_pin(PIN, cost=FAST)
    messages = wrong_tries(5, Clock())
    with pytest.raises(GuardRefused) as locked:
        pin.guard("cancel-run", pin=PIN, clock=Clock())
    messages.append(str(locked.value))
    monkeypatch.setattr(pin, "_stdin_is_tty", lambda: False)
    with pytest.raises(GuardRefused) as no_pin:
        pin.guard("submit")
    messages.append(str(no_pin.value))
    pin.guard("submit", force=True)
    for text in [*messages, (home / "audit.log").read_text(), json.dumps(pin.pin_status())]:
        assert_no_secret(text, home)
        assert WRONG not in text


def test_env_pin_is_used(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin.init_pin(PIN, cost=FAST)
    monkeypatch.setenv("EXPFLOW_PIN", PIN)
    pin.guard("cancel-run")
    monkeypatch.setenv("EXPFLOW_PIN", WRONG)
    with pytest.raises(GuardRefused, match="wrong PIN for cancel-run"):
        pin.guard("cancel-run")
    # An explicit pin argument wins over the environment.
    pin.guard("cancel-run", pin=PIN)


def test_force_is_allowed_and_logged(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    pin.guard("submit", target="bundle-1", force=True)
    entry = audit_entries(home)[-1]
    assert (entry["action"], entry["target"], entry["outcome"]) == ("submit", "bundle-1", "forced")


def test_missing_pin_without_tty_refuses_with_instructions(home: Path, monkeypatch) -> None:
    pin.init_pin(PIN, cost=FAST)
    monkeypatch.setattr(pin, "_stdin_is_tty", lambda: False)
    with pytest.raises(GuardRefused) as info:
        pin.guard("submit")
    message = str(info.value)
    for hint in ("--pin", "EXPFLOW_PIN", "--force"):
        assert hint in message
    assert audit_entries(home)[-1]["outcome"] == "refused"


def test_prompt_only_on_a_tty_and_not_when_interactive_false(home: Path, monkeypatch) -> None:
    pin.init_pin(PIN, cost=FAST)
    asked: list[str] = []
    monkeypatch.setattr(pin, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(pin.getpass, "getpass", lambda prompt: asked.append(prompt) or PIN)
    pin.guard("cancel-run", target="r7")
    assert asked == ["PIN for cancel-run r7: "]
    with pytest.raises(GuardRefused, match="prompting is off"):
        pin.guard("cancel-run", interactive=False)
    assert len(asked) == 1


def test_guard_without_tty_in_a_subprocess_refuses_and_never_hangs(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    code = (
        "from expflow_flows.governance import pin\n"
        "from expflow_flows.errors import GuardRefused\n"
        "try:\n"
        "    pin.guard('cancel-run', target='r1')\n"
        "except GuardRefused as exc:\n"
        "    print('REFUSED', exc)\n"
        "    raise SystemExit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("EXPFLOW_PIN", "EXPFLOW_PIN_HASH")}
    proc = subprocess.run(
        [PYTHON, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 3, proc.stderr
    assert "REFUSED cancel-run needs the PIN" in proc.stdout
    assert "--force" in proc.stdout


def test_lockout_after_five_wrong_and_expiry_with_clock(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    clock = Clock()
    messages = wrong_tries(5, clock)
    assert messages[3].endswith("1 try left before lockout")
    assert "locked for 30 s" in messages[4]
    status = pin.pin_status(clock=clock)
    assert status["locked"] is True and status["lockouts"] == 1

    clock.t += 29
    with pytest.raises(GuardRefused) as info:
        pin.guard("cancel-run", pin=PIN, clock=clock)
    assert "locked until" in str(info.value) and "in 1 s" in str(info.value)

    clock.t += 2
    assert pin.pin_status(clock=clock)["locked"] is False
    pin.guard("cancel-run", pin=PIN, clock=clock)
    status = pin.pin_status(clock=clock)
    assert (status["failures"], status["lockouts"]) == (0, 0)


def test_correct_pin_resets_the_failure_count(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    clock = Clock()
    wrong_tries(4, clock)
    pin.guard("cancel-run", pin=PIN, clock=clock)
    messages = wrong_tries(4, clock)
    assert messages[-1].endswith("1 try left before lockout")


def test_lockout_doubles_and_is_capped(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    clock = Clock()
    wrong_tries(5, clock)
    clock.t += 31
    assert "locked for 60 s" in wrong_tries(5, clock)[-1]
    clock.t += 59
    with pytest.raises(GuardRefused, match="locked until"):
        pin.guard("cancel-run", pin=PIN, clock=clock)
    clock.t += 2
    pin.guard("cancel-run", pin=PIN, clock=clock)
    assert [pin._lockout_seconds(k) for k in (1, 2, 3, 7, 8, 50)] == [
        30,
        60,
        120,
        1920,
        3600,
        3600,
    ]


def test_lockout_persists_across_processes(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    wrong_tries(5, Clock(__import__("time").time()))
    assert mode(home / "pin_state.json") == 0o600
    code = (
        "from expflow_flows.governance import pin\n"
        "from expflow_flows.errors import GuardRefused\n"
        "try:\n"
        "    pin.guard('cancel-run')\n"
        "    print('ALLOWED')\n"
        "except GuardRefused as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    env = {**os.environ, "EXPFLOW_PIN": PIN}
    proc = subprocess.run(
        [PYTHON, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.stdout.startswith("REFUSED cancel-run refused: PIN entry is locked until"), (
        proc.stdout + proc.stderr
    )


def test_verify_pin_counts_toward_lockout(home: Path) -> None:
    assert pin.verify_pin(PIN) is False  # no PIN set
    pin.init_pin(PIN, cost=FAST)
    clock = Clock()
    assert pin.verify_pin(PIN, clock=clock) is True
    for _ in range(5):
        assert pin.verify_pin(WRONG, clock=clock) is False
    with pytest.raises(GuardRefused, match="locked until"):
        pin.verify_pin(PIN, clock=clock)


def test_init_over_existing_requires_current(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    with pytest.raises(GuardRefused, match="give the current PIN"):
        pin.init_pin("5555", cost=FAST)
    with pytest.raises(GuardRefused, match="wrong current PIN"):
        pin.init_pin("5555", current=WRONG, cost=FAST)
    assert pin.verify_pin(PIN)
    pin.init_pin("5555", current=PIN, cost=FAST)
    assert pin.verify_pin("5555") and not pin.verify_pin(PIN)
    assert mode(home / "pin.json") == 0o600
    assert audit_entries(home)[-1]["action"] == "pin-change"


def test_clear_pin_requires_current(home: Path) -> None:
    with pytest.raises(ExpflowError, match="no PIN is set"):
        pin.clear_pin(PIN)
    pin.init_pin(PIN, cost=FAST)
    with pytest.raises(GuardRefused):
        pin.clear_pin(WRONG)
    assert (home / "pin.json").exists()
    pin.clear_pin(PIN)
    assert not (home / "pin.json").exists()
    assert pin.pin_status()["set"] is False


def test_env_hash_is_used_and_the_file_takes_precedence(home: Path, monkeypatch) -> None:
    encoded = pin.hash_pin("1111", FAST)
    monkeypatch.setenv("EXPFLOW_PIN_HASH", encoded)
    status = pin.pin_status()
    assert (status["set"], status["source"]) == (True, "env")
    assert encoded.split("$")[-1] not in json.dumps(status)
    pin.guard("cancel-run", pin="1111")
    with pytest.raises(ExpflowError, match="unset that variable"):
        pin.clear_pin("1111")
    pin.init_pin("2222", current="1111", cost=FAST)
    assert pin.pin_status()["source"] == "file"
    pin.guard("cancel-run", pin="2222")
    with pytest.raises(GuardRefused, match="wrong PIN"):
        pin.guard("cancel-run", pin="1111")


def test_malformed_env_hash_fails_closed(home: Path, monkeypatch) -> None:
    monkeypatch.setenv("EXPFLOW_PIN_HASH", "plain-text-1234")
    with pytest.raises(GuardRefused) as info:
        pin.guard("cancel-run", pin="1234")
    assert "EXPFLOW_PIN_HASH is not in the format $argon2id$v=19$m=" in str(info.value)
    assert "plain-text-1234" not in str(info.value)


def test_corrupt_or_loose_pin_file_fails_closed(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    path = home / "pin.json"
    path.chmod(0o644)
    with pytest.raises(GuardRefused, match="chmod 600"):
        pin.guard("cancel-run", pin=PIN)
    path.chmod(0o600)
    path.write_text("{not json")
    # Its contents no longer match what was recorded when the PIN was set.
    with pytest.raises(GuardRefused, match="was replaced"):
        pin.guard("cancel-run", pin=PIN)
    assert pin.pin_status()["set"] is True
    # Force still works, and says why the PIN could not be checked.
    pin.guard("cancel-run", force=True)
    assert "was replaced" in audit_entries(home)[-1]["reason"]


def test_a_corrupt_pin_file_without_a_record_fails_closed(home: Path) -> None:
    home.mkdir(parents=True)
    path = home / "pin.json"
    path.write_text("{not json")
    path.chmod(0o600)
    with pytest.raises(GuardRefused, match="unreadable"):
        pin.guard("cancel-run", pin=PIN)
    assert pin.pin_status()["set"] is True


def test_unreadable_lockout_state_fails_closed(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    wrong_tries(1, Clock())
    (home / "pin_state.json").write_text("garbage")
    with pytest.raises(GuardRefused, match="PIN lockout state .* is unreadable"):
        pin.guard("cancel-run", pin=PIN)
    with pytest.raises(GuardRefused, match="unreadable"):
        pin.verify_pin(PIN)
    assert audit_entries(home)[-1]["outcome"] == "refused"
    (home / "pin_state.json").unlink()
    pin.guard("cancel-run", pin=PIN)


def test_guarded_decorator(home: Path) -> None:
    calls: list[tuple] = []

    @pin.guarded("delete-entry", target_arg="entry")
    def delete(entry: str, *, pin: str | None = None, force: bool = False) -> str:
        calls.append((entry, force))
        return f"deleted {entry}"

    assert delete("e1") == "deleted e1"
    pin.init_pin(PIN, cost=FAST)
    with pytest.raises(GuardRefused, match="wrong PIN for delete-entry"):
        delete("e2", pin=WRONG)
    assert delete("e3", pin=PIN) == "deleted e3"
    assert delete("e4", force=True) == "deleted e4"
    assert calls == [("e1", False), ("e3", False), ("e4", True)]
    logged = [(e["target"], e["outcome"]) for e in audit_entries(home) if e["action"] != "pin-set"]
    assert logged == [
        ("e1", "allowed-no-pin"),
        ("e2", "refused"),
        ("e3", "allowed"),
        ("e4", "forced"),
    ]


def test_guarded_strips_pin_and_force_for_functions_without_them(home: Path) -> None:
    @pin.guarded("wipe")
    def wipe() -> str:
        return "wiped"

    pin.init_pin(PIN, cost=FAST)
    assert wipe(pin=PIN) == "wiped"
    assert wipe(force=True) == "wiped"


def test_audit_appends_from_many_threads_stay_whole(home: Path) -> None:
    def worker(i: int) -> None:
        for j in range(40):
            pin.audit(f"act-{i}", "allowed", "x" * 500, target=f"t{j}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = audit_entries(home)
    assert len(entries) == 240


# --- a stolen pin.json: the cost of guessing, and the scrypt files from before ----------


def write_legacy_pin_file(home: Path, pin_value: str) -> str:
    """A pin.json as versions before argon2id wrote it: a scrypt hash, no database record."""
    home.mkdir(parents=True, exist_ok=True)
    encoded = pin.hash_pin(pin_value, LEGACY)
    path = home / "pin.json"
    path.write_text(json.dumps({"hash": encoded, "set_at": "2026-01-01T00:00:00.000+00:00"}))
    path.chmod(0o600)
    return encoded


def test_a_scrypt_pin_file_still_verifies_and_is_upgraded_to_argon2id(home: Path) -> None:
    legacy = write_legacy_pin_file(home, PIN)
    assert legacy.startswith("scrypt$1024$8$1$")
    with pytest.raises(GuardRefused, match="wrong PIN"):
        pin.guard("cancel-run", pin=WRONG)
    assert stored_hash(home) == legacy  # a wrong PIN upgrades nothing
    pin.guard("cancel-run", pin=PIN)
    upgraded = stored_hash(home)
    assert upgraded.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert mode(home / "pin.json") == 0o600
    assert pin.verify_pin(PIN) is True and pin.verify_pin(WRONG) is False
    record = pin_record(home)
    assert record is not None and record["verifier"] == upgraded
    assert PIN not in json.dumps(record)


def test_a_raised_default_cost_upgrades_weaker_argon2id_hashes(home, monkeypatch) -> None:
    pin.init_pin(PIN, cost=pin.Argon2Cost(memory_kib=512, time_cost=1, parallelism=1))
    assert stored_hash(home).startswith("$argon2id$v=19$m=512,t=1,p=1$")
    pin.guard("cancel-run", pin=PIN)
    assert stored_hash(home).startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    monkeypatch.setattr(pin, "DEFAULT_COST", pin.Argon2Cost(2048, 2, 1))
    pin.guard("cancel-run", pin=PIN)
    assert stored_hash(home).startswith("$argon2id$v=19$m=2048,t=2,p=1$")


@pytest.mark.parametrize(
    "cost",
    [
        pin.Argon2Cost(memory_kib=2**21, time_cost=1, parallelism=1),
        pin.Argon2Cost(memory_kib=1024, time_cost=0, parallelism=1),
        pin.Argon2Cost(memory_kib=1024, time_cost=1, parallelism=0),
    ],
)
def test_unusable_argon2_cost_is_one_clear_error(home: Path, cost) -> None:
    with pytest.raises(ExpflowError, match="argon2id"):
        pin.init_pin(PIN, cost=cost)
    assert not (home / "pin.json").exists()


def test_a_pin_file_with_an_absurd_cost_fails_closed_without_hashing(home, monkeypatch) -> None:
    pin.init_pin(PIN, cost=FAST)
    path = home / "pin.json"
    data = json.loads(path.read_text())
    data["hash"] = data["hash"].replace("m=1024,", "m=4194304,")
    path.write_text(json.dumps(data))
    monkeypatch.setattr(pin, "DEFAULT_COST", FAST)
    with pytest.raises(GuardRefused):
        pin.guard("cancel-run", pin=PIN)


# --- pin.json removed or replaced: the record in the ledger database ----------------------


def tamper(home: Path, how: str) -> None:
    path = home / "pin.json"
    if how == "deleted":
        path.unlink()
    elif how == "dangling-symlink":
        path.unlink()
        path.symlink_to(home / "nowhere.json")
    elif how == "symlink-to-a-copy":
        copy = home / "copy.json"
        copy.write_bytes(path.read_bytes())
        copy.chmod(0o600)
        path.unlink()
        path.symlink_to(copy)
    elif how == "replaced":
        # Someone else's hash, of a PIN they know, with the right mode.
        path.write_text(json.dumps({"hash": pin.hash_pin("0000", FAST)}))
        path.chmod(0o600)
    else:  # pragma: no cover
        raise AssertionError(how)


TAMPERINGS = ["deleted", "dangling-symlink", "symlink-to-a-copy", "replaced"]


@pytest.mark.parametrize("how", TAMPERINGS)
def test_a_missing_or_replaced_pin_file_fails_closed(home: Path, how: str) -> None:
    pin.init_pin(PIN, cost=FAST)
    record = pin_record(home)
    assert record is not None and record["pin_set"] == 1 and record["file_sha256"]
    tamper(home, how)
    for given in (PIN, "0000", None):
        with pytest.raises(GuardRefused) as info:
            pin.guard("cancel-run", target="r1", pin=given, interactive=False)
        message = str(info.value)
        assert "\n" not in message and "expflow pin clear" in message
        assert any(word in message for word in ("missing", "replaced", "symbolic link"))
    outcomes = {e["outcome"] for e in audit_entries(home) if e["action"] == "cancel-run"}
    assert outcomes == {"refused"}
    status = pin.pin_status()
    assert status["set"] is True and "expflow pin clear" in status["problem"]
    with pytest.raises(GuardRefused):
        pin.verify_pin(PIN)
    # Setting a new PIN over it is refused too: only `pin clear` with the PIN undoes it.
    with pytest.raises(GuardRefused, match="expflow pin clear"):
        pin.init_pin("0000", current="0000", cost=FAST)


@pytest.mark.parametrize("how", TAMPERINGS)
def test_pin_clear_with_the_right_pin_lifts_the_refusal(home: Path, how: str) -> None:
    pin.init_pin(PIN, cost=FAST)
    tamper(home, how)
    with pytest.raises(GuardRefused, match="wrong current PIN"):
        pin.clear_pin("0000")
    pin.clear_pin(PIN)
    assert not (home / "pin.json").is_symlink() and not (home / "pin.json").exists()
    assert pin.pin_status()["set"] is False and pin.pin_status()["problem"] is None
    pin.guard("cancel-run")
    assert audit_entries(home)[-1]["outcome"] == "allowed-no-pin"
    if how == "symlink-to-a-copy":
        assert (home / "copy.json").exists()  # the link goes, never what it points to


def test_a_pin_file_that_is_a_symlink_is_always_refused(home: Path) -> None:
    # Even written that way from the start, with no record to compare against.
    pin.init_pin(PIN, cost=FAST)
    (home / "ledger.sqlite").unlink()
    tamper(home, "symlink-to-a-copy")
    with pytest.raises(GuardRefused, match="symbolic link"):
        pin.guard("cancel-run", pin=PIN)
    assert pin.pin_status()["problem"]


def test_a_scrypt_pin_file_is_recorded_on_first_use_so_deleting_it_fails_closed(home) -> None:
    write_legacy_pin_file(home, PIN)
    assert pin.pin_status()["set"] is True
    (home / "pin.json").unlink()
    with pytest.raises(GuardRefused, match="missing"):
        pin.guard("cancel-run", pin=PIN)


def test_the_database_holds_verifiers_never_the_pin(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    wrong_tries(2, Clock())
    pin.guard("cancel-run", pin=PIN)
    pin.init_pin("864209", current=PIN, cost=FAST)
    raw = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("ledger.sqlite"))
    for secret in (PIN, WRONG, "864209"):
        assert secret.encode() not in raw
    record = pin_record(home)
    assert record is not None and record["verifier"] == stored_hash(home)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("EXPFLOW_PIN", "EXPFLOW_PIN_HASH")}
    return subprocess.run(
        [EXPFLOW, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("how", ["deleted", "dangling-symlink", "replaced"])
def test_runs_delete_is_refused_after_the_pin_file_is_tampered_with(home: Path, how) -> None:
    from expflow_flows.governance.ledger import Ledger

    ledger = Ledger()
    row = ledger.register("keep-me", trainable="pkg.mod:train", params={})
    ledger.move_to(row.id, "RUNNING")
    ledger.move_to(row.id, "COMPLETED")
    pin.init_pin(PIN, cost=FAST)
    tamper(home, how)

    for extra in ([], ["--pin", "0000"], ["--pin", PIN]):
        result = run_cli("runs", "delete", row.id, *extra)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "expflow pin clear" in lines[0] and "Traceback" not in result.stderr
    assert Ledger().get(row.id).name == "keep-me"
    entries = [e for e in audit_entries(home) if e["action"] == "delete-ledger-entry"]
    assert [e["outcome"] for e in entries] == ["refused"] * 3

    wrong = run_cli("pin", "clear", "--pin", "0000")
    assert wrong.returncode == 2 and "wrong current PIN" in wrong.stderr
    assert run_cli("pin", "clear", "--pin", PIN).returncode == 0
    assert run_cli("runs", "delete", row.id).returncode == 0
    assert Ledger().list() == []
    assert_no_secret((home / "audit.log").read_text())


# --- the lockout is kept in the database too ---------------------------------------------


@pytest.mark.parametrize("remove", [["pin_state.json"], ["pin_state.json", "pin_state.lock"]])
def test_deleting_the_lockout_file_does_not_lift_the_lockout(home: Path, remove) -> None:
    pin.init_pin(PIN, cost=FAST)
    clock = Clock()
    wrong_tries(5, clock)
    for name in remove:
        (home / name).unlink()
    with pytest.raises(GuardRefused, match="locked until"):
        pin.guard("cancel-run", pin=PIN, clock=clock)
    status = pin.pin_status(clock=clock)
    assert status["locked"] is True and status["lockouts"] == 1
    clock.t += 31
    pin.guard("cancel-run", pin=PIN, clock=clock)


def test_deleting_the_lockout_file_does_not_reset_the_failure_count(home: Path) -> None:
    pin.init_pin(PIN, cost=FAST)
    clock = Clock()
    wrong_tries(3, clock)
    (home / "pin_state.json").unlink()
    messages = wrong_tries(2, clock)
    assert "locked for 30 s" in messages[-1]


def test_the_lockout_holds_for_a_pin_from_the_environment_too(home, monkeypatch) -> None:
    monkeypatch.setenv("EXPFLOW_PIN_HASH", pin.hash_pin(PIN, FAST))
    clock = Clock()
    wrong_tries(5, clock)
    (home / "pin_state.json").unlink()
    with pytest.raises(GuardRefused, match="locked until"):
        pin.guard("cancel-run", pin=PIN, clock=clock)
