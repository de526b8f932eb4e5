"""Typed settings of the HPO stage's algorithms: Optuna samplers and pruners by name.

Each is chosen with ``name`` and tuned in the section of that name, whose defaults
are the ones that suit the PDE surrogates this tool was built for::

    hpo:
      sampler: {name: tpe, tpe: {multivariate: true, constant_liar: true}}
      pruner: hyperband          # the name alone takes every default

Only the chosen sampler's and pruner's sections are used; the others keep their
defaults so that switching by name alone always works.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from expflow_flows.settings.base import Settings

SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp", "nsgaii", "grid", "bruteforce")
PRUNERS = (
    "median",
    "percentile",
    "hyperband",
    "successive_halving",
    "threshold",
    "patient",
    "wilcoxon",
    "none",
)
SamplerName = Literal["tpe", "random", "qmc", "cmaes", "gp", "nsgaii", "grid", "bruteforce"]
PrunerName = Literal[
    "median",
    "percentile",
    "hyperband",
    "successive_halving",
    "threshold",
    "patient",
    "wilcoxon",
    "none",
]


def _options(model: type[Settings], name: str) -> Any:
    """The section of one sampler's or pruner's options, all defaults until given."""
    return Field(default_factory=model, description=f"Options of {name}.")


def by_name(value: Any) -> Any:
    """``sampler: cmaes`` is ``sampler: {name: cmaes}``."""
    return {"name": value} if isinstance(value, str) else value


# --- samplers -----------------------------------------------------------------------


class TpeOptions(Settings):
    """Tree-structured Parzen estimator: Optuna's default, good with few trials."""

    n_startup_trials: int = Field(5, ge=0, description="Random trials before TPE models.")
    multivariate: bool = Field(
        True, description="Model the parameters jointly (they interact in most models)."
    )
    group: bool = Field(
        False, description="Model parameters that appear together as groups (conditional spaces)."
    )
    constant_liar: bool = Field(
        True,
        description="Count running trials as bad results, so parallel trials do not all "
        "ask for the same region.",
    )
    n_ei_candidates: int = Field(24, ge=1, description="Candidates scored per suggestion.")


class QmcOptions(Settings):
    """Quasi-Monte Carlo: low-discrepancy points that cover the space evenly."""

    qmc_type: Literal["sobol", "halton"] = Field("sobol", description="The sequence.")
    scramble: bool = Field(True, description="Scramble the sequence (seeded).")


class CmaesOptions(Settings):
    """CMA-ES: strong on continuous spaces with many trials."""

    n_startup_trials: int = Field(1, ge=0, description="Random trials before CMA-ES starts.")
    restart_strategy: Literal["none", "ipop", "bipop"] = Field(
        "none", description="Restart with a larger population when it converges."
    )
    sigma0: float | None = Field(
        None, gt=0, description="Initial step size (default: a sixth of the range)."
    )
    with_margin: bool = Field(
        True, description="Keep integer and stepped parameters from collapsing on one value."
    )
    popsize: int | None = Field(None, ge=2, description="Population size (default: CMA-ES's).")


class GpOptions(Settings):
    """Gaussian-process Bayesian optimisation: few, expensive trials."""

    n_startup_trials: int = Field(10, ge=0, description="Random trials before the GP models.")
    deterministic_objective: bool = Field(
        False, description="The objective has no noise (the same parameters, the same value)."
    )


class NsgaiiOptions(Settings):
    """NSGA-II: the genetic algorithm for multi-objective studies."""

    population_size: int = Field(20, ge=2, description="Trials per generation.")
    mutation_prob: float | None = Field(
        None, ge=0, le=1, description="Mutation probability (default: 1/number of parameters)."
    )
    crossover: Literal["uniform", "blxalpha", "sbx", "vsbx", "undx", "spx"] = Field(
        "uniform", description="Crossover operator."
    )
    crossover_prob: float = Field(0.9, ge=0, le=1, description="Crossover probability.")
    swapping_prob: float = Field(0.5, ge=0, le=1, description="Swap probability (uniform).")


class GridOptions(Settings):
    """Every combination of a grid, in random order; the study ends when all are tried."""

    points: int = Field(
        5,
        ge=2,
        le=1000,
        description="Values per float range without a step (log-spaced when the range is "
        "log); integer and stepped ranges and choices are enumerated.",
    )


class BruteforceOptions(Settings):
    """Every value of a discrete space, depth first; the study ends when all are tried."""

    avoid_premature_stop: bool = Field(
        False, description="Keep going when pruned or failed trials hide part of the space."
    )


class SamplerSettings(Settings):
    """Which Optuna sampler asks for each trial's parameters."""

    name: SamplerName = Field(
        "tpe",
        description="tpe, random, qmc, cmaes, gp, nsgaii (multi-objective), grid or "
        "bruteforce; a resumed study keeps the sampler it was created with.",
    )
    tpe: TpeOptions = _options(TpeOptions, "tpe")
    qmc: QmcOptions = _options(QmcOptions, "qmc")
    cmaes: CmaesOptions = _options(CmaesOptions, "cmaes")
    gp: GpOptions = _options(GpOptions, "gp")
    nsgaii: NsgaiiOptions = _options(NsgaiiOptions, "nsgaii")
    grid: GridOptions = _options(GridOptions, "grid")
    bruteforce: BruteforceOptions = _options(BruteforceOptions, "bruteforce")

    def chosen(self) -> dict[str, Any]:
        """The sampler as the study stores it: its name and its own options only."""
        options = getattr(self, self.name, None)
        return {"name": self.name, **(options.model_dump() if options is not None else {})}


# --- pruners ------------------------------------------------------------------------


class MedianOptions(Settings):
    """Stop a trial whose value is worse than the median of earlier trials at that step."""

    n_startup_trials: int = Field(5, ge=0, description="Trials that finish before pruning.")
    n_warmup_steps: int = Field(5, ge=0, description="Steps of each trial before pruning.")
    interval_steps: int = Field(1, ge=1, description="Steps between pruning checks.")


class PercentileOptions(MedianOptions):
    """Stop a trial whose value is outside the best ``percentile`` of earlier trials."""

    percentile: float = Field(
        25.0, ge=0, le=100, description="Keep trials in this best percentile."
    )


class HyperbandOptions(Settings):
    """Hyperband: several successive-halving brackets over the trainable's budget."""

    min_resource: int = Field(1, ge=1, description="Steps (epochs) every trial gets.")
    max_resource: int | Literal["auto"] | None = Field(
        None,
        description="Steps (epochs) of a full trial (default: the HPO budget's epochs or "
        "steps, else 'auto': the longest finished trial).",
    )
    reduction_factor: int = Field(3, ge=2, description="1/n of the trials go on per rung.")
    bootstrap_count: int = Field(0, ge=0, description="Trials a rung waits for first.")


class SuccessiveHalvingOptions(Settings):
    """Asynchronous successive halving (ASHA): only the best 1/n go on at each rung."""

    min_resource: int | Literal["auto"] = Field(
        "auto",
        description="Steps (epochs) before the first rung ('auto': from the first finished trial).",
    )
    reduction_factor: int = Field(4, ge=2, description="1/n of the trials go on per rung.")
    min_early_stopping_rate: int = Field(0, ge=0, description="Rungs skipped at the start.")
    bootstrap_count: int = Field(0, ge=0, description="Trials a rung waits for first.")


class ThresholdOptions(Settings):
    """Stop a trial whose value crosses a bound (diverged, or hopeless)."""

    lower: float | None = Field(None, description="Stop below this value.")
    upper: float | None = Field(None, description="Stop above this value (e.g. a diverged loss).")
    n_warmup_steps: int = Field(0, ge=0, description="Steps before checking.")
    interval_steps: int = Field(1, ge=1, description="Steps between checks.")


class PatientOptions(Settings):
    """Stop a trial whose value got worse than its best for more than ``patience`` steps
    (early stopping)."""

    patience: int = Field(5, ge=0, description="Steps without improvement that are tolerated.")
    min_delta: float = Field(
        0.0, ge=0, description="A value worse than the best by less than this is tolerated."
    )
    wraps: Literal["none", "median"] = Field(
        "none",
        description="Also ask this pruner once patience runs out (none: stop on patience).",
    )


class WilcoxonOptions(Settings):
    """Stop a trial that a Wilcoxon signed-rank test says is worse than the best, step by
    step (for objectives averaged over instances, folds or PDE cases)."""

    p_threshold: float = Field(0.1, gt=0, lt=1, description="Significance of 'worse'.")
    n_startup_steps: int = Field(2, ge=0, description="Steps before testing.")


class PrunerSettings(Settings):
    """Which Optuna pruner stops unpromising trials on their intermediate values."""

    name: PrunerName = Field(
        "median",
        description="median, percentile, hyperband, successive_halving (ASHA), threshold, "
        "patient, wilcoxon or none; a resumed study keeps the pruner it was created with.",
    )
    median: MedianOptions = _options(MedianOptions, "median")
    percentile: PercentileOptions = _options(PercentileOptions, "percentile")
    hyperband: HyperbandOptions = _options(HyperbandOptions, "hyperband")
    successive_halving: SuccessiveHalvingOptions = _options(
        SuccessiveHalvingOptions, "successive_halving"
    )
    threshold: ThresholdOptions = _options(ThresholdOptions, "threshold")
    patient: PatientOptions = _options(PatientOptions, "patient")
    wilcoxon: WilcoxonOptions = _options(WilcoxonOptions, "wilcoxon")

    @model_validator(mode="after")
    def _threshold_has_a_bound(self) -> PrunerSettings:
        if (
            self.name == "threshold"
            and self.threshold.lower is None
            and (self.threshold.upper is None)
        ):
            raise ValueError(
                "the threshold pruner needs hpo.pruner.threshold.lower or "
                "hpo.pruner.threshold.upper"
            )
        return self

    def chosen(self, budget: dict[str, float] | None = None) -> dict[str, Any]:
        """The pruner as the study stores it; Hyperband's full trial is the HPO budget's
        epochs or steps unless given."""
        options = getattr(self, self.name, None)
        out: dict[str, Any] = {
            "name": self.name,
            **(options.model_dump() if options is not None else {}),
        }
        if self.name == "hyperband" and out["max_resource"] is None:
            budget = budget or {}
            full = budget.get("epochs") or budget.get("steps")
            out["max_resource"] = int(full) if full else "auto"
        return out
