"""Sweep configuration: typed dataclasses read from YAML, overridden by explicit values."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.settings.base import relative_to
from expflow_flows.yamlfile import read_mapping

RESOURCE_KEYS = ("cpu", "memory", "gpu")
CLUSTERS = ("local", "slurm")
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_MEM_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class StepConfig:
    """One step of a chain: a trainable that reads its upstream step's run folder."""

    name: str
    trainable: str
    version: str = ""
    budget: dict[str, Any] | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep needs."""

    name: str = "sweep"
    trainable: str | None = None
    steps: list[dict[str, Any]] | None = None
    space: str | dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    timeout: float | None = None
    version: str = ""
    inputs: list[str] = field(default_factory=list)
    force: bool | list[str] = False
    workers: int = 2
    dask_address: str | None = None
    cluster: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)
    chunk_size: int | None = None
    retries: int = 2
    resources: dict[str, Any] = field(default_factory=dict)
    max_failure_ratio: float | None = None
    arg_style: str = "argparse"
    objective: str | None = None
    maximize: bool = False
    status_every_s: float = 5.0
    # Mirror the sweep to tracking tools (expflow_flows.integrations.tracking), e.g. {clearml: {}}.
    tracking: dict[str, Any] = field(default_factory=dict)

    def step_configs(self) -> list[StepConfig]:
        """The chain to run per combination (one step named ``run`` for a single trainable)."""
        if self.steps:
            return [StepConfig(**s) for s in self.steps]
        assert self.trainable is not None
        return [
            StepConfig(
                name="run", trainable=self.trainable, budget=self.budget, timeout=self.timeout
            )
        ]

    def forced(self, step: str) -> bool:
        """Whether ``step`` must run again even when its cached result exists."""
        return self.force is True or (isinstance(self.force, list) and step in self.force)

    def dask_resources(self) -> dict[str, float]:
        """Per-combination Dask worker resources (CPU, MEMORY in bytes, GPU)."""
        out: dict[str, float] = {}
        if "cpu" in self.resources:
            out["CPU"] = float(self.resources["cpu"])
        if "memory" in self.resources:
            out["MEMORY"] = parse_memory(self.resources["memory"])
        if "gpu" in self.resources:
            out["GPU"] = float(self.resources["gpu"])
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for metadata and packages)."""
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(SweepConfig))
STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepConfig))


def _first(items: list[Any]) -> Any:
    return items[0] if items else None


def parse_memory(value: Any) -> float:
    """``'2GB'``, ``'512 MiB'`` or a number of bytes → bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _MEM_RE.match(str(value))
    if not m:
        raise ExpflowError(f"memory {value!r}: expected bytes or a size such as '2GB' or '512MiB'")
    unit = (m.group(2) or "").lower()
    base = _MEM_UNITS[unit[:1]] if unit else 1
    if "i" in unit:
        base = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit[0]]
    return float(m.group(1)) * base


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML; paths inside are relative to the file."""
    p = Path(path).expanduser()
    data = read_mapping(p, "sweep config", mapping="a mapping of settings", allow_empty=True)
    base = p.parent
    for key in ("trainable", "space"):
        data[key] = relative_to(base, data.get(key))
    if isinstance(data.get("inputs"), list):
        data["inputs"] = [relative_to(base, v) for v in data["inputs"]]
    if isinstance(data.get("steps"), list):
        data["steps"] = [
            {**s, "trainable": relative_to(base, s.get("trainable"))} if isinstance(s, dict) else s
            for s in data["steps"]
        ]
    return {k: v for k, v in data.items() if v is not None}


def build_sweep_config(config_file: str | Path | None = None, **overrides: Any) -> SweepConfig:
    """Defaults < YAML file < overrides (``None`` ignored), validated."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(read_sweep_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ExpflowError(
            f"sweep setting {unknown[0]!r} is not known; accepted: {', '.join(FIELDS)}"
        )
    cfg = SweepConfig(**values)
    _validate(cfg)
    return cfg


def _validate(cfg: SweepConfig) -> None:
    from expflow_flows.runs.trainable import ARG_STYLES, Budget

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ExpflowError(msg)

    need(
        bool(cfg.name) and "/" not in cfg.name and ".." not in cfg.name,
        f"name={cfg.name!r}: expected a sweep name without '/' or '..'",
    )
    need(
        (cfg.trainable is None) != (not cfg.steps),
        "give exactly one of trainable (one step) or steps (a chain)",
    )
    need(cfg.space is not None, "space is missing: expected a sweep space YAML file or mapping")
    if cfg.steps:
        names = []
        for i, step in enumerate(cfg.steps):
            need(isinstance(step, dict), f"steps[{i}] must be a mapping with name and trainable")
            unknown = sorted(set(step) - set(STEP_FIELDS))
            need(
                not unknown,
                f"steps[{i}] key {_first(unknown)!r} is not known; accepted: {', '.join(STEP_FIELDS)}",
            )
            need(
                bool(step.get("name")) and bool(step.get("trainable")),
                f"steps[{i}] needs a name and a trainable",
            )
            names.append(step["name"])
            Budget.from_value(step.get("budget"))
        need(len(set(names)) == len(names), f"step names must be unique: {names}")
    Budget.from_value(cfg.budget)
    steps = [s.name for s in cfg.step_configs()]
    if isinstance(cfg.force, list):
        bad = [s for s in cfg.force if s not in steps]
        need(not bad, f"force names step {_first(bad)!r}, not one of {', '.join(steps)}")
    else:
        need(
            isinstance(cfg.force, bool),
            f"force={cfg.force!r}: expected true, false or a list of step names",
        )
    need(
        isinstance(cfg.workers, int) and cfg.workers >= 1,
        f"workers={cfg.workers!r}: expected a whole number >= 1",
    )
    need(
        cfg.chunk_size is None or (isinstance(cfg.chunk_size, int) and cfg.chunk_size >= 1),
        f"chunk_size={cfg.chunk_size!r}: expected a whole number >= 1",
    )
    need(
        isinstance(cfg.retries, int) and cfg.retries >= 0,
        f"retries={cfg.retries!r}: expected a whole number >= 0",
    )
    unknown = sorted(set(cfg.resources) - set(RESOURCE_KEYS))
    need(
        not unknown,
        f"resources key {_first(unknown)!r} is not known; accepted: {', '.join(RESOURCE_KEYS)}",
    )
    cfg.dask_resources()
    need(
        cfg.cluster in CLUSTERS,
        f"cluster={cfg.cluster!r}: expected one of {', '.join(CLUSTERS)}",
    )
    need(isinstance(cfg.slurm, dict), f"slurm={cfg.slurm!r}: expected a mapping of settings")
    need(
        not cfg.slurm or cfg.cluster == "slurm",
        "slurm settings are given but cluster is not 'slurm'",
    )
    need(
        not (cfg.cluster == "slurm" and cfg.dask_address),
        "give cluster 'slurm' or dask_address, not both",
    )
    if cfg.cluster == "slurm":
        import importlib.util

        from expflow_flows.settings.base import validate
        from expflow_flows.settings.common import SlurmSettings

        validate(SlurmSettings, cfg.slurm, "slurm")
        if importlib.util.find_spec("dask_jobqueue") is None:
            raise ExpflowError(
                "cluster 'slurm' needs dask-jobqueue: pip install 'expflow-flows[slurm]'"
            )
    need(
        cfg.max_failure_ratio is None or 0 <= cfg.max_failure_ratio <= 1,
        f"max_failure_ratio={cfg.max_failure_ratio!r}: expected a number from 0 to 1",
    )
    need(
        cfg.timeout is None or (cfg.timeout > 0 and math.isfinite(cfg.timeout)),
        f"timeout={cfg.timeout!r}: expected a positive number of seconds",
    )
    need(
        cfg.arg_style in ARG_STYLES,
        f"arg_style={cfg.arg_style!r}: expected one of {', '.join(ARG_STYLES)}",
    )
    need(
        cfg.status_every_s > 0, f"status_every_s={cfg.status_every_s!r}: expected a positive number"
    )
