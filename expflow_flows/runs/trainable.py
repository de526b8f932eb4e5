"""The trainable contract: run a callable or a script on parameters, get metrics back.

A trainable is named by a string:

* ``package.module:function`` is imported and called in-process as
  ``function(params)`` or ``function(params, run)`` where ``run`` is a
  :class:`RunContext` (run directory, budget, upstream run, ``report`` for
  intermediate values). It returns a dict of metrics.
* ``path/to/script.py`` (or any executable) runs as a subprocess with
  ``--name value`` arguments. It writes metrics as JSON to the file named by
  ``EXPFLOW_METRICS_FILE`` or prints ``EXPFLOW_METRIC name=value`` lines;
  ``EXPFLOW_METRIC step=N name=value`` lines are intermediate values.

Long runs checkpoint: every run has a checkpoint folder (``run.checkpoint_dir``,
``$EXPFLOW_CHECKPOINT_DIR``) that its caller keeps stable across retries and requeues, so
a retried run resumes from what it saved there. When the run must stop early (a Slurm
time limit is near, the job is preempted), :func:`request_checkpoint` tells it: a script
gets ``SIGUSR1`` and a file at ``$EXPFLOW_STOP_FILE``; a callable sees
``run.stop_requested`` and its next ``run.report`` ends it. Such a run ends
``failed`` with a reason starting "stopped to be resumed", which callers retry.

Either kind can record the LLM calls it makes (``run.log_llm_call(...)`` or an
``EXPFLOW_LLM {json}`` line; see :mod:`expflow_flows.runs.llm_calls`).

Every run writes its run directory (see :mod:`expflow_flows.runs.rundir`) and ends in
one status: ok, warning (ok, but the log holds warnings), pruned (stopped early
by the pruner) or failed (with the reason). A failure is never silent.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import re
import resource
import shlex
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from expflow_flows.errors import ExpflowError, disk_full
from expflow_flows.runs import llm_calls
from expflow_flows.runs.launch import Launch
from expflow_flows.runs.rundir import RunDir
from expflow_flows.runs.ticker import Ticker
from expflow_flows.secrets import mask_command

CALLABLE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
METRIC_LINE_RE = re.compile(r"^\s*EXPFLOW_METRIC\s+(?P<body>.+?)\s*$")
# Python warnings (UserWarning: …), logging's WARNING, and tool output that starts
# with "warning"; not every mention of the word in prose.
WARNING_RE = re.compile(r"\b\w*Warning\b|\bWARNING\b|^\s*warning\b", re.MULTILINE)

Status = Literal["ok", "warning", "pruned", "failed"]
ArgStyle = Literal["argparse", "equals", "hydra"]
ARG_STYLES = ("argparse", "equals", "hydra")

# Called with (step, values); returns True when the run should stop (pruned).
ReportHook = Callable[[int, dict[str, float]], bool]
POLL_S = 1.0  # seconds between looks at a running script's result files


class Pruned(Exception):
    """Raised inside a callable trainable by ``run.report`` when the pruner stops it."""


@dataclass(frozen=True)
class Budget:
    """How much a run may spend; the trainable reads it (epochs, steps or seconds)."""

    epochs: int | None = None
    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def from_value(cls, value: Budget | dict | None) -> Budget:
        """Build a budget from a dict such as ``{"epochs": 20}``; unknown keys are an error."""
        if value is None:
            return cls()
        if isinstance(value, Budget):
            return value
        if not isinstance(value, dict):
            raise ExpflowError(
                f"budget {value!r} is not a mapping; expected keys epochs, steps, seconds"
            )
        unknown = sorted(set(value) - {"epochs", "steps", "seconds"})
        if unknown:
            raise ExpflowError(
                f"budget key {unknown[0]!r} is not known; expected epochs, steps or seconds"
            )
        out: dict[str, Any] = {}
        for key, val in value.items():
            if val is None:
                continue
            try:
                num = float(val)
            except (TypeError, ValueError):
                raise ExpflowError(f"budget {key}={val!r} is not a number") from None
            if not math.isfinite(num) or num <= 0:
                raise ExpflowError(f"budget {key}={val!r} must be a positive number")
            out[key] = num if key == "seconds" else int(num)
        return cls(**out)

    def as_dict(self) -> dict[str, float]:
        """The budget's set fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def as_env(self) -> dict[str, str]:
        """Environment variables a script reads its budget from."""
        return {f"EXPFLOW_BUDGET_{k.upper()}": str(v) for k, v in self.as_dict().items()}


@dataclass(frozen=True)
class Trainable:
    """A parsed trainable reference: a callable ``module:function``, a script path, or a
    command (see :class:`~expflow_flows.runs.launch.Launch`)."""

    spec: str
    kind: Literal["callable", "script", "command"]

    @classmethod
    def parse(cls, spec: str) -> Trainable:
        """Classify ``spec``; an empty or malformed spec is an error."""
        if not isinstance(spec, str) or not spec.strip():
            raise ExpflowError(
                f"trainable {spec!r} is empty; expected 'package.module:function' or a script path"
            )
        spec = spec.strip()
        if CALLABLE_RE.match(spec) and not spec.endswith(".py"):
            return cls(spec, "callable")
        return cls(spec, "script")

    def check(self) -> None:
        """Fail early, with one clear line, if the trainable cannot be found."""
        if self.kind == "callable":
            resolve_callable(self.spec)
            return
        if self.kind == "command":
            return
        path = Path(self.spec).expanduser()
        if not path.exists():
            raise ExpflowError(
                f"trainable script {self.spec!r} does not exist (looked in {Path.cwd()}); "
                "expected a script path or 'package.module:function'"
            )
        if path.is_dir():
            raise ExpflowError(f"trainable script {self.spec!r} is a directory, not a script")


def load_function(spec: str, what: str = "function") -> Callable[..., Any]:
    """A user's function by ``package.module:function`` or ``path/to/file.py:function``."""
    path, sep, attr = spec.rpartition(":")
    if sep and path.endswith(".py"):
        file = Path(path).expanduser()
        if not file.is_file():
            raise ExpflowError(f"{what} {spec!r}: file {path!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_expflow_user_{file.stem}", file)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file failing to import is one line
            raise ExpflowError(
                f"{what} {spec!r}: {path} failed to import: {type(exc).__name__}: {exc}"
            ) from None
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            raise ExpflowError(f"{what} {spec!r}: {path} has no function {attr!r}")
        return fn
    if not CALLABLE_RE.match(spec):
        raise ExpflowError(
            f"{what} {spec!r}: expected 'package.module:function' or 'file.py:function'"
        )
    return resolve_callable(spec)


def resolve_callable(spec: str) -> Callable[..., Any]:
    """Import ``module:function``; a missing module or attribute is an ExpflowError."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExpflowError(
            f"trainable {spec!r}: cannot import module {module_name!r} ({exc})"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ExpflowError(f"trainable {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


@dataclass
class RunContext:
    """What a callable trainable gets besides its params."""

    run_dir: Path
    budget: Budget = field(default_factory=Budget)
    upstream: Path | None = None
    hook: ReportHook | None = None
    intermediate: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    gpus: tuple[str, ...] = ()

    @property
    def stop_requested(self) -> bool:
        """True once the run should save a checkpoint and return (a time limit is near)."""
        return _stop_reason(self.run_dir) is not None

    visible_only: bool = True  # CUDA_VISIBLE_DEVICES shows this run its own GPUs only

    @property
    def device(self) -> str:
        """The torch device this run should use: its first GPU, else ``cpu``.

        Where the process runs this callable alone, ``CUDA_VISIBLE_DEVICES`` names only the
        run's GPUs, so that is ``cuda:0``; where callables share a process (the threads
        runner) it is the GPU's own index."""
        if not self.gpus:
            return "cpu"
        first = self.gpus[0]
        return "cuda:0" if self.visible_only or not first.isdigit() else f"cuda:{first}"

    def report(self, step: int, **values: float) -> None:
        """Record intermediate values; raises :class:`Pruned` when the pruner says stop.

        Once a stop is requested (:attr:`stop_requested`) it ends the run: save the
        checkpoint before reporting."""
        if _STOP.is_set():
            raise _Stopped(f"stopped at step {step}: its flow run is being cancelled or shut down")
        why = _stop_reason(self.run_dir)
        if why is not None:
            self.intermediate.append(
                {"step": int(step), **{k: float(v) for k, v in values.items()}}
            )
            raise _Stopped(f"{STOPPED_TO_RESUME} at step {step} ({why})")
        clean = {k: float(v) for k, v in values.items()}
        self.intermediate.append({"step": int(step), **clean})
        if self.hook is not None and self.hook(int(step), clean):
            raise Pruned(f"pruned at step {step}")

    def log_llm_call(
        self, model: str, input: Any = None, output: Any = None, **fields: Any
    ) -> None:
        """Record one LLM call (usage, cost_usd, name, started/ended or latency_s, metadata…).

        It goes to ``llm_calls.jsonl`` in the run folder; a bad field is an ExpflowError.
        """
        call = llm_calls.normalise({"model": model, "input": input, "output": output, **fields})
        llm_calls.append(self.run_dir, call)


@dataclass
class RunResult:
    """The outcome of one run: status, reason, metrics and where it lives."""

    run_dir: Path
    status: Status
    metrics: dict[str, float]
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    intermediate: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    llm_calls: int = 0
    llm_cost_usd: float = 0.0
    checkpoint_dir: str | None = None

    @property
    def ok(self) -> bool:
        """True for ok and warning (a usable result)."""
        return self.status in ("ok", "warning")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


def format_args(params: dict[str, Any], style: ArgStyle = "argparse") -> list[str]:
    """Command-line arguments for a script: ``--name value`` (argparse), ``--name=value`` or ``++name=value`` (Hydra)."""
    if style not in ARG_STYLES:
        raise ExpflowError(f"argument style {style!r} is not known; expected one of {ARG_STYLES}")
    args: list[str] = []
    for name, value in params.items():
        if value is None:  # an unset parameter: let the script use its own default
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        if style == "argparse":
            args += [f"--{name}", text]
        elif style == "equals":
            args.append(f"--{name}={text}")
        else:
            args.append(f"++{name}={text}")
    return args


def parse_metric_line(line: str) -> tuple[int | None, dict[str, float]] | None:
    """Parse ``EXPFLOW_METRIC [step=N] name=value ...``; None if the line is not one."""
    match = METRIC_LINE_RE.match(line)
    if not match:
        return None
    step: int | None = None
    values: dict[str, float] = {}
    for token in match.group("body").split():
        name, sep, raw = token.partition("=")
        if not sep or not name:
            continue
        if name == "step":
            try:
                step = int(float(raw))
            except ValueError:
                continue
            continue
        try:
            values[name] = float(raw)
        except ValueError:
            continue
    return step, values


def _clean_metrics(raw: Any, origin: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise _RunFailure(f"{origin} gave {type(raw).__name__}, expected a dict of metrics")
    out: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise _RunFailure(f"{origin}: metric {key!r} is not a number: {value!r}") from None
        out[str(key)] = float(value)
    return out


class _Stopped(BaseException):
    """Raised inside a callable trainable at its next report once its flow run is ending.

    A BaseException, so a trainable's own ``except Exception`` does not swallow it."""


# Reasons that say the machine failed a run, not its parameters: a retry may succeed.
MACHINE_FAILURES = (
    "no space left on device",
    "disk quota exceeded",
    "disk is full",
    "database or disk is full",
    "disk i/o error",
    "worker was lost",
    "killedworker",
    "killed by signal 9",
    "its process stopped",
    "stopped to be resumed",
    "killed by signal 15",
)


def is_machine_failure(reason: str) -> bool:
    """Whether a failed run's reason says the machine failed it (a full disk, a lost
    worker, a killed process, a stop for a time limit): a retry may succeed."""
    low = reason.lower()
    return any(word in low for word in MACHINE_FAILURES)


# Set when the flow run that started the callables of this process is ending (cancelled,
# crashed): callables running in threads cannot be killed, and an interpreter waits for
# them at exit, so a cancelled run would wait for the whole training. They stop at their
# next ``run.report`` instead.
_STOP = threading.Event()


def request_stop() -> None:
    """Make every callable trainable in this process stop at its next report."""
    _STOP.set()


def clear_stop() -> None:
    """A new run starts: callables run again."""
    _STOP.clear()


# The start of the reason of a run stopped so that it can resume later (a time limit or a
# preemption is near); callers retry such runs from their checkpoint folder.
STOPPED_TO_RESUME = "stopped to be resumed"
STOP_FILE = "EXPFLOW_STOP"  # written into a run folder when the run is told to stop
_stopping: dict[str, str] = {}  # "reason": why this process's runs must checkpoint and stop
_processes: dict[str, subprocess.Popen] = {}  # run folder -> its running script or command
_process_lock = threading.Lock()


def request_checkpoint(reason: str) -> list[str]:
    """Tell every run of this process to save a checkpoint and stop, because its job ends
    soon (``reason`` says why); runs that start afterwards stop before they begin.

    Scripts and commands get ``SIGUSR1`` (to their process group) and a file at
    ``$EXPFLOW_STOP_FILE`` holding the reason; callables see ``run.stop_requested``.
    Returns the run folders of the scripts and commands told.
    """
    import signal

    with _process_lock:
        _stopping["reason"] = reason
        running = dict(_processes)
    for folder, proc in running.items():
        with contextlib.suppress(OSError):
            (Path(folder) / STOP_FILE).write_text(reason + "\n", encoding="utf-8")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGUSR1)
    return sorted(running)


def checkpoint_requested() -> str | None:
    """Why this process's runs were told to stop, or None."""
    return _stopping.get("reason")


def clear_checkpoint_request() -> None:
    """A new attempt starts (after a requeue): runs go on again."""
    _stopping.pop("reason", None)


def _stop_reason(run_dir: Path | None = None) -> str | None:
    return _stopping.get("reason")


class _StopWatch:
    """Watches stop files (one per flow run, written when its job is about to end) from
    every process that runs its trainables, and passes a stop on to them."""

    def __init__(self) -> None:
        self.files: dict[str, int] = {}
        self.lock = threading.Lock()
        self.ticker: Ticker | None = None

    def tick(self) -> None:
        with self.lock:
            files = list(self.files)
        for name in files:
            try:
                reason = Path(name).read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if checkpoint_requested() is None:
                request_checkpoint(reason or "its job is about to end")

    @contextlib.contextmanager
    def watching(self, stop_file: Path | None) -> Iterator[None]:
        if stop_file is None:
            yield
            return
        name = str(stop_file)
        with self.lock:
            self.files[name] = self.files.get(name, 0) + 1
            if self.ticker is None:
                self.ticker = Ticker(POLL_S, self.tick, "expflow-stopwatch").start()
        self.tick()
        try:
            yield
        finally:
            with self.lock:
                self.files[name] -= 1
                if not self.files[name]:
                    del self.files[name]


_stop_watch = _StopWatch()


class _RunFailure(Exception):
    pass


def run_trainable(
    trainable: str | Trainable,
    params: dict[str, Any],
    run_dir: Path | str,
    *,
    budget: Budget | dict | None = None,
    upstream: Path | str | None = None,
    hook: ReportHook | None = None,
    timeout: float | None = None,
    arg_style: ArgStyle = "argparse",
    extra_env: dict[str, str] | None = None,
    launch: Launch | dict[str, Any] | None = None,
    checkpoint_dir: Path | str | None = None,
    stop_file: Path | str | None = None,
    devices: Any = None,
) -> RunResult:
    """Run ``trainable`` on ``params`` in ``run_dir`` and record everything there.

    ``launch`` says how a script or command starts (interpreter, command line, working
    directory, environment, upstream files, metric sources); with a ``command`` in it,
    ``trainable`` is only its label. ``checkpoint_dir`` is the run's checkpoint folder
    (default: ``checkpoint`` in the run folder), which a caller that retries keeps the
    same; ``stop_file`` is a file whose appearance tells the run to checkpoint and stop
    (see :func:`request_checkpoint`); ``devices`` (a
    :class:`~expflow_flows.runs.devices.DeviceRequest` or its plain data) gives the run
    GPUs of its own.

    Never raises for a failing trainable: the failure is in the result and in the
    run directory's ``status`` file.
    """
    try:
        with _stop_watch.watching(Path(stop_file) if stop_file else None):
            return _run_trainable(
                trainable,
                params,
                run_dir,
                budget,
                upstream,
                hook,
                timeout,
                arg_style,
                extra_env,
                launch,
                Path(checkpoint_dir) if checkpoint_dir else None,
                devices,
            )
    except OSError as exc:
        full = disk_full(exc, run_dir)
        if full is None:
            raise
        # Nothing more can be written there: the result says why, and the HPO loop does
        # not count the trial (an infrastructure failure).
        return RunResult(Path(run_dir), "failed", {}, str(full))


def _run_trainable(
    trainable: str | Trainable,
    params: dict[str, Any],
    run_dir: Path | str,
    budget: Budget | dict | None,
    upstream: Path | str | None,
    hook: ReportHook | None,
    timeout: float | None,
    arg_style: ArgStyle,
    extra_env: dict[str, str] | None,
    launch: Launch | dict[str, Any] | None,
    checkpoint_dir: Path | None = None,
    devices: Any = None,
) -> RunResult:
    how = Launch.from_value(launch)
    if how.command:
        spec = Trainable(str(trainable) if trainable else shlex.join(how.command), "command")
    else:
        spec = trainable if isinstance(trainable, Trainable) else Trainable.parse(trainable)
    budget = Budget.from_value(budget)
    params = how.with_budget(params, budget.as_dict())
    rd = RunDir.create(Path(run_dir))
    rd.write_params(params)
    with contextlib.suppress(FileNotFoundError):
        (rd.path / STOP_FILE).unlink()  # a stop told to an earlier attempt in this folder
    ckpt = checkpoint_dir or rd.path / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cpu0 = time.process_time()
    meta: dict[str, Any] = {
        "trainable": spec.spec,
        "kind": spec.kind,
        "budget": budget.as_dict(),
        "upstream": str(upstream) if upstream else None,
        "started_at": started,
        "pid": os.getpid(),
        "checkpoint": {"dir": str(ckpt), "resumed": any(ckpt.iterdir())},
    }
    with _devices_held(devices) as gpus:
        if gpus is not None:
            meta["gpus"] = list(gpus)
        if checkpoint_requested() is not None:
            result = {
                "status": "failed",
                "reason": f"{STOPPED_TO_RESUME} before it started ({checkpoint_requested()})",
                "metrics": {},
                "intermediate": [],
            }
        elif spec.kind == "callable":
            result = _run_callable(spec, params, rd, budget, upstream, hook, ckpt, gpus)
            meta["cpu_s"] = round(time.process_time() - cpu0, 3)
            # A callable shares its process: this is the process's high-water mark.
            meta["peak_rss_mb"] = round(_maxrss_mb(resource.getrusage(resource.RUSAGE_SELF)), 1)
        else:
            env = {
                **(extra_env or {}),
                "EXPFLOW_CHECKPOINT_DIR": str(ckpt),
                "EXPFLOW_STOP_FILE": str(rd.path / STOP_FILE),
                **_device_env(gpus),
            }
            result = _run_process(
                spec, params, rd, budget, upstream, hook, timeout, arg_style, env, how
            )
            meta.update(result.pop("meta", {}))
    status, reason, metrics, intermediate = (
        result["status"],
        result["reason"],
        result["metrics"],
        result["intermediate"],
    )
    why = checkpoint_requested()
    if why is not None and status not in ("ok", "warning") and STOPPED_TO_RESUME not in reason:
        # Told to stop (SIGUSR1, the stop file): however it ended, it resumes later.
        status, reason = "failed", f"{STOPPED_TO_RESUME} ({why}); it ended: {reason}"
    meta["checkpoint"]["files"] = _count_files(ckpt)
    if not meta["checkpoint"]["files"]:
        with contextlib.suppress(OSError):
            ckpt.rmdir()  # nothing was saved: no empty folder left behind
    if intermediate:
        steps = sorted(intermediate, key=lambda row: row["step"])
        meta["progress"] = {
            "first_step": steps[0]["step"],
            "last_step": steps[-1]["step"],
            "last": steps[-1],
        }
    if status not in ("ok", "warning"):
        meta["reason"] = reason
    found_warnings = rd.scan_warnings(WARNING_RE)
    if status == "ok" and found_warnings:
        status = "warning"
    ended = time.time()
    meta.update({"ended_at": ended, "wall_s": round(ended - started, 3), "status": status})
    llm = llm_calls.summarize([rd.path])
    if llm.calls:
        meta["llm"] = llm.to_dict()
    rd.write_metrics(metrics)
    rd.write_intermediate(intermediate)
    rd.write_metadata(meta)
    rd.write_status(status, reason, found_warnings)
    return RunResult(
        run_dir=rd.path,
        status=status,
        metrics=metrics,
        reason=reason,
        warnings=found_warnings,
        intermediate=intermediate,
        wall_s=round(ended - started, 3),
        cpu_s=meta.get("cpu_s"),
        peak_rss_mb=meta.get("peak_rss_mb"),
        llm_calls=llm.calls,
        llm_cost_usd=round(llm.cost_usd, 10),
        checkpoint_dir=str(ckpt),
    )


def _count_files(folder: Path) -> int:
    try:
        return sum(1 for path in folder.rglob("*") if path.is_file())
    except OSError:
        return 0


@contextlib.contextmanager
def _devices_held(devices: Any) -> Iterator[tuple[str, ...] | None]:
    """The GPUs this run holds while it runs (None: no devices were asked for)."""
    if devices is None:
        yield None
        return
    from expflow_flows.runs import devices as devices_mod

    request = devices_mod.DeviceRequest.from_value(devices)
    if request is None:
        yield None
        return
    with devices_mod.hold(request) as held:
        yield tuple(held)


def _device_env(gpus: tuple[str, ...] | None) -> dict[str, str]:
    if gpus is None:
        return {}
    from expflow_flows.runs import devices as devices_mod

    return devices_mod.env_for(gpus)


class _LogHandler(logging.Handler):
    def __init__(self, stream: io.TextIOBase):
        super().__init__(logging.INFO)
        self.stream = stream
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.stream.write(self.format(record) + "\n")


class _Router(io.TextIOBase):
    """sys.stdout/sys.stderr while callables run: each thread running a callable writes to
    its own run's log; every other thread writes where the stream went before."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def _target(self) -> Any:
        return getattr(_capture, "log", None) or self.fallback

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self._target().flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False


_capture = threading.local()
_route_lock = threading.Lock()
_routing: dict[str, Any] = {"active": 0}


def _route_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    caught = getattr(_capture, "caught", None)
    if caught is not None:
        caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
        return
    _routing["showwarning"](message, category, filename, lineno, file, line)


_run_dirs: list[str] = []  # callables running in this process, oldest first
_env_before: dict[str, str | None] = {}


def _enter_run_dir(path: Path) -> None:
    """$EXPFLOW_RUN_DIR names the newest callable's folder while callables run (one
    environment per process: a callable should read ``run.run_dir``)."""
    with _route_lock:
        if not _run_dirs:
            _env_before["EXPFLOW_RUN_DIR"] = os.environ.get("EXPFLOW_RUN_DIR")
        _run_dirs.append(str(path))
        os.environ["EXPFLOW_RUN_DIR"] = str(path)


def _leave_run_dir(path: Path) -> None:
    """Back to the newest callable still running, or to what it was before any ran."""
    with _route_lock:
        with contextlib.suppress(ValueError):
            _run_dirs.remove(str(path))
        if _run_dirs:
            os.environ["EXPFLOW_RUN_DIR"] = _run_dirs[-1]
            return
        before = _env_before.pop("EXPFLOW_RUN_DIR", None)
        if before is None:
            os.environ.pop("EXPFLOW_RUN_DIR", None)
        else:
            os.environ["EXPFLOW_RUN_DIR"] = before


@contextlib.contextmanager
def _captured(log: Any) -> Iterator[list[warnings.WarningMessage]]:
    """This thread's prints, log records and warnings go to ``log`` (and the list yielded),
    while other threads' callables capture theirs at the same time."""
    with _route_lock:
        if _routing["active"] == 0:
            saved = warnings.catch_warnings()
            saved.__enter__()
            warnings.simplefilter("always")
            _routing.update(
                warnings_cm=saved,
                showwarning=warnings.showwarning,
                stdout=sys.stdout,
                stderr=sys.stderr,
            )
            warnings.showwarning = _route_warning
            sys.stdout, sys.stderr = _Router(sys.stdout), _Router(sys.stderr)
        _routing["active"] += 1
    _capture.log, _capture.caught = log, []
    handler = _LogHandler(log)
    me = threading.get_ident()
    handler.addFilter(lambda record: record.thread == me)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield _capture.caught
    finally:
        root.removeHandler(handler)
        _capture.log = _capture.caught = None
        with _route_lock:
            _routing["active"] -= 1
            if _routing["active"] == 0:
                sys.stdout, sys.stderr = _routing["stdout"], _routing["stderr"]
                _routing["warnings_cm"].__exit__(None, None, None)


def _run_callable(
    spec: Trainable,
    params: dict[str, Any],
    rd: RunDir,
    budget: Budget,
    upstream: Path | str | None,
    hook: ReportHook | None,
    checkpoint_dir: Path | None = None,
    gpus: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    ctx = RunContext(
        run_dir=rd.path,
        budget=budget,
        upstream=Path(upstream) if upstream else None,
        hook=hook,
        checkpoint_dir=checkpoint_dir or rd.path / "checkpoint",
        gpus=tuple(gpus or ()),
    )
    saved_env: dict[str, str | None] | None = None
    if gpus is not None:
        with _route_lock:
            if not _run_dirs:  # alone in this process: its environment is the run's
                wanted = _device_env(gpus)
                saved_env = {k: os.environ.get(k) for k in wanted}
                os.environ.update(wanted)
        ctx.visible_only = saved_env is not None
    status: Status = "ok"
    reason = ""
    metrics: dict[str, float] = {}
    # Callables sharing a process (the threads runner) run at the same time: each thread's
    # output is routed to its own run's log.
    with open(rd.log_path, "a", encoding="utf-8") as log, _captured(log) as caught:
        _enter_run_dir(rd.path)
        try:
            try:
                fn = resolve_callable(spec.spec)
                raw = fn(dict(params), ctx) if _takes_run(fn) else fn(dict(params))
                metrics = _clean_metrics(raw, f"trainable {spec.spec!r}")
                if not metrics:
                    raise _RunFailure(f"trainable {spec.spec!r} reported no metrics")
            except Pruned as exc:
                status, reason = "pruned", str(exc)
            except _Stopped as exc:
                status, reason = "failed", str(exc)
            except _RunFailure as exc:
                status, reason = "failed", str(exc)
            except ExpflowError as exc:
                status, reason = "failed", str(exc)
            except BaseException as exc:  # noqa: BLE001 - a trainable's crash is its result
                if isinstance(exc, KeyboardInterrupt):
                    raise
                traceback.print_exc(file=log)
                status, reason = "failed", f"raised {type(exc).__name__}: {exc}"
            for w in caught:
                log.write(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})\n")
        finally:
            _leave_run_dir(rd.path)
            for key, value in (saved_env or {}).items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return {
        "status": status,
        "reason": reason,
        "metrics": metrics,
        "intermediate": ctx.intermediate,
    }


def _takes_run(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


def script_command(
    path: Path,
    params: dict[str, Any],
    arg_style: ArgStyle,
    launch: Launch | None = None,
    run_dir: Path | None = None,
    upstream: Path | str | None = None,
) -> list[str]:
    """The command line a script trainable runs with; raises _RunFailure if it cannot run."""
    launch = launch or Launch()
    if not path.exists():
        raise _RunFailure(f"script {str(path)!r} does not exist")
    if path.is_dir():
        raise _RunFailure(f"script {str(path)!r} is a directory")
    if path.suffix != ".py" and not launch.interpreter and not os.access(path, os.X_OK):
        raise _RunFailure(
            f"script {str(path)!r} is not runnable: not a .py file and not executable (chmod +x)"
        )
    return launch.command_line(
        path.resolve(), format_args(params, arg_style), run_dir or Path.cwd(), upstream
    )


def _absolute_words(words: list[str]) -> list[str]:
    """Relative file names in a command, made absolute: it may start in another folder."""
    out = []
    for word in words:
        candidate = Path(word).expanduser()
        if (
            not candidate.is_absolute()
            and ("/" in word or candidate.suffix in (".py", ".sh", ".sif", ".yaml", ".yml"))
            and candidate.exists()
        ):
            word = str(candidate.resolve())
        out.append(word)
    return out


def _run_process(
    spec: Trainable,
    params: dict[str, Any],
    rd: RunDir,
    budget: Budget,
    upstream: Path | str | None,
    hook: ReportHook | None,
    timeout: float | None,
    arg_style: ArgStyle,
    extra_env: dict[str, str],
    launch: Launch,
) -> dict[str, Any]:
    from expflow_flows.runs import capture

    intermediate: list[dict[str, Any]] = []
    printed: dict[str, float] = {}
    metrics_file = rd.path / "metrics.json"
    env = dict(os.environ)
    # A parent's tracking state must not leak into the child run.
    for key in ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"):
        env.pop(key, None)
    env.update(
        {
            "EXPFLOW_RUN_DIR": str(rd.path),
            "EXPFLOW_METRICS_FILE": str(metrics_file),
            "EXPFLOW_LAUNCH_DIR": os.getcwd(),
            "PYTHONUNBUFFERED": "1",
            **budget.as_env(),
            **launch.env,
            **extra_env,
        }
    )
    if upstream:
        env["EXPFLOW_UPSTREAM_RUN_DIR"] = str(upstream)
    meta: dict[str, Any] = {}
    try:
        sources = capture.MetricSources.from_dict(launch.metrics)
        follower = capture.OutputFollower(sources.patterns)
        if spec.kind == "command":
            cmd = launch.command_line(None, format_args(params, arg_style), rd.path, upstream)
        else:
            cmd = script_command(
                Path(spec.spec).expanduser(), params, arg_style, launch, rd.path, upstream
            )
        cmd = _absolute_words(cmd)
        cwd = launch.working_dir(rd.path)
        placed = launch.bring_upstream(upstream, rd.path)
    except (_RunFailure, ExpflowError) as exc:
        rd.log_path.write_text(f"expflow: {exc}\n", encoding="utf-8")
        return {"status": "failed", "reason": str(exc), "metrics": {}, "intermediate": []}
    meta["command"] = mask_command(cmd)  # the process gets the real values; the record does not
    meta["cwd"] = str(cwd or os.getcwd())
    if placed:
        meta["from_upstream"] = placed
    # Result files are looked for in the run folder, then where the process ran.
    workdir = cwd or Path.cwd()
    roots = [rd.path] if workdir == rd.path else [rd.path, workdir]
    pruned_at: int | None = None
    timed_out = False
    lock = threading.Lock()

    def report(step: int, values: dict[str, float]) -> None:
        nonlocal pruned_at
        with lock:
            intermediate.append({"step": step, **values})
            if hook is not None and pruned_at is None and hook(step, values):
                pruned_at = step
                _terminate(proc)

    def take(matches: list[tuple[int | None, dict[str, float]]]) -> None:
        for step, values in matches:
            if step is None:
                printed.update(values)
            else:
                printed.update(values)  # the last per-step value is also the final one
                report(step, values)

    with open(rd.log_path, "a", encoding="utf-8") as log:
        if placed:
            log.write(f"expflow: from the upstream run: {', '.join(placed)}\n")
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            reason = f"{spec.kind} {spec.spec!r} could not start: {exc.strerror or exc}"
            log.write(f"expflow: {reason}\n")
            return {"status": "failed", "reason": reason, "metrics": {}, "intermediate": []}
        meta["child_pid"] = proc.pid
        with _process_lock:
            _processes[str(rd.path)] = proc
            told = checkpoint_requested()
        if told is not None:  # asked between the start and the registration
            request_checkpoint(told)
        timer = None
        if timeout:

            def _expire() -> None:
                nonlocal timed_out
                timed_out = True
                _terminate(proc)

            timer = threading.Timer(timeout, _expire)
            timer.daemon = True
            timer.start()
        poller = None
        if sources.files or sources.tensorboard:
            poller = _poller(capture.FilePoller(sources, roots), report)
            poller.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            _record_llm_line(line, rd, log)
            parsed = parse_metric_line(line)
            if parsed is not None:
                step, values = parsed
                if step is None:
                    printed.update(values)
                else:
                    report(step, values)
                continue
            if sources.patterns:
                take(follower.feed(line))
        if sources.patterns:
            take(follower.close())
        returncode, usage = _wait_with_usage(proc)
        with _process_lock:
            _processes.pop(str(rd.path), None)
        if poller is not None:
            poller.stop()
        if usage is not None:
            meta["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
            meta["peak_rss_mb"] = round(_maxrss_mb(usage), 1)
        if timer is not None:
            timer.cancel()
        log.flush()
    meta["returncode"] = returncode
    if pruned_at is not None:
        return _script_outcome("pruned", f"pruned at step {pruned_at}", {}, intermediate, meta)
    if timed_out:
        return _script_outcome(
            "failed", f"timed out after {timeout:g} s and was stopped", {}, intermediate, meta
        )
    what = f"{'script' if spec.kind == 'script' else 'command'} {spec.spec!r}"
    if returncode != 0:
        tail = rd.log_tail(1)
        why = f"exited with code {returncode}"
        if returncode < 0:
            why = f"was killed by signal {-returncode}"
        reason = f"{what} {why}" + (f": {tail}" if tail else "")
        return _script_outcome("failed", reason, {}, intermediate, meta)
    metrics = dict(printed)
    try:
        if metrics_file.exists():
            try:
                from_file = json.loads(metrics_file.read_text(encoding="utf-8") or "null")
            except json.JSONDecodeError as exc:
                raise _RunFailure(
                    f"metrics file {metrics_file.name} is not valid JSON ({exc.msg})"
                ) from None
            metrics.update(_clean_metrics(from_file, "EXPFLOW_METRICS_FILE"))
        if not sources.empty():
            final, steps = capture.collect(sources, roots, rd.path)
            metrics.update(final)
            # the rows the poller already reported while the run went are not added twice
            seen = {capture.row_key(row) for row in intermediate}
            intermediate.extend(row for row in steps if capture.row_key(row) not in seen)
        metrics = _clean_metrics(metrics, "printed metrics")
    except (_RunFailure, ExpflowError) as exc:
        return _script_outcome("failed", str(exc), {}, intermediate, meta)
    if not metrics:
        looked = sources.describe() if not sources.empty() else ""
        return _script_outcome(
            "failed",
            f"{what} reported no metrics"
            + (f"; looked for {looked}" if looked else "")
            + " (declare metrics: patterns, files, tensorboard or reader; or write JSON to "
            "$EXPFLOW_METRICS_FILE, or print 'EXPFLOW_METRIC name=value')",
            {},
            intermediate,
            meta,
        )
    intermediate.sort(key=lambda row: row["step"])
    return _script_outcome("ok", "", metrics, intermediate, meta)


def _poller(file_poller: Any, report: Callable[[int, dict[str, float]], None]) -> Ticker:
    """Polls a run's result files while it runs, so their per-step values reach the pruner."""

    def tick() -> None:
        for row in file_poller.poll():
            report(int(row["step"]), {k: v for k, v in row.items() if k != "step"})

    return Ticker(POLL_S, tick, "expflow-poll")


def _record_llm_line(line: str, rd: RunDir, log: Any) -> None:
    """Keep an ``EXPFLOW_LLM`` call; a malformed one is a warning in the log, not a crash."""
    try:
        call = llm_calls.parse_line(line)
    except ExpflowError as exc:
        log.write(f"warning: expflow ignored an EXPFLOW_LLM line: {exc}\n")
        return
    if call is not None:
        llm_calls.append(rd.path, call)


def _script_outcome(
    status: Status,
    reason: str,
    metrics: dict[str, float],
    intermediate: list[dict[str, Any]],
    meta: dict[str, Any],
) -> dict[str, Any]:
    return {
        "status": status,
        "reason": reason,
        "metrics": metrics,
        "intermediate": intermediate,
        "meta": meta,
    }


def _maxrss_mb(usage: Any) -> float:
    # Linux reports ru_maxrss in KiB.
    return usage.ru_maxrss / 1024.0


def _die_with_parent() -> None:
    """In the child, before it runs: be killed when the process that started it dies (a
    Dask worker killed, a lost node's runner), so an orphan never goes on writing into a
    checkpoint folder that a retry now uses (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort: the run goes on without it
        return


def _wait_with_usage(proc: subprocess.Popen) -> tuple[int, Any]:
    """Wait for the script and read its own CPU time and peak memory (os.wait4)."""
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # already reaped (e.g. by a timeout path)
        return proc.wait(), None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def _terminate(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a script and its children: SIGTERM to its process group, then SIGKILL."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return

    def _escalate() -> None:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    threading.Thread(target=_escalate, daemon=True).start()
