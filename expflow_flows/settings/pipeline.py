"""Settings of the HPO → train → eval → submit pipeline, written once.

Precedence, highest first: overrides (flow parameter ``settings``, ``--set``, CLI
options, Python), the YAML config file, the built-in defaults (the PDE advection
workload).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from expflow_flows.errors import ExpflowError
from expflow_flows.settings.base import (
    Settings,
    read_settings_file,
    relative_function,
    relative_to,
    relative_trainable,
    resolve,
)
from expflow_flows.settings.common import (
    BudgetSettings,
    ClusterSettings,
    Direction,
    Metric,
    Name,
    OffpeakSettings,
    PositiveSeconds,
    TrackingSettings,
    TrainableSettings,
    check_gates,
    check_known_objective,
    gate_list,
    writable_file,
    writable_folder,
)
from expflow_flows.settings.hpo import PrunerSettings, SamplerSettings, by_name

# Metrics every HPO trial has (expflow_flows.hpo.study.trial_metrics).
DERIVED_METRICS = ("train_time_s",)
PDE_SPACE = Path(__file__).resolve().parent.parent / "pde" / "space.yaml"
Gates = Annotated[list[str], BeforeValidator(gate_list), AfterValidator(check_gates)]

# Settings of earlier releases, and where they are now (named in the error).
RENAMED = {
    "runner": "cluster.kind (local, threads or slurm)",
    "parallelism": "cluster.workers",
    "dask_address": "cluster.address",
    "slurm": "cluster.slurm",
    "n_trials": "hpo.n_trials",
    "pruner": "hpo.pruner",
    "seed": "hpo.seed",
    "storage": "hpo.storage",
    "study_name": "hpo.study_name",
    "hpo_budget": "hpo.budget",
    "trial_timeout": "hpo.trial_timeout",
    "final_budget": "train.budget",
    "arg_style": "train.arg_style and evaluate.arg_style",
    "submit_to": "submit.to",
    "submission_name": "submit.name",
    "predictions": "submit.predictions",
}


# More trials than this is a typo, not a study (each trial is a run with its own folder).
MAX_TRIALS = 100_000


class StudySource(Settings):
    """The best trials of an earlier Optuna study."""

    name: Name = Field(description="Its study name.")
    storage: str | None = Field(None, description="Its storage (default: this run's hpo.storage).")
    best: int = Field(5, ge=1, le=1000, description="How many of its best trials.")


class SweepSource(Settings):
    """The best rows of a sweep (as `expflow sweep results NAME --best METRIC` lists them)."""

    name: Name = Field(description="The sweep's name.")
    metric: Metric = Field(description="The metric its rows are ranked by.")
    maximize: bool = Field(False, description="Higher is better.")
    best: int = Field(5, ge=1, le=1000, description="How many of its best rows.")


class WarmStartSettings(Settings):
    """Configurations the study tries before its sampler asks for any (each once)."""

    configs: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Parameter mappings, e.g. [{lr: 0.01, modes: 16}]; parameters left out "
        "are sampled.",
    )
    study: StudySource | None = Field(None, description="The best trials of an earlier study.")
    sweep: SweepSource | None = Field(None, description="The best rows of a sweep.")


class ObjectiveSettings(Settings):
    """One objective of a multi-objective study."""

    metric: Metric = Field(description="The metric (train_time_s: the trial's wall time).")
    direction: Direction = Field("minimize", description="minimize or maximize it.")


def objective_item(value: Any) -> Any:
    """``nrmse`` or ``nrmse:maximize`` is ``{metric: nrmse, direction: …}``."""
    if isinstance(value, str):
        metric, _, direction = value.partition(":")
        return {"metric": metric, "direction": direction or "minimize"}
    return value


Objective = Annotated[ObjectiveSettings, BeforeValidator(objective_item)]


class HpoSettings(Settings):
    """The HPO stage: an Optuna study of trials of the train trainable."""

    n_trials: int = Field(
        12, ge=1, le=MAX_TRIALS, description="Finished trials the study should hold."
    )
    sampler: Annotated[SamplerSettings, BeforeValidator(by_name)] = Field(
        default_factory=SamplerSettings,
        description="The Optuna sampler, by name ('tpe') or with options "
        "({name: cmaes, cmaes: {restart_strategy: ipop}}).",
    )
    pruner: Annotated[PrunerSettings, BeforeValidator(by_name)] = Field(
        default_factory=PrunerSettings,
        description="Stop unpromising trials early on their intermediate values: the "
        "pruner by name ('hyperband') or with options.",
    )
    select: Literal["primary", "knee"] = Field(
        "primary",
        description="With several objectives, which trial of the Pareto front is trained "
        "and evaluated: the best on the first objective (primary), or the knee point (the "
        "closest to the ideal point, each objective scaled to the front's range).",
    )
    constraints: Gates = Field(
        default_factory=list,
        description="Conditions a trial must meet to count, 'metric:op:value' like gates, "
        "e.g. 'train_time_s:lt:600'; infeasible trials are marked and never chosen, and "
        "tpe, nsgaii and gp steer away from them.",
    )
    warm_start: WarmStartSettings = Field(
        default_factory=lambda: WarmStartSettings(),
        description="Configurations tried first: given, the best of an earlier study, "
        "the best rows of a sweep.",
    )
    seed: int | None = Field(0, description="Sampler seed (null: random).")
    storage: str | None = Field(
        None,
        description="Optuna storage: a journal file path or a URL such as postgresql://… "
        "(default: the journal file under the expflow home).",
    )
    study_name: Name | None = Field(None, description="Study name (default: the experiment).")
    budget: BudgetSettings = Field(
        default_factory=lambda: BudgetSettings(epochs=15), description="Budget of each trial."
    )
    trial_timeout: PositiveSeconds | None = Field(
        None, description="Seconds after which a trial is stopped and recorded failed."
    )
    retries: int = Field(
        2,
        ge=0,
        le=100,
        description="Times a trial whose process died (killed, its worker or node lost) is "
        "retried as a new trial with the same parameters, resuming from its checkpoint "
        "folder; it counts once towards n_trials. A trial stopped for a time limit is "
        "resumed without using one up.",
    )


class SubmitSettings(Settings):
    """Writing the submission bundle once the gates pass (PIN-guarded)."""

    enabled: bool = Field(True, description="Write a submission bundle when the gates pass.")
    to: str | None = Field(
        None, description="Folder for bundles (default: the expflow home's submissions)."
    )
    name: Name | None = Field(None, description="Bundle name (default: experiment and time).")
    predictions: str = Field(
        "pred.hdf5",
        min_length=1,
        description="The evaluation's file that is submitted: a name or a glob in its run "
        "folder that matches one file, e.g. 'outputs/*_pred.h5'.",
    )
    convert: str | None = Field(
        None,
        description="A function 'package.module:function(src, dest)' that converts the "
        "predictions file into pred.hdf5 before it is submitted.",
    )
    approval_timeout: PositiveSeconds = Field(
        86400.0,
        description="Seconds a deployment run waits at the submission for approval in the "
        "UI (when a PIN is set); after that nothing is submitted and the run says so.",
    )


class PipelineSettings(Settings):
    """Everything an HPO → train → eval → submit run needs."""

    replaced = frozenset({"space"})
    renamed = RENAMED

    experiment: Name = Field(
        "pde-advection", description="Experiment name: run folder, study and ledger name."
    )
    train: TrainableSettings = Field(
        default_factory=lambda: TrainableSettings(
            target="expflow_flows.pde.trainables:train", budget=BudgetSettings(epochs=40)
        ),
        description="The train trainable: HPO trials, then the final training at its budget.",
    )
    evaluate: TrainableSettings = Field(
        default_factory=lambda: TrainableSettings(target="expflow_flows.pde.trainables:evaluate"),
        description="The evaluation trainable; it reads the trained run's folder "
        "(budget: the train budget unless its own is given).",
    )
    space: str | dict[str, Any] = Field(
        str(PDE_SPACE), description="Search space: a YAML file or a mapping of parameters."
    )
    params: dict[str, Any] = Field(
        default_factory=lambda: {"problem": "advection"},
        description="Fixed parameters given to every run.",
    )
    objective: Metric = Field("val_nrmse", description="Metric HPO optimises.")
    direction: Direction = Field("minimize", description="minimize or maximize the objective.")
    objectives: list[Objective] = Field(
        default_factory=list,
        description="Several objectives, e.g. [{metric: nrmse, direction: minimize}, "
        "{metric: train_time_s, direction: minimize}]: a multi-objective study whose "
        "Pareto front is reported; hpo.select picks the trial that is trained (given, "
        "they replace objective and direction).",
    )
    hpo: HpoSettings = Field(default_factory=HpoSettings, description="The HPO stage.")
    cluster: ClusterSettings = Field(
        default_factory=ClusterSettings, description="Where trials run in parallel."
    )
    gates: Gates = Field(
        default_factory=lambda: ["nrmse:lt:0.05"],
        description="Metric gates 'metric:op:value' (lt le gt ge eq ne) that must all pass "
        "before anything is submitted.",
    )
    submit: SubmitSettings = Field(
        default_factory=SubmitSettings, description="The submission bundle."
    )
    offpeak: OffpeakSettings | None = Field(
        None, description="Move a run triggered in peak hours to an off-peak window."
    )
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings, description="Tracking tools the run is mirrored to."
    )

    def check(self) -> None:
        """What validation cannot see, one line each, before any trial: the trainables exist
        and run, the objective is one the built-in workload reports, the study's journal file
        and the submission folder can be written, the Dask scheduler answers."""
        self.train.check()
        self.evaluate.check()
        for metric, _ in self.objective_list:
            if metric not in DERIVED_METRICS:
                check_known_objective(metric, [self.train.target])
        self._check_search()
        if len(self.objective_list) > 1 and self.hpo.sampler.name == "cmaes":
            raise ExpflowError(
                "hpo.sampler 'cmaes' optimises one objective; with several objectives use "
                "nsgaii, tpe, gp, random, qmc, grid or bruteforce"
            )
        from expflow_flows.hpo.study import URL_RE, resolve_storage

        storage = resolve_storage(self.hpo.storage)
        if not URL_RE.match(storage):
            writable_file(
                storage,
                "hpo.storage",
                "give a journal file in a folder that can be written, or a database URL "
                "such as postgresql://user@host/db",
            )
        if self.submit.enabled and self.submit.to is not None:
            writable_folder(
                self.submit.to,
                "submit.to",
                "give a folder that can be written, or submit.enabled=false",
            )
        self.cluster.check()

    def _check_search(self) -> None:
        """The search space holds the warm starts, and the grid and bruteforce samplers
        can enumerate it."""
        from expflow_flows.hpo import algorithms, warmstart
        from expflow_flows.hpo.space import SearchSpace

        space = SearchSpace.load(self.space)
        for i, config in enumerate(self.hpo.warm_start.configs, 1):
            warmstart.check_config(config, space, f"hpo.warm_start.configs[{i}]")
        if self.hpo.sampler.name == "bruteforce":
            algorithms.discrete_only(space)
        elif self.hpo.sampler.name == "grid":
            algorithms.grid_of(space, self.hpo.sampler.grid.points)

    @property
    def objective_list(self) -> list[tuple[str, str]]:
        """(metric, direction) of each objective: ``objectives``, else ``objective``."""
        if self.objectives:
            return [(o.metric, o.direction) for o in self.objectives]
        return [(self.objective, self.direction)]

    @property
    def primary(self) -> str:
        """The first objective's metric: pruning and the single-value views use it."""
        return self.objective_list[0][0]

    @property
    def study_name(self) -> str:
        """The Optuna study name: explicit, else the experiment name."""
        return self.hpo.study_name or self.experiment

    @property
    def final_budget(self) -> dict[str, float]:
        """The final training's budget."""
        return self.train.budget.as_dict() if self.train.budget else {}

    @property
    def eval_budget(self) -> dict[str, float]:
        """The evaluation's budget: its own, else the final training's."""
        return self.evaluate.budget.as_dict() if self.evaluate.budget else self.final_budget


def read_pipeline_file(path: str | Path) -> dict[str, Any]:
    """A pipeline YAML config as a mapping; relative file names become relative to the file."""
    data, base = read_settings_file(path, "pipeline")
    for key in ("train", "evaluate"):
        value = data.get(key)
        if isinstance(value, str):
            data[key] = value = {"target": value}
        if isinstance(value, dict):
            relative_trainable(base, value)
    submit = data.get("submit")
    if isinstance(submit, dict) and isinstance(submit.get("convert"), str):
        submit["convert"] = relative_function(base, submit["convert"])
    if isinstance(data.get("space"), str):
        data["space"] = relative_to(base, data["space"])
    return data


def load_pipeline_settings(
    config: str | Path | None = None, overrides: Any = None
) -> PipelineSettings:
    """Defaults < YAML config file < overrides (a mapping or settings object), validated."""
    file_data = read_pipeline_file(config) if config else {}
    return resolve(PipelineSettings, "pipeline", file_data, overrides, RENAMED)
