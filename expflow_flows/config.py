"""Pipeline configuration: a typed dataclass read from YAML, overridden by explicit values.

Precedence, highest first: explicit values (flow parameters, CLI options), the
YAML config file, the built-in defaults (the PDE advection workload).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError
from expflow_flows.yamlfile import read_mapping

PDE_SPACE = Path(__file__).parent / "pde" / "space.yaml"
DIRECTIONS = ("minimize", "maximize")
RUNNERS = ("dask", "threads", "slurm")
PRUNERS = ("median", "none")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything an HPO → train → eval → submit run needs."""

    experiment: str = "pde-advection"
    train: str = "expflow_flows.pde.trainables:train"
    evaluate: str = "expflow_flows.pde.trainables:evaluate"
    space: str | dict[str, Any] = str(PDE_SPACE)
    params: dict[str, Any] = field(default_factory=lambda: {"problem": "advection"})
    n_trials: int = 12
    parallelism: int = 2
    runner: str = "dask"
    dask_address: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    hpo_budget: dict[str, Any] = field(default_factory=lambda: {"epochs": 15})
    final_budget: dict[str, Any] = field(default_factory=lambda: {"epochs": 40})
    objective: str = "val_nrmse"
    direction: str = "minimize"
    pruner: str = "median"
    seed: int | None = 0
    storage: str | None = None
    study_name: str | None = None
    trial_timeout: float | None = None
    arg_style: str = "argparse"
    gates: list[str] = field(default_factory=lambda: ["nrmse:lt:0.05"])
    submit: bool = True
    submit_to: str | None = None
    submission_name: str | None = None
    predictions: str = "pred.hdf5"
    # Mirror the run to tracking tools, e.g. {clearml: {project: pde}, langfuse: {}}
    # (expflow_flows.integrations.tracking); empty: none.
    tracking: dict[str, Any] = field(default_factory=dict)

    @property
    def resolved_study_name(self) -> str:
        """The Optuna study name: explicit, else the experiment name."""
        return self.study_name or self.experiment

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for artifacts, metadata and YAML)."""
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(PipelineConfig))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML pipeline config; unknown keys and bad YAML are one-line errors."""
    p = Path(path).expanduser()
    data = read_mapping(p, "pipeline config", mapping="a mapping of settings", allow_empty=True)
    # Relative file names in a config (space file, script trainables) are relative
    # to the config file, so a config works from any working directory.
    for key in ("space", "train", "evaluate"):
        value = data.get(key)
        if isinstance(value, str) and ("/" in value or value.endswith((".py", ".yaml", ".yml"))):
            if ":" in value and not value.endswith(".py"):
                continue
            if not Path(value).expanduser().is_absolute():
                candidate = (p.parent / value).resolve()
                if candidate.exists():
                    data[key] = str(candidate)
    return data


def build_config(config_file: str | Path | None = None, **overrides: Any) -> PipelineConfig:
    """Defaults < config file < overrides (``None`` overrides are ignored), validated."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ExpflowError(
            f"pipeline setting {unknown[0]!r} is not known; accepted: {', '.join(FIELDS)}"
        )
    if isinstance(values.get("gates"), str):
        values["gates"] = [g.strip() for g in values["gates"].split(",") if g.strip()]
    cfg = PipelineConfig(**values)
    _validate(cfg)
    return cfg


def _validate(cfg: PipelineConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ExpflowError(msg)

    need(
        isinstance(cfg.n_trials, int) and cfg.n_trials >= 1,
        f"n_trials={cfg.n_trials!r}: expected a whole number >= 1",
    )
    need(
        isinstance(cfg.parallelism, int) and cfg.parallelism >= 1,
        f"parallelism={cfg.parallelism!r}: expected a whole number >= 1",
    )
    need(
        cfg.direction in DIRECTIONS,
        f"direction={cfg.direction!r}: expected one of {', '.join(DIRECTIONS)}",
    )
    need(cfg.runner in RUNNERS, f"runner={cfg.runner!r}: expected one of {', '.join(RUNNERS)}")
    need(isinstance(cfg.slurm, dict), f"slurm={cfg.slurm!r}: expected a mapping of settings")
    need(
        not cfg.slurm or cfg.runner == "slurm", "slurm settings are given but runner is not 'slurm'"
    )
    need(cfg.pruner in PRUNERS, f"pruner={cfg.pruner!r}: expected one of {', '.join(PRUNERS)}")
    need(bool(cfg.objective), "objective is empty: expected the name of a metric to optimise")
    need(
        bool(cfg.experiment) and "/" not in cfg.experiment and ".." not in cfg.experiment,
        f"experiment={cfg.experiment!r}: expected a name without '/' or '..'",
    )
    need(
        isinstance(cfg.params, dict),
        f"params={cfg.params!r}: expected a mapping of fixed parameters",
    )
    from expflow_flows.runs.trainable import ARG_STYLES, Budget

    Budget.from_value(cfg.hpo_budget)
    Budget.from_value(cfg.final_budget)
    need(
        cfg.arg_style in ARG_STYLES,
        f"arg_style={cfg.arg_style!r}: expected one of {', '.join(ARG_STYLES)}",
    )
    need(
        cfg.trial_timeout is None or cfg.trial_timeout > 0,
        f"trial_timeout={cfg.trial_timeout!r}: expected a positive number of seconds",
    )
