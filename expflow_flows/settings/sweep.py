"""Settings of a parameter sweep, written once (same vocabulary as the pipeline's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from expflow_flows.settings.base import (
    Settings,
    read_settings_file,
    relative_to,
    relative_trainable,
    resolve,
)
from expflow_flows.settings.common import (
    ClusterSettings,
    Direction,
    Metric,
    Name,
    OffpeakSettings,
    TrackingSettings,
    TrainableSettings,
    check_known_objective,
    parse_memory,
)

RENAMED = {
    "workers": "cluster.workers",
    "dask_address": "cluster.address",
    "slurm": "cluster.slurm",
    "maximize": "direction (minimize or maximize)",
    "budget": "trainable.budget (or each step's budget)",
    "timeout": "trainable.timeout (or each step's timeout)",
    "arg_style": "trainable.arg_style (or each step's arg_style)",
}


class StepSettings(TrainableSettings):
    """One step of a chain: a trainable that reads its upstream step's run folder."""

    shorthand = None
    name: Name = Field(..., description="Step name (unique in the chain).")
    version: str = Field(
        "", description="Bump to re-run this step (and the steps after it) on cached results."
    )


class ResourceSettings(Settings):
    """What one combination needs of a Dask worker; Dask places it on a worker that has it."""

    cpu: float | None = Field(None, gt=0, description="CPU cores per combination.")
    memory: str | float | None = Field(
        None, description="Memory per combination, e.g. '2GB', or bytes."
    )
    gpu: float | None = Field(None, ge=0, description="GPUs per combination (fractions allowed).")

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            parse_memory(value)
        return value

    def dask(self) -> dict[str, float]:
        """As Dask worker resources (CPU, MEMORY in bytes, GPU)."""
        out: dict[str, float] = {}
        if self.cpu is not None:
            out["CPU"] = float(self.cpu)
        if self.memory is not None:
            out["MEMORY"] = parse_memory(self.memory)
        if self.gpu is not None:
            out["GPU"] = float(self.gpu)
        return out


class SweepSettings(Settings):
    """Everything a sweep needs: a trainable (or a chain of steps) over a space."""

    replaced = frozenset({"space"})
    renamed = RENAMED

    name: Name = Field("sweep", description="Sweep name: its folder under the runs root.")
    trainable: TrainableSettings | None = Field(
        None, description="The trainable run for every combination (or give steps)."
    )
    steps: list[StepSettings] | None = Field(
        None, description="A chain of steps run for every combination (or give trainable)."
    )
    space: str | dict[str, Any] | None = Field(
        None, description="Sweep space: a YAML file or a mapping (grid, zip, sample, ...)."
    )
    inputs: list[str] = Field(
        default_factory=list,
        description="Input files whose checksums are part of every result's identity.",
    )
    version: str = Field("", description="Bump to re-run everything on cached results.")
    force: bool | list[str] = Field(
        False, description="Re-run cached results: true for all steps, or a list of step names."
    )
    objective: Metric | None = Field(
        None, description="Metric that ranks combinations (default: the first reported)."
    )
    direction: Direction = Field("minimize", description="minimize or maximize the objective.")
    cluster: ClusterSettings = Field(
        default_factory=ClusterSettings, description="Where combinations run in parallel."
    )
    chunk_size: int | None = Field(
        None, ge=1, description="Combinations per Prefect task (default: sized automatically)."
    )
    retries: int = Field(
        2,
        ge=0,
        le=100,
        description="Retries of a combination whose worker was lost or whose process was "
        "killed; it resumes from its checkpoint folder.",
    )
    resources: ResourceSettings = Field(
        default_factory=ResourceSettings, description="What one combination needs."
    )
    max_failure_ratio: float | None = Field(
        None, ge=0, le=1, description="Fail the sweep when more combinations than this fail."
    )
    status_every_s: float = Field(
        5.0, gt=0, description="Seconds between rewrites of the live status page."
    )
    offpeak: OffpeakSettings | None = Field(
        None, description="Move a run triggered in peak hours to an off-peak window."
    )
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings, description="Tracking tools the sweep is mirrored to."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SweepSettings:
        if (self.trainable is None) == (not self.steps):
            raise ValueError("give exactly one of trainable (one step) or steps (a chain)")
        if self.space is None:
            raise ValueError("space is missing: expected a sweep space YAML file or mapping")
        names = [s.name for s in self.chain()]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique: {names}")
        if isinstance(self.force, list):
            bad = [s for s in self.force if s not in names]
            if bad:
                raise ValueError(f"force names step {bad[0]!r}, not one of {', '.join(names)}")
        return self

    def check(self) -> None:
        """What validation cannot see, one line each, before anything starts: every step's
        trainable exists and runs, the objective is one the built-in workload reports, the
        Dask scheduler answers."""
        for step in self.chain():
            step.check()
        check_known_objective(self.objective, [s.target for s in self.chain()])
        self.cluster.check()

    def chain(self) -> list[StepSettings]:
        """The steps run per combination (one step named ``run`` for a single trainable)."""
        if self.steps:
            return list(self.steps)
        assert self.trainable is not None
        return [StepSettings(name="run", **self.trainable.model_dump())]

    def forced(self, step: str) -> bool:
        """Whether ``step`` must run again even when its cached result exists."""
        return self.force is True or (isinstance(self.force, list) and step in self.force)

    @property
    def maximize(self) -> bool:
        """Whether a larger objective is better."""
        return self.direction == "maximize"

    @property
    def label(self) -> str:
        """What runs: the trainable, or the chain's trainables."""
        return " -> ".join(s.label for s in self.chain())


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """A sweep YAML as a mapping; relative file names become relative to the file."""
    data, base = read_settings_file(path, "sweep")
    trainable = data.get("trainable")
    if isinstance(trainable, str):
        data["trainable"] = trainable = {"target": trainable}
    if isinstance(trainable, dict):
        relative_trainable(base, trainable)
    if isinstance(data.get("space"), str):
        data["space"] = relative_to(base, data["space"])
    if isinstance(data.get("inputs"), list):
        data["inputs"] = [relative_to(base, v) for v in data["inputs"]]
    if isinstance(data.get("steps"), list):
        for step in data["steps"]:
            if isinstance(step, dict):
                relative_trainable(base, step)
    return {k: v for k, v in data.items() if v is not None}


def load_sweep_settings(config: str | Path | None = None, overrides: Any = None) -> SweepSettings:
    """Defaults < YAML file < overrides (a mapping or settings object), validated."""
    file_data = read_sweep_file(config) if config else {}
    return resolve(SweepSettings, "sweep", file_data, overrides, RENAMED)
