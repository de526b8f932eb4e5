"""Settings the pipeline and the sweep share: trainables, budgets, clusters, off-peak, tracking.

One vocabulary for both: ``cluster.kind`` / ``cluster.workers`` / ``cluster.address``,
``objective`` + ``direction``, ``budget`` and ``timeout`` on the trainable they limit.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from expflow_flows.errors import ExpflowError
from expflow_flows.settings.base import Settings

Direction = Literal["minimize", "maximize"]
ArgStyle = Literal["argparse", "equals", "hydra"]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


# One rule for every name that becomes a folder, a file or a study: experiments, sweeps,
# steps, studies. ASCII only, so a name is the same on every file system and in every tool.
MAX_NAME_LENGTH = 100
NAME_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
NAME_RULE = (
    "letters, digits, '_', '-' and '.', starting with a letter, digit or '_', "
    f"at most {MAX_NAME_LENGTH} characters, e.g. 'pde-advection'"
)


def check_name(value: str) -> str:
    """``value`` if it is a safe name (see ``NAME_RULE``), else a ValueError saying the rule."""
    if not NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"expected a name without '/', '..' or spaces: {NAME_RULE}")
    return value


Name = Annotated[str, AfterValidator(check_name)]

# A metric is named by whatever the code reports (EXPFLOW_METRIC lines, JSON keys,
# TensorBoard tags such as 'val/loss'), so only what can never be a metric name is refused.
MAX_METRIC_LENGTH = 200
METRIC_RE = re.compile(rf"[^\s=]{{1,{MAX_METRIC_LENGTH}}}")


def check_metric(value: str) -> str:
    """``value`` if it can name a metric, else a ValueError saying what can."""
    if not METRIC_RE.fullmatch(value) or not value.isprintable():
        raise ValueError(
            f"expected a metric name: 1 to {MAX_METRIC_LENGTH} printable characters without "
            "spaces or '=', e.g. val_loss"
        )
    return value


Metric = Annotated[str, AfterValidator(check_metric)]

# The built-in PDE workload's train trainable and the metrics it returns (its HPO
# objective must be one of them); settings name it as data, never import it.
PDE_TRAIN = "expflow_flows.pde.trainables:train"
PDE_TRAIN_METRICS = (
    "val_nrmse",
    "val_rmse",
    "train_loss",
    "train_time_s",
    "best_epoch",
    "epochs",
    "n_params",
)


def check_known_objective(objective: str | None, targets: list[str | None]) -> None:
    """One line when trainables of known metrics (the PDE workload's) never report the
    objective; any other trainable's metrics cannot be known before it runs."""
    if objective is None or not targets or any(t != PDE_TRAIN for t in targets):
        return
    if objective not in PDE_TRAIN_METRICS:
        raise ExpflowError(
            f"objective {objective!r} is not a metric of {PDE_TRAIN}; it reports "
            + ", ".join(PDE_TRAIN_METRICS)
        )


_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_MEM_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_memory(value: Any) -> float:
    """``'2GB'``, ``'512 MiB'`` or a number of bytes → bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _MEM_RE.match(str(value))
    if not m:
        raise ValueError(f"memory {value!r}: expected bytes or a size such as '2GB' or '512MiB'")
    unit = (m.group(2) or "").lower()
    base = _MEM_UNITS[unit[:1]] if unit else 1
    if "i" in unit:
        base = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit[0]]
    return float(m.group(1)) * base


@contextlib.contextmanager
def _trial_folder(folder: Path) -> Iterator[None]:
    """``folder`` made for the block (OSError if it cannot be); what was made is removed
    again, so a refused run leaves nothing behind."""
    made = []
    parent = folder
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield
    finally:
        for path in made:  # the deepest first
            try:
                path.rmdir()
            except OSError:
                break


def _refusal(what: str, value: str, thing: str, exc: OSError, hint: str) -> ExpflowError:
    why = exc.strerror or type(exc).__name__
    return ExpflowError(
        f"{what} {value!r}: the {thing} cannot be created or written ({why}); {hint}"
    )


def writable_folder(value: str, what: str, hint: str) -> None:
    """One line unless folder ``value`` exists or can be made, and can be written to."""
    import tempfile

    folder = Path(value).expanduser()
    try:
        with _trial_folder(folder), tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise _refusal(what, value, "folder", exc, hint) from None


def writable_file(value: str, what: str, hint: str) -> None:
    """One line unless file ``value`` exists or can be created (in a folder that can be made)."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ExpflowError(f"{what} {value!r} is a folder, not a file; {hint}")
    existed = path.exists()
    try:
        with _trial_folder(path.parent):
            with open(path, "ab"):
                pass
            if not existed:
                path.unlink()
    except OSError as exc:
        raise _refusal(what, value, "file", exc, hint) from None


class BudgetSettings(Settings):
    """How much one run may spend; the trainable reads it (``EXPFLOW_BUDGET_*`` or its budget)."""

    epochs: int | None = Field(None, ge=1, description="Epochs per run.")
    steps: int | None = Field(None, ge=1, description="Optimiser steps per run.")
    seconds: PositiveSeconds | None = Field(None, description="Seconds of training per run.")

    def as_dict(self) -> dict[str, float]:
        """The set fields, as the trainable contract takes them."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class MetricSourceSettings(Settings):
    """Where a run's metrics come from when the code does not print ``EXPFLOW_METRIC`` lines
    or write ``$EXPFLOW_METRICS_FILE``: its own output, its result files, its TensorBoard
    scalars, or a reader function. Values with a step feed the pruner while it runs."""

    patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions on the output; named groups are metrics, a group "
        "named 'step' marks a per-step value, e.g. 'Epoch (?P<step>\\d+).*val=(?P<val_loss>\\S+)'.",
    )
    files: list[str] = Field(
        default_factory=list,
        description="Result files by glob in the run folder: JSON or YAML (a mapping, or a "
        "list of per-step mappings) or CSV (every row a step, the last row final).",
    )
    tensorboard: list[str] = Field(
        default_factory=list,
        description="TensorBoard scalar tags read from event files in the run folder "
        "(needs the 'tensorboard' extra).",
    )
    reader: str | None = Field(
        None,
        description="A function 'package.module:function' called with the run folder that "
        "returns a mapping of metric names to numbers, for anything else.",
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {pattern!r} is not a regular expression ({exc})"
                ) from None
        return patterns

    @field_validator("files")
    @classmethod
    def _no_pickles(cls, globs: list[str]) -> list[str]:
        for glob in globs:
            if glob.lower().endswith(PICKLED):
                raise ValueError(
                    f"{glob!r}: expflow does not unpickle files a run wrote (that runs code); "
                    "read it in a reader function instead"
                )
        return globs


PICKLED = (".pt", ".pth", ".pkl", ".pickle", ".npy", ".npz", ".joblib", ".ckpt")
Words = Annotated[list[str], BeforeValidator(lambda v: shlex.split(v) if isinstance(v, str) else v)]


class TrainableSettings(Settings):
    """What to run, and how: a callable, a script, or any command in its own environment."""

    shorthand = "target"
    identity = ("target", "command")
    target: str | None = Field(
        None,
        min_length=1,
        description="A callable 'package.module:function' or a script path ('train.py'); "
        "or give command.",
    )
    command: Words | None = Field(
        None,
        min_length=1,
        description="A command instead of a target, as a list or a string, e.g. "
        "'apptainer exec pde.sif python train.py {args}'. Placeholders: {args} (the "
        "parameters; appended when absent), {run_dir}, {upstream}.",
    )
    interpreter: Words | None = Field(
        None,
        min_length=1,
        description="What a script target runs under instead of expflow's Python: a venv's "
        "python, 'conda run -n pde python', 'torchrun --nproc_per_node 2', 'srun python'.",
    )
    args: list[str] = Field(
        default_factory=list,
        description="Fixed arguments before the parameters, e.g. Hydra's '+args=config_Adv.yaml'.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of the run."
    )
    cwd: str = Field(
        "run",
        min_length=1,
        description="Working directory of a script or command: 'run' (its run folder, so "
        "parallel runs never collide), 'launch' (where expflow was started), or a path.",
    )
    budget_params: dict[str, str] = Field(
        default_factory=dict,
        description="Budget keys passed as the code's own parameters, e.g. "
        "{epochs: epochs} or {epochs: args.epochs}; the budget is also in EXPFLOW_BUDGET_*.",
    )
    metrics: MetricSourceSettings = Field(
        default_factory=MetricSourceSettings,
        description="Where metrics come from besides EXPFLOW_METRIC lines and "
        "$EXPFLOW_METRICS_FILE.",
    )
    from_upstream: list[str] = Field(
        default_factory=list,
        description="Files of the upstream run (the trained model for evaluate, the step "
        "before in a chain), by glob, put into this run's folder before it starts, e.g. "
        "'*.pt' or 'checkpoints/**'; 'outputs/*/model.ckpt -> .' puts them by name into "
        "that folder of the run.",
    )
    upstream_mode: Literal["link", "copy"] = Field(
        "link", description="Put upstream files in as symbolic links, or copy them."
    )
    arg_style: ArgStyle = Field(
        "argparse",
        description="How a script gets its parameters: '--name value' (argparse), "
        "'--name=value' (equals) or '++name=value' (hydra).",
    )
    budget: BudgetSettings | None = Field(
        None, description="Budget of each run (epochs, steps or seconds)."
    )
    timeout: PositiveSeconds | None = Field(
        None, description="Seconds after which a run is stopped and recorded failed."
    )

    @model_validator(mode="after")
    def _what_to_run(self) -> TrainableSettings:
        if (self.target is None) == (self.command is None):
            raise ValueError(
                "give exactly one of target ('package.module:function' or a script) or command"
            )
        if (
            self.target is not None
            and not self.target.endswith(".py")
            and _is_callable(self.target)
        ):
            inapplicable = [
                name
                for name in ("interpreter", "args", "env", "from_upstream")
                if getattr(self, name)
            ]
            if inapplicable:
                raise ValueError(
                    f"{inapplicable[0]} applies to scripts and commands, not to the callable "
                    f"{self.target!r}"
                )
        if self.interpreter is not None and self.command is not None:
            raise ValueError("interpreter applies to a script target; put it in the command")
        return self

    @property
    def label(self) -> str:
        """What runs, in one line."""
        return self.target or shlex.join(self.command or [])

    def check(self) -> None:
        """Fail early, with one line, when the target or the command's program is missing."""
        from expflow_flows.runs.launch import Launch
        from expflow_flows.runs.trainable import Trainable

        if self.target is not None:
            trainable = Trainable.parse(self.target)
            trainable.check()
            script = Path(trainable.spec).expanduser()
            # A script other than Python runs as a program unless an interpreter is named.
            if (
                trainable.kind == "script"
                and script.suffix != ".py"
                and self.interpreter is None
                and not os.access(script, os.X_OK)
            ):
                raise ExpflowError(
                    f"trainable script {self.target!r} is not executable; make it so "
                    f"(chmod +x {shlex.quote(self.target)}) or name its interpreter, "
                    "e.g. interpreter: bash"
                )
        Launch.from_value(self.launch()).check_command()

    def launch(self) -> dict[str, Any]:
        """How to run it, as plain data for :mod:`expflow_flows.runs.launch`."""
        return self.model_dump(mode="json", include=LAUNCH_FIELDS)


LAUNCH_FIELDS = {
    "command",
    "interpreter",
    "args",
    "env",
    "cwd",
    "budget_params",
    "metrics",
    "from_upstream",
    "upstream_mode",
}


def _is_callable(target: str) -> bool:
    return re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", target) is not None


class SlurmSettings(Settings):
    """Dask workers in Slurm jobs (dask-jobqueue's ``SLURMCluster``), one worker per job."""

    cores: int = Field(1, ge=1, description="CPU cores per job.")
    memory: str = Field("2GB", description="Memory per job, e.g. '4GB'.")
    processes: int = Field(1, ge=1, description="Dask worker processes per job.")
    walltime: str = Field("01:00:00", description="Time limit per job (HH:MM:SS).")
    partition: str | None = Field(None, description="Slurm partition (queue).")
    account: str | None = Field(None, description="Slurm account to charge.")
    job_extra_directives: list[str] = Field(
        default_factory=list, description="Extra '#SBATCH' directives, e.g. '--gres=gpu:1'."
    )
    job_script_prologue: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the worker starts (module loads, venv activation).",
    )
    worker_extra_args: list[str] = Field(
        default_factory=list, description="Extra arguments of the Dask worker command."
    )
    log_directory: str | None = Field(None, description="Folder for the jobs' log files.")
    local_directory: str | None = Field(None, description="Workers' scratch folder.")
    interface: str | None = Field(None, description="Network interface the workers listen on.")

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        parse_memory(value)
        return value


# Seconds a preflight waits for a Dask scheduler to answer (Dask itself waits 30 s).
CONNECT_TIMEOUT_S = 5.0
NETWORK_SCHEMES = ("tcp", "tls", "ws", "wss")
DASK_SCHEMES = (*NETWORK_SCHEMES, "ucx")
ADDRESS_FORMS = (
    "tcp://host:port (or tls://, ucx://, ws://, wss://), inproc://..., "
    "or a scheduler file path ending in .json"
)
_HOST_PORT_RE = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


def _is_scheduler_file(value: str) -> bool:
    return "://" not in value and value.lower().endswith(".json")


def _split_address(value: str) -> tuple[str, str, int]:
    """``tcp://host:port`` (or ``host:port``, which Dask reads as tcp) → scheme, host, port."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "tcp", value
    match = _HOST_PORT_RE.fullmatch(rest.rstrip("/"))
    if match is None:
        return scheme, "", 0
    return scheme, match["host"], int(match["port"])


def _address_error(value: str) -> str | None:
    if value.startswith("inproc://"):
        return None if len(value) > len("inproc://") and value.isprintable() else "no id"
    if _is_scheduler_file(value):
        return None if value.isprintable() else "not a path"
    scheme, host, port = _split_address(value)
    if scheme not in DASK_SCHEMES:
        return f"unknown scheme {scheme!r}"
    if not host or not 1 <= port <= 65535:
        return "expected host:port with a port from 1 to 65535"
    return None


def check_dask_address(value: str) -> str:
    """``value`` if it has the form of a Dask scheduler address, else a ValueError."""
    error = _address_error(value)
    if error is not None:
        raise ValueError(f"not a Dask scheduler address ({error}); expected {ADDRESS_FORMS}")
    return value


DaskAddress = Annotated[str, AfterValidator(check_dask_address)]


def _device_ids(value: Any) -> Any:
    """``'auto'``, or device ids from ``[0, 1]``, ``['0', '1']`` or ``'0,1'`` (as strings)."""
    from expflow_flows.runs.devices import parse_gpus

    if value is None:
        return None
    gpus = parse_gpus(value)
    return gpus if isinstance(gpus, str) else list(gpus)


def _devices_per_run(value: Any) -> Any:
    from expflow_flows.runs.devices import parse_per_run

    return parse_per_run(value)


DeviceIds = Annotated[Literal["auto"] | list[str] | None, BeforeValidator(_device_ids)]


class ClusterSettings(Settings):
    """Where runs execute in parallel: one factory serves the pipeline and the sweep."""

    kind: Literal["local", "threads", "slurm"] = Field(
        "local",
        description="local: Dask, on a new LocalCluster of worker processes or on the "
        "scheduler at 'address'; threads: threads in this process; slurm: Dask workers "
        "in Slurm jobs.",
    )
    workers: int = Field(2, ge=1, description="Runs at once (Dask workers, threads or Slurm jobs).")
    address: DaskAddress | None = Field(
        None,
        description="An existing Dask scheduler to use instead of a new cluster: "
        "tcp://host:port (or tls://, ucx://, ws://, wss://), inproc://…, or the path of its "
        "scheduler file (.json).",
    )
    slurm: SlurmSettings | None = Field(None, description="Slurm job settings (kind 'slurm').")
    gpus: DeviceIds = Field(
        None,
        description="GPUs the runs use: 'auto' (discovered from CUDA_VISIBLE_DEVICES, "
        "NVIDIA_VISIBLE_DEVICES, the Slurm job's allocation or nvidia-smi) or a list of "
        "device ids such as [0, 1, 2, 3]; each concurrent run gets its own "
        "(CUDA_VISIBLE_DEVICES, EXPFLOW_GPUS).",
    )
    gpus_per_run: Annotated[float, AfterValidator(_devices_per_run)] = Field(
        1,
        gt=0,
        description="GPUs each run takes: a whole number, or a fraction 1/k (0.5, 0.25) so "
        "that k runs share one device.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSettings:
        if self.address and self.kind != "local":
            raise ValueError(f"an address is given but kind is {self.kind!r}; use kind 'local'")
        if self.slurm is not None and self.kind != "slurm":
            raise ValueError(f"slurm settings are given but kind is {self.kind!r}; use 'slurm'")
        return self

    def scheduler_address(self) -> str | None:
        """The scheduler's address: the one given, or the one its scheduler file holds."""
        if self.address is None or not _is_scheduler_file(self.address):
            return self.address
        import json

        path = Path(self.address).expanduser()
        try:
            address = json.loads(path.read_text(encoding="utf-8")).get("address")
        except FileNotFoundError:
            raise ExpflowError(
                f"cluster.address {self.address!r}: the scheduler file does not exist; "
                "start the scheduler (dask scheduler --scheduler-file FILE) or give tcp://host:port"
            ) from None
        except (OSError, ValueError, AttributeError) as exc:
            raise ExpflowError(
                f"cluster.address {self.address!r}: not a Dask scheduler file ({exc})"
            ) from None
        if not isinstance(address, str) or _address_error(address):
            raise ExpflowError(
                f"cluster.address {self.address!r}: the scheduler file holds no address "
                f"({address!r}); expected one such as tcp://host:port"
            )
        return address

    def device_request(self, gpu_resource: float | None = None) -> dict[str, Any] | None:
        """The runs' GPUs as :class:`~expflow_flows.runs.devices.DeviceRequest` plain data,
        or None when none are asked for. ``gpu_resource`` is a sweep's ``resources.gpu``
        (GPUs per combination): without ``gpus`` it means ``gpus: auto``."""
        from expflow_flows.runs.devices import parse_per_run

        if self.gpus is None and not gpu_resource:
            return None
        per_run = self.gpus_per_run
        if gpu_resource:
            try:
                wanted = parse_per_run(gpu_resource)
            except ValueError as exc:
                raise ExpflowError(f"resources.gpu={gpu_resource:g}: {exc}") from None
            # The default of 1 cannot be told from a 1 that was given: resources.gpu wins.
            if per_run != 1 and per_run != wanted:
                raise ExpflowError(
                    f"resources.gpu={wanted:g} but cluster.gpus_per_run={per_run:g}; both are "
                    "GPUs per run: give one of them"
                )
            per_run = wanted
        return {"gpus": "auto" if self.gpus is None else self.gpus, "per_run": per_run}

    def runs_here(self) -> bool:
        """Whether the runs execute on this machine (threads, or a new local cluster)."""
        return self.kind == "threads" or (self.kind == "local" and not self.address)

    def check(self) -> None:
        """GPUs asked for must exist here, for as many runs as there are workers; a scheduler
        given by address must answer within a few seconds (one line if not)."""
        self._check_gpus()
        address = self.scheduler_address()
        if address is None:
            return
        scheme, host, port = _split_address(address)
        if scheme not in NETWORK_SCHEMES:
            return  # inproc:// lives in this process; ucx:// needs its own stack to probe
        import socket

        try:
            socket.create_connection((host.strip("[]"), port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            if isinstance(exc, TimeoutError):
                why = f"no answer within {CONNECT_TIMEOUT_S:g} s"
            given = "" if address == self.address else f" (from {self.address})"
            raise ExpflowError(
                f"cluster.address {address}{given}: no Dask scheduler answers there ({why}); "
                "start one (dask scheduler) or leave cluster.address unset for a new cluster"
            ) from None

    def _check_gpus(self) -> None:
        """On this machine: GPUs 'auto' must find some, and every worker must get a slot."""
        import math

        from expflow_flows.runs.devices import DeviceRequest

        request = DeviceRequest.from_value(self.device_request())
        if request is None or not self.runs_here():
            return
        try:
            devices = request.devices()
        except ExpflowError as exc:
            raise ExpflowError(f"cluster.{exc}") from None
        ids = ",".join(devices)
        if request.devices_per_run > len(devices):
            raise ExpflowError(
                f"cluster.gpus_per_run={self.gpus_per_run:g} needs {request.devices_per_run} devices "
                f"per run but gpus {ids} has {len(devices)}"
            )
        at_once = request.runs_at_once(len(devices))
        if self.workers > at_once:
            shares = math.ceil(self.workers / len(devices))
            hint = "1" if shares == 1 else f"{1 / shares:g}"
            raise ExpflowError(
                f"cluster.workers={self.workers} but gpus {ids} with gpus_per_run "
                f"{self.gpus_per_run:g} give {at_once} runs at once; lower workers or set "
                f"gpus_per_run: {hint}"
            )


class OffpeakSettings(Settings):
    """Move a run triggered in peak hours to the next off-peak window."""

    windows: list[str] = Field(
        default_factory=lambda: ["22:00-08:00"],
        min_length=1,
        description="Off-peak windows 'HH:MM-HH:MM' in the timezone; may cross midnight.",
    )
    timezone: str = Field("UTC", description="IANA timezone of the windows, e.g. Europe/Berlin.")
    weekends: bool = Field(True, description="Saturdays and Sundays are off-peak all day.")
    max_wait_hours: float | None = Field(
        24, ge=0, description="Longest wait for a window, in hours (null: no limit)."
    )
    on_timeout: Literal["run", "fail"] = Field(
        "run", description="Past the longest wait: run anyway, or fail."
    )
    max_load: float | None = Field(
        None, gt=0, description="Busy-CPU fraction above which off-peak is not free."
    )

    @model_validator(mode="after")
    def _check(self) -> OffpeakSettings:
        from expflow_flows.governance.offpeak import OffPeakPolicy

        try:
            OffPeakPolicy.from_dict(self.model_dump())
        except ExpflowError as exc:
            raise ValueError(str(exc)) from None
        return self


class ClearMLTrackingSettings(Settings):
    """Mirror the run to ClearML (a task per run)."""

    project: str | None = Field(None, description="ClearML project (default: expflow/<name>).")
    tags: list[str] | None = Field(None, description="Tags on the run's task.")
    offline: bool | None = Field(None, description="Record offline into the run folder.")
    steps: Literal["none", "all"] = Field(
        "none", description="'all' adds a child task per trial and stage."
    )
    combinations: Literal["aggregate", "all", "sample"] = Field(
        "aggregate", description="Sweeps: one table, a task per combination, or a sample."
    )
    sample: int = Field(20, ge=1, description="Combinations mirrored when combinations=sample.")
    task_type: str = Field("training", description="ClearML task type.")


class LangfuseTrackingSettings(Settings):
    """Mirror the run to Langfuse (a trace per run; keys from LANGFUSE_* variables)."""

    public_key: str | None = Field(None, description="Public key (default: LANGFUSE_PUBLIC_KEY).")
    secret_key: str | None = Field(None, description="Secret key (default: LANGFUSE_SECRET_KEY).")
    base_url: str | None = Field(None, description="Server URL (default: LANGFUSE_BASE_URL).")
    enabled: bool = Field(True, description="Send traces.")
    flush_timeout: PositiveSeconds = Field(10.0, description="Seconds to wait for the last send.")
    timeout: int | None = Field(None, ge=1, description="HTTP timeout in seconds.")
    environment: str | None = Field(None, description="Langfuse environment name.")
    tags: list[str] | None = Field(None, description="Tags on the trace.")


class TrackingSettings(Settings):
    """Tracking tools the run is mirrored to; a tool is on when its section is given."""

    clearml: ClearMLTrackingSettings | None = Field(None, description="ClearML settings.")
    langfuse: LangfuseTrackingSettings | None = Field(None, description="Langfuse settings.")

    def enabled(self) -> dict[str, dict[str, Any]]:
        """``{tool: its settings}`` for the tools asked for (what the tracking fan-out takes)."""
        out: dict[str, dict[str, Any]] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.model_dump(exclude_unset=True)
        return out


def gate_list(value: Any) -> list[str]:
    """Gates as a list: a comma-separated string is split."""
    if isinstance(value, str):
        return [g.strip() for g in value.split(",") if g.strip()]
    return value


def check_gates(gates: list[str]) -> list[str]:
    """Each gate must parse (``metric:op:value``)."""
    from expflow_flows.metrics.gates import parse_gates

    try:
        parse_gates(gates)
    except ExpflowError as exc:
        raise ValueError(str(exc)) from None
    return gates
