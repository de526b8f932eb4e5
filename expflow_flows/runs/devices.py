"""Per-run GPU assignment: each run that runs at the same time as others gets GPUs of its own.

A run holds its devices for as long as it runs (:func:`hold`) and sees only them
(:func:`env_for`: ``CUDA_VISIBLE_DEVICES``, ``EXPFLOW_GPUS``). Every slot is a lock file
locked with ``flock``: the claim holds across threads, Dask worker processes and flow
runs on one machine, and the kernel drops it when its holder dies, even by ``kill -9``.

A whole-device run locks the device's file exclusively; a run that shares a device
(``per_run`` = 1/k) locks it shared and one of its k slot files exclusively, so whole and
shared runs never meet on one device.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError

log = logging.getLogger(__name__)

AUTO = "auto"
GPUS_ACCEPTED = "expected 'auto' or device ids such as [0, 1] or '0,1' (indices or GPU UUIDs)"
PER_RUN_ACCEPTED = (
    "expected a whole number of devices per run (1, 2, ...) or a share of one device "
    "(0.5, 0.25, ... = 1/k)"
)
NVIDIA_SMI_TIMEOUT_S = 10.0
# An index, a GPU UUID (GPU-…) or a MIG device (MIG-…, older drivers MIG-GPU-…/1/0).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
# How far 1/0.33 may be from 3 and still mean a third.
_SHARE_TOLERANCE = 0.05


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_gpus(value: Any) -> str | tuple[str, ...]:
    """``'auto'``, or device ids from ``[0, 1]``, ``['0', '1']`` or ``'0,1'``; a ValueError
    saying what is accepted for anything else."""
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        value = value.split(",")
    if isinstance(value, bool) or not isinstance(value, (list, tuple)):
        hint = f" (one device is [{value}])" if isinstance(value, int) else ""
        raise ValueError(GPUS_ACCEPTED + hint)
    ids: list[str] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            item = str(item)
        if not isinstance(item, str) or not _ID_RE.fullmatch(item.strip()):
            raise ValueError(f"{_short(item)} is not a device id; {GPUS_ACCEPTED}")
        if item.strip() in ids:
            raise ValueError(f"device {item.strip()} is named twice; {GPUS_ACCEPTED}")
        ids.append(item.strip())
    if not ids:
        raise ValueError(f"no device ids; {GPUS_ACCEPTED}")
    return tuple(ids)


def parse_per_run(value: Any) -> float:
    """Devices per run: a whole number, or 1/k to share one device among k runs; a
    ValueError saying what is accepted for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(PER_RUN_ACCEPTED)
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(PER_RUN_ACCEPTED)
    if value >= 1:
        if value != int(value):
            raise ValueError(PER_RUN_ACCEPTED)
        return value
    if abs(1 / value - round(1 / value)) > _SHARE_TOLERANCE:
        raise ValueError(PER_RUN_ACCEPTED)
    return value


@dataclass(frozen=True)
class DeviceRequest:
    """Which GPUs runs may use (``'auto'``: those this machine shows) and how many each takes."""

    gpus: str | tuple[str, ...]
    per_run: float = 1.0

    def __post_init__(self) -> None:
        try:
            gpus = parse_gpus(self.gpus)
        except ValueError as exc:
            raise ExpflowError(f"gpus {_short(self.gpus)}: {exc}") from None
        try:
            per_run = parse_per_run(self.per_run)
        except ValueError as exc:
            raise ExpflowError(f"per_run {_short(self.per_run)}: {exc}") from None
        object.__setattr__(self, "gpus", gpus)
        object.__setattr__(self, "per_run", per_run)

    @classmethod
    def from_value(cls, value: Any) -> DeviceRequest | None:
        """A request from None, a request, or plain data ``{"gpus": ..., "per_run": ...}``
        (``"auto"``, ``[0, 1]`` or ``"0,1"`` alone mean one device per run)."""
        if value is None or isinstance(value, DeviceRequest):
            return value
        if isinstance(value, (str, list, tuple)):
            return cls(value)
        if not isinstance(value, Mapping):
            raise ExpflowError(
                f"device request {_short(value)}: expected a mapping such as "
                "{'gpus': 'auto', 'per_run': 0.5}"
            )
        unknown = sorted(str(key) for key in value if key not in ("gpus", "per_run"))
        if unknown:
            raise ExpflowError(
                f"device request key {_short(unknown[0])} is not known; accepted: gpus, per_run"
            )
        if "gpus" not in value:
            raise ExpflowError(
                f"device request {_short(dict(value))}: gpus is missing; " + GPUS_ACCEPTED
            )
        return cls(value["gpus"], value.get("per_run", 1.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data that :meth:`from_value` takes back."""
        gpus = self.gpus if isinstance(self.gpus, str) else list(self.gpus)
        return {"gpus": gpus, "per_run": self.per_run}

    @property
    def runs_per_device(self) -> int:
        """Runs that share one device (1 for whole-device runs)."""
        return 1 if self.per_run >= 1 else round(1 / self.per_run)

    @property
    def devices_per_run(self) -> int:
        """Devices one run takes (1 for runs that share one)."""
        return max(1, int(self.per_run))

    def devices(self) -> list[str]:
        """The device ids runs may use (``'auto'``: discovered); one line when there is none."""
        if self.gpus != AUTO:
            return list(self.gpus)
        found, why = _discover(os.environ)
        if not found:
            raise ExpflowError(
                f"gpus: auto found no GPU ({why}); run where there is one or list device "
                "ids, e.g. gpus: [0, 1]"
            )
        return found

    def runs_at_once(self, devices: int) -> int:
        """How many runs ``devices`` devices hold at once."""
        return (
            devices * self.runs_per_device if self.per_run < 1 else devices // self.devices_per_run
        )


def discover(env: Mapping[str, str] | None = None) -> list[str]:
    """Device ids visible to this process: CUDA_VISIBLE_DEVICES, else NVIDIA_VISIBLE_DEVICES,
    else the Slurm job's GPUs, else what nvidia-smi lists (none when it is absent or fails)."""
    return _discover(os.environ if env is None else env)[0]


def _discover(env: Mapping[str, str]) -> tuple[list[str], str]:
    """The device ids, and why there are none (for the error that says so)."""
    cuda = env.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None:
        return _visible(cuda), f"CUDA_VISIBLE_DEVICES={cuda!r} names none"
    nvidia = env.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia is not None and nvidia.strip().lower() not in ("all", "void", "none", ""):
        # Inside a container the runtime shows the devices it was given as 0, 1, ...
        # (GPU UUIDs stay what they are).
        ids = _visible(nvidia)
        ids = [i if not i.isdigit() else str(n) for n, i in enumerate(ids)]
        return ids, f"NVIDIA_VISIBLE_DEVICES={nvidia!r} names none"
    if env.get("SLURM_JOB_ID"):
        for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
            if env.get(name, "").strip():
                return _indices(env[name]), f"{name}={env[name]!r} names none"
    exe = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if exe is None:
        return [], (
            "no CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES or Slurm GPU allocation, "
            "and no nvidia-smi on PATH"
        )
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return [], f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT_S:g} s"
    except OSError as exc:
        return [], f"nvidia-smi did not start ({exc.strerror or type(exc).__name__})"
    if out.returncode != 0:
        said = (out.stderr.strip() or out.stdout.strip()).splitlines()
        return [], f"nvidia-smi failed (exit {out.returncode}{': ' + said[0] if said else ''})"
    ids = [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]
    return ids, "nvidia-smi lists none"


def _visible(value: str) -> list[str]:
    """A ``*_VISIBLE_DEVICES`` list; like CUDA, it ends at the first entry naming no device."""
    ids: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if not part or part.startswith("-") or part == "NoDevFiles" or not _ID_RE.fullmatch(part):
            break
        ids.append(part)
    return list(dict.fromkeys(ids))


def _indices(value: str) -> list[str]:
    """Slurm's GPU indices, ``'0,1'`` (ranges such as ``'0-3'`` expanded)."""
    ids: list[str] = []
    for part in value.split(","):
        lo, dash, hi = part.strip().partition("-")
        if lo.isdigit() and dash and hi.isdigit():
            ids.extend(str(i) for i in range(int(lo), int(hi) + 1))
        elif lo.isdigit() and not dash:
            ids.append(lo)
    return list(dict.fromkeys(ids))


def env_for(devices: tuple[str, ...]) -> dict[str, str]:
    """The environment a run sees: only its devices, and how many there are."""
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(devices),
        "EXPFLOW_GPUS": str(len(dict.fromkeys(devices))),
    }


# ---------------------------------------------------------------- holding devices

# Lock files held by this process. flock already refuses a second open file in one
# process, but where flock is emulated by fcntl (some network file systems) locks are
# per process: threads are kept apart here as well.
_held_lock = threading.Lock()
_held: set[str] = set()  # locked exclusively
_shared: dict[str, int] = {}  # locked shared, by how many claims


def _lock_folder() -> Path:
    """Where the slot files are: per user, and per Slurm job (a job has its own devices)."""
    given = os.environ.get("EXPFLOW_DEVICE_LOCKS")
    base = Path(given) if given else Path(tempfile.gettempdir()) / f"expflow-devices-{os.getuid()}"
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    folder = base / (f"slurm-{re.sub(r'[^A-Za-z0-9_.-]', '_', job)}" if job else "host")
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not given and base.stat().st_uid != os.getuid():
            raise ExpflowError(
                f"GPU lock folder {str(base)!r} belongs to another user; set "
                "EXPFLOW_DEVICE_LOCKS to a folder of yours"
            )
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ExpflowError(
            f"GPU lock folder {str(folder)!r} cannot be made ({exc.strerror or exc}); set "
            "EXPFLOW_DEVICE_LOCKS to a writable folder"
        ) from None
    return folder


class _Locks:
    """Lock files one claim holds (or tries), released together."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fds: dict[str, tuple[int, bool]] = {}  # path: (descriptor, shared)

    def path(self, device: str, slot: int | None = None) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", device)
        return str(
            self.folder / (f"gpu-{name}.lock" if slot is None else f"gpu-{name}.{slot}.lock")
        )

    def take(self, path: str, *, shared: bool = False) -> bool:
        """Lock ``path`` now if it is free (to this process and every other)."""
        if path in _held or path in self.fds or (not shared and _shared.get(path)):
            return False
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ExpflowError(
                f"GPU lock file {path!r} cannot be opened ({exc.strerror or exc}); set "
                "EXPFLOW_DEVICE_LOCKS to a writable folder"
            ) from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        if shared:
            _shared[path] = _shared.get(path, 0) + 1
        else:
            _held.add(path)
            with contextlib.suppress(OSError):  # who holds it, for a person looking
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}\n".encode())
        self.fds[path] = (fd, shared)
        return True

    def drop(self, path: str) -> None:
        if path not in self.fds:
            return
        fd, shared = self.fds.pop(path)
        if shared:
            _shared[path] -= 1
            if not _shared[path]:
                del _shared[path]
        else:
            _held.discard(path)
        os.close(fd)  # closing the last descriptor releases the lock

    def drop_all(self) -> None:
        for path in list(self.fds):
            self.drop(path)


def _claim(
    request: DeviceRequest, devices: list[str], folder: Path
) -> tuple[tuple[str, ...], _Locks] | None:
    """Devices for one run and the locks that hold them, or None when too few are free."""
    locks = _Locks(folder)
    with _held_lock:
        try:
            if request.per_run >= 1:
                got: list[str] = []
                for device in devices:
                    if len(got) < request.devices_per_run and locks.take(locks.path(device)):
                        got.append(device)
                if len(got) < request.devices_per_run:
                    locks.drop_all()
                    return None
                return tuple(got), locks
            return _claim_share(request.runs_per_device, devices, locks)
        except BaseException:
            locks.drop_all()
            raise


def _claim_share(
    shares: int, devices: list[str], locks: _Locks
) -> tuple[tuple[str, ...], _Locks] | None:
    """One slot of the device with the fewest taken, so runs spread before they share."""
    best: tuple[int, str, str] | None = None  # (slots taken, device, slot file)
    for device in devices:
        whole = locks.path(device)
        if not locks.take(whole, shared=True):
            continue  # a whole-device run holds it
        free = []
        for slot in range(shares):
            path = locks.path(device, slot)
            if locks.take(path):
                free.append(path)
        taken = shares - len(free)
        if free and (best is None or taken < best[0]):
            if best is not None:
                locks.drop(locks.path(best[1]))
                locks.drop(best[2])
            best = (taken, device, free.pop(0))
        else:
            locks.drop(whole)
        for path in free:
            locks.drop(path)
    if best is None:
        return None
    return (best[1],), locks


@contextlib.contextmanager
def hold(
    request: DeviceRequest,
    *,
    poll_s: float = 0.2,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, ...]]:
    """Claim devices for one run for the duration of the block and yield their ids; waits
    while all are held, saying so once (``on_wait``, else the log)."""
    devices = request.devices()
    if request.devices_per_run > len(devices):
        raise ExpflowError(
            f"gpus_per_run {request.per_run:g} needs {request.devices_per_run} devices per run but gpus "
            f"{','.join(devices)} has {len(devices)}"
        )
    folder = _lock_folder()
    told = False
    while True:
        claim = _claim(request, devices, folder)
        if claim is not None:
            break
        if not told:
            (on_wait or log.info)(_waiting_line(request, devices))
            told = True
        time.sleep(poll_s)
    held, locks = claim
    try:
        yield held
    finally:
        with _held_lock:
            locks.drop_all()


def _waiting_line(request: DeviceRequest, devices: list[str]) -> str:
    ids = ",".join(devices)
    if request.devices_per_run > 1:
        return (
            f"waiting for {request.devices_per_run} free GPUs: fewer of the {len(devices)} devices of "
            f"gpus {ids} are free"
        )
    slots = request.runs_at_once(len(devices))
    return f"waiting for a free GPU: all {slots} slots of gpus {ids} are held"
