"""Optuna samplers and pruners built from the plain mappings a study stores.

The HPO settings (:mod:`expflow_flows.settings.hpo`) say which sampler and pruner a
study uses; the study keeps them (its user attributes), so a resumed study, and every
process that reports a trial's intermediate values, builds the same ones. Optuna is
imported only when one is built.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from expflow_flows.errors import ExpflowError

if TYPE_CHECKING:
    import optuna

    from expflow_flows.hpo.space import SearchSpace

# The study's user attributes that hold them.
SAMPLER_ATTR = "expflow:sampler"
PRUNER_ATTR = "expflow:pruner"
DEFAULT_SAMPLER: dict[str, Any] = {"name": "tpe"}
DEFAULT_PRUNER: dict[str, Any] = {"name": "median"}
# Samplers that take a constraints function (infeasible trials steer them away).
TAKES_CONSTRAINTS = ("tpe", "nsgaii", "gp")
# Samplers that handle several objectives (the others optimise only... none: all do in
# Optuna 4 except cmaes and gp, which are single-objective).
SINGLE_OBJECTIVE_ONLY = ("cmaes",)
# Most grid points a study is asked to enumerate (a typo, not a grid, beyond this).
MAX_GRID = 1_000_000


def make_pruner(spec: dict[str, Any] | str | None) -> optuna.pruners.BasePruner:
    """The pruner a study stores (``{"name": ..., options}``, or just a name)."""
    import optuna

    p = dict(DEFAULT_PRUNER if spec is None else {"name": spec} if isinstance(spec, str) else spec)
    name = p.pop("name")
    pruners = optuna.pruners
    if name == "none":
        return pruners.NopPruner()
    if name == "median":
        return pruners.MedianPruner(
            **_pick(p, "n_startup_trials", "n_warmup_steps", "interval_steps")
        )
    if name == "percentile":
        return pruners.PercentilePruner(
            p.get("percentile", 25.0),
            **_pick(p, "n_startup_trials", "n_warmup_steps", "interval_steps"),
        )
    if name == "hyperband":
        return pruners.HyperbandPruner(
            min_resource=p.get("min_resource", 1),
            max_resource=p.get("max_resource") or "auto",
            reduction_factor=p.get("reduction_factor", 3),
            bootstrap_count=p.get("bootstrap_count", 0),
        )
    if name == "successive_halving":
        return pruners.SuccessiveHalvingPruner(
            **_pick(
                p,
                "min_resource",
                "reduction_factor",
                "min_early_stopping_rate",
                "bootstrap_count",
            )
        )
    if name == "threshold":
        return pruners.ThresholdPruner(
            **_pick(p, "lower", "upper", "n_warmup_steps", "interval_steps")
        )
    if name == "patient":
        wrapped = (
            pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)
            if p.get("wraps") == "median"
            else None
        )
        return pruners.PatientPruner(
            wrapped, patience=p.get("patience", 5), min_delta=p.get("min_delta", 0.0)
        )
    if name == "wilcoxon":
        return pruners.WilcoxonPruner(**_pick(p, "p_threshold", "n_startup_steps"))
    raise ExpflowError(
        f"pruner {name!r} is not known; expected median, percentile, hyperband, "
        "successive_halving, threshold, patient, wilcoxon or none"
    )


def _pick(options: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: options[k] for k in keys if k in options}


def make_sampler(
    spec: dict[str, Any] | str | None,
    *,
    seed: int | None,
    space: SearchSpace | None = None,
    constraints: Any = None,
    objectives: int = 1,
) -> optuna.samplers.BaseSampler:
    """The sampler a study stores, seeded, re-seeded per trial where replaying its seeded
    stream would repeat trials (see :func:`_trial_seeded`)."""
    import optuna

    s = dict(DEFAULT_SAMPLER if spec is None else {"name": spec} if isinstance(spec, str) else spec)
    name = s.pop("name")
    samplers = optuna.samplers
    if objectives > 1 and name in SINGLE_OBJECTIVE_ONLY:
        raise ExpflowError(
            f"sampler {name!r} optimises one objective; for several use nsgaii, tpe, gp, "
            "random, qmc, grid or bruteforce"
        )
    with_constraints = {"constraints_func": constraints} if constraints else {}
    if name == "tpe":
        cls, kwargs = (
            samplers.TPESampler,
            {
                **_pick(s, "n_startup_trials", "multivariate", "constant_liar", "n_ei_candidates"),
                "group": bool(s.get("group")) and bool(s.get("multivariate", True)),
                **with_constraints,
            },
        )
    elif name == "random":
        cls, kwargs = samplers.RandomSampler, {}
    elif name == "qmc":
        cls, kwargs = samplers.QMCSampler, _pick(s, "qmc_type", "scramble")
    elif name == "cmaes":
        cls, kwargs = (
            samplers.CmaEsSampler,
            {
                **_pick(s, "n_startup_trials", "sigma0", "with_margin", "popsize"),
                "restart_strategy": None
                if s.get("restart_strategy", "none") == "none"
                else s["restart_strategy"],
            },
        )
    elif name == "gp":
        cls, kwargs = (
            samplers.GPSampler,
            {**_pick(s, "n_startup_trials", "deterministic_objective"), **with_constraints},
        )
    elif name == "nsgaii":
        cls, kwargs = (
            samplers.NSGAIISampler,
            {
                **_pick(s, "population_size", "mutation_prob", "crossover_prob", "swapping_prob"),
                "crossover": _crossover(s.get("crossover", "uniform")),
                **with_constraints,
            },
        )
    elif name == "grid":
        cls, kwargs = samplers.GridSampler, {"search_space": grid_of(space, s.get("points", 5))}
    elif name == "bruteforce":
        discrete_only(space)
        cls, kwargs = (
            samplers.BruteForceSampler,
            _pick(s, "avoid_premature_stop"),
        )
    else:
        raise ExpflowError(
            f"sampler {name!r} is not known; expected tpe, random, qmc, cmaes, gp, nsgaii, "
            "grid or bruteforce"
        )
    return _trial_seeded(cls)(seed=seed, **kwargs)


def _crossover(name: str) -> Any:
    from optuna.samplers import nsgaii

    return {
        "uniform": nsgaii.UniformCrossover,
        "blxalpha": nsgaii.BLXAlphaCrossover,
        "sbx": nsgaii.SBXCrossover,
        "vsbx": nsgaii.VSBXCrossover,
        "undx": nsgaii.UNDXCrossover,
        "spx": nsgaii.SPXCrossover,
    }[name]()


def grid_of(space: SearchSpace | None, points: int) -> dict[str, list[Any]]:
    """The grid of a search space: choices as they are, integer and stepped ranges every
    value, other float ranges ``points`` values (log-spaced on a log range)."""
    from expflow_flows.hpo.space import CategoricalParam, FloatParam, IntParam

    if space is None:
        raise ExpflowError("the grid sampler needs the search space")
    grid: dict[str, list[Any]] = {}
    for p in space.searched:
        if isinstance(p, CategoricalParam):
            grid[p.name] = list(p.choices)
        elif isinstance(p, IntParam):
            step = p.step or 1
            values = list(range(p.low, p.high + 1, step))
            if p.log and len(values) > points:
                values = sorted({round(v) for v in _spaced(p.low, p.high, points, log=True)})
            grid[p.name] = values
        elif isinstance(p, FloatParam):
            if p.step:
                n = int(round((p.high - p.low) / p.step)) + 1
                grid[p.name] = [round(p.low + i * p.step, 12) for i in range(n)]
            else:
                grid[p.name] = _spaced(p.low, p.high, points, log=p.log)
    size = math.prod(len(v) for v in grid.values()) if grid else 0
    if size > MAX_GRID:
        raise ExpflowError(
            f"the grid of this search space has {size:,} points (more than {MAX_GRID:,}); "
            "give steps or choices, or lower hpo.sampler.grid.points"
        )
    return grid


def _spaced(low: float, high: float, n: int, *, log: bool) -> list[float]:
    if log:
        a, b = math.log(low), math.log(high)
        inner = [float(math.exp(a + (b - a) * i / (n - 1))) for i in range(1, n - 1)]
    else:
        inner = [float(low + (high - low) * i / (n - 1)) for i in range(1, n - 1)]
    return [float(low), *inner, float(high)]  # the ends exactly as written


def discrete_only(space: SearchSpace | None) -> None:
    """The brute-force sampler enumerates values: every float range needs a step."""
    from expflow_flows.hpo.space import FloatParam

    if space is None:
        raise ExpflowError("the bruteforce sampler needs the search space")
    for p in space.searched:
        if isinstance(p, FloatParam) and not p.step:
            raise ExpflowError(
                f"the bruteforce sampler tries every value: search space key {p.name!r} is "
                "a float range without a step; give it a step or choices, or use "
                "hpo.sampler=grid"
            )


def grid_size(spec: dict[str, Any], space: SearchSpace) -> int | None:
    """How many trials a grid or brute-force sampler can ask for (None: unbounded)."""
    from expflow_flows.hpo.space import CategoricalParam, FloatParam, IntParam

    name = spec.get("name")
    if name == "grid":
        return math.prod(len(v) for v in grid_of(space, spec.get("points", 5)).values())
    if name != "bruteforce":
        return None
    size = 1
    for p in space.searched:
        if isinstance(p, CategoricalParam):
            size *= len(p.choices)
        elif isinstance(p, IntParam):
            size *= (p.high - p.low) // (p.step or 1) + 1
        elif isinstance(p, FloatParam) and p.step:
            size *= int(round((p.high - p.low) / p.step)) + 1
    return size


_SEEDED: dict[type, type] = {}


def _trial_seeded(cls: type) -> type:
    """``cls`` seeded once, whose random streams are re-seeded per trial where replaying
    them would repeat trials: in a resumed study, and when another run shares the study.

    A sampler seeded once replays the same stream in every process: a resumed study asked
    its first trials' parameters again, and two runs sharing a study asked the same ones.
    A fresh study asked by one run keeps the plain seeded stream (the same trials for the
    same seed as ever); any other trial gets streams seeded from the seed and its number,
    which is unique in the study.
    """
    if cls in _SEEDED:
        return _SEEDED[cls]

    def __init__(self: Any, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        cls.__init__(self, *args, seed=seed, **kwargs)
        self.expflow_seed = seed
        self.opened_with = 0  # trials the study held when this run opened it
        self.asked = 0  # trials this sampler was asked for

    def before_trial(self: Any, study: Any, trial: Any) -> None:
        in_sequence = self.opened_with == 0 and trial.number == self.asked
        self.asked += 1
        seed = self.expflow_seed
        if seed is not None and not in_sequence:
            derived = (int(seed) * 1_000_003 + int(trial.number) * 7_919 + 1) % (2**32)
            for rng in _rngs(self):
                rng.seed(derived)
        cls.before_trial(self, study, trial)

    def after_trial(self: Any, study: Any, trial: Any, state: Any, values: Any) -> None:
        try:
            cls.after_trial(self, study, trial, state, values)
        except RuntimeError as exc:
            # grid and bruteforce call Study.stop() once every point was tried, which
            # Optuna allows inside study.optimize only; the ask/tell loop reads this flag.
            if "stop" not in str(exc).lower():
                raise
            self.exhausted = True

    seeded = type(
        f"TrialSeeded{cls.__name__}",
        (cls,),
        {
            "__init__": __init__,
            "before_trial": before_trial,
            "after_trial": after_trial,
            "exhausted": False,
            "__module__": __name__,
        },
    )
    _SEEDED[cls] = seeded
    return seeded


def _rngs(sampler: Any) -> list[Any]:
    """The numpy random states a sampler (and the samplers it delegates to) draw from."""
    import numpy as np

    found: list[Any] = []
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 2:
            return
        seen.add(id(obj))
        for attr in ("_rng", "_cma_rng", "rng"):
            value = getattr(obj, attr, None)
            if isinstance(value, np.random.RandomState):
                found.append(value)
            elif value is not None and isinstance(
                getattr(value, "rng", None), np.random.RandomState
            ):
                found.append(value.rng)
        for attr in ("_random_sampler", "_independent_sampler"):
            walk(getattr(obj, attr, None), depth + 1)

    walk(sampler, 0)
    return found
