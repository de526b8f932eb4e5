"""Samplers and pruners by name, multi-objective studies with constraints, warm starts.

Each sampler and each pruner runs a real Optuna study through the HPO loop on two
trainables: the built-in PDE baseline (a callable reporting val_nrmse per epoch) and a
command trainable (tests/foreign/argparse_tqdm/train.py, whose per-epoch values come
from its own printed lines), the way the threads runner runs them.
"""

from __future__ import annotations

import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.hpo import algorithms, loop
from expflow_flows.hpo import study as hpo
from expflow_flows.runs.trainable import run_trainable
from expflow_flows.settings.pipeline import load_pipeline_settings

FOREIGN = Path(__file__).parent / "foreign" / "argparse_tqdm"

PDE = {
    "train": {"target": "expflow_flows.pde.trainables:train"},
    "params": {"problem": "advection", "n_samples": 32, "nx": 32, "nt": 11, "width": 8},
    "space": {
        "modes": {"type": "int", "low": 2, "high": 8},
        "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
    },
    "objective": "val_nrmse",
}
SCRIPT = {
    "train": {
        "target": str(FOREIGN / "train.py"),
        "interpreter": [sys.executable],
        "budget_params": {"epochs": "epochs"},
        "metrics": {
            "patterns": [r"Epoch (?P<step>\d+)/\d+ loss=(?P<loss>[\d.]+) val=(?P<val_loss>[\d.]+)"]
        },
    },
    "params": {},
    "space": {
        "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
        "width": {"type": "int", "low": 8, "high": 64, "step": 8},
    },
    "objective": "val_loss",
}
TRAINABLES = {"pde": PDE, "script": SCRIPT}


def make_settings(kind: str, tmp_path: Path, hpo_settings: dict, **more):
    base = TRAINABLES[kind]
    return load_pipeline_settings(
        overrides={
            **base,
            "experiment": f"algo-{kind}",
            "hpo": {
                "n_trials": 6,
                "seed": 3,
                "storage": str(tmp_path / "journal.log"),
                "budget": {"epochs": 4},
                **hpo_settings,
            },
            "cluster": {"kind": "threads", "workers": 2},
            **more,
        }
    )


class Threads:
    """Trials in 2 threads through the trainable contract, reporting intermediate values
    to the pruner of the study they report to (as the pipeline's trial task does)."""

    def __init__(self, settings, storage: str) -> None:
        self.settings, self.storage = settings, storage
        self.pool = ThreadPoolExecutor(2)

    def start(self, spec: loop.TrialSpec):
        s = self.settings
        hook = hpo.report_hook(
            self.storage,
            spec.report_study,
            spec.report_trial_id,
            s.primary,
            None,
        )
        return self.pool.submit(
            run_trainable,
            s.train.label,
            spec.params,
            Path(spec.run_dir),
            budget=s.hpo.budget.as_dict(),
            hook=hook,
            arg_style=s.train.arg_style,
            launch=s.train.launch(),
            checkpoint_dir=spec.checkpoint_dir,
        )

    def next_finished(self, handles):
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return next(iter(done))

    def result(self, handle):
        return handle.result()


def run(settings, tmp_path: Path, logs: list[str] | None = None):
    """Open the study as the pipeline does, run it, conclude it; returns (study, outcome)."""
    lines = logs if logs is not None else []
    storage = settings.hpo.storage
    study = loop.open_settings_study(settings, storage, lines.append)
    counts, dirs = loop.run_study(
        settings, study, Threads(settings, storage), tmp_path / "trials", log=lines.append
    )
    outcome = loop.conclude(settings, study, storage, counts, dirs, tmp_path / "report")
    return study, outcome


def trials(study, state: str | None = None):
    return [t for t in study.get_trials(deepcopy=False) if state is None or t.state.name == state]


SAMPLER_OPTIONS = {
    "tpe": {"name": "tpe", "tpe": {"n_startup_trials": 2}},
    "random": "random",
    "qmc": "qmc",
    "cmaes": {"name": "cmaes", "cmaes": {"n_startup_trials": 2}},
    "gp": {"name": "gp", "gp": {"n_startup_trials": 3}},
    "nsgaii": {"name": "nsgaii", "nsgaii": {"population_size": 3}},
    "grid": {"name": "grid", "grid": {"points": 2}},
    "bruteforce": "bruteforce",
}
OPTUNA_CLASS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "qmc": "QMCSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "nsgaii": "NSGAIISampler",
    "grid": "GridSampler",
    "bruteforce": "BruteForceSampler",
}


@pytest.mark.parametrize("kind", ["pde", "script"])
@pytest.mark.parametrize("sampler", list(SAMPLER_OPTIONS))
def test_every_sampler_runs_a_study_by_name(sampler, kind, tmp_path):
    space = None
    if sampler in ("grid", "bruteforce"):  # every configuration is tried: 4 of them
        lr = (
            {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True}  # 2 grid points
            if sampler == "grid"
            else {"type": "categorical", "choices": [0.01, 0.05]}
        )
        space = (
            {"modes": {"type": "int", "low": 2, "high": 3}, "lr": lr}
            if kind == "pde"
            else {"lr": lr, "width": {"type": "int", "low": 8, "high": 16, "step": 8}}
        )
    more = {"space": space} if space else {}
    settings = make_settings(
        kind, tmp_path, {"sampler": SAMPLER_OPTIONS[sampler], "pruner": "none"}, **more
    )
    study, outcome = run(settings, tmp_path)

    assert study.user_attrs[algorithms.SAMPLER_ATTR]["name"] == sampler
    assert OPTUNA_CLASS[sampler] in type(study.sampler).__mro__[1].__name__
    done = trials(study, "COMPLETE")
    if sampler in ("grid", "bruteforce"):
        # the whole grid is tried once each, and the study ends there (6 > 4 points)
        params = [tuple(sorted(t.params.items())) for t in done]
        assert len(params) == len(set(params)) == 4 == outcome.complete
    else:
        assert outcome.complete == 6
        assert len({tuple(sorted(t.params.items())) for t in done}) >= 5
    lows = {k: v["low"] for k, v in settings.space.items() if "low" in v}
    for t in done:
        for name, low in lows.items():
            assert t.params[name] >= low
    best = min(t.value for t in done)
    assert outcome.best_value == best
    assert Path(outcome.report).is_file()


def test_the_same_seed_asks_the_same_parameters_for_every_sampler_that_is_seeded(tmp_path):
    for sampler in ("qmc", "cmaes", "nsgaii"):
        asked = []
        for attempt in range(2):
            folder = tmp_path / f"{sampler}-{attempt}"
            settings = make_settings(
                "pde",
                folder,
                {"sampler": SAMPLER_OPTIONS[sampler], "pruner": "none", "n_trials": 4},
            )
            study, _ = run(settings, folder)
            asked.append([t.params for t in trials(study)])
        assert asked[0] == asked[1], sampler


PRUNER_OPTIONS = {
    "median": {"name": "median", "median": {"n_startup_trials": 2, "n_warmup_steps": 1}},
    "percentile": {
        "name": "percentile",
        "percentile": {"percentile": 40.0, "n_startup_trials": 2, "n_warmup_steps": 1},
    },
    "hyperband": {"name": "hyperband", "hyperband": {"reduction_factor": 2}},
    "successive_halving": {
        "name": "successive_halving",
        "successive_halving": {"min_resource": 1, "reduction_factor": 2},
    },
    "threshold": {"name": "threshold", "threshold": {"upper": 1.0e-6, "n_warmup_steps": 2}},
    "patient": {"name": "patient", "patient": {"patience": 0}},
    "wilcoxon": {"name": "wilcoxon", "wilcoxon": {"p_threshold": 0.5, "n_startup_steps": 1}},
    "none": "none",
}


@pytest.mark.parametrize("kind", ["pde", "script"])
@pytest.mark.parametrize("pruner", list(PRUNER_OPTIONS))
def test_every_pruner_stops_trials_on_their_reported_epochs(pruner, kind, tmp_path):
    settings = make_settings(
        kind,
        tmp_path,
        {
            "sampler": {"name": "random"},
            "pruner": PRUNER_OPTIONS[pruner],
            "n_trials": 8,
            "budget": {"epochs": 6},
        },
    )
    if pruner == "threshold":  # nothing gets under the bound: every trial stops at epoch 2
        with pytest.raises(ExpflowError) as err:
            run(settings, tmp_path)
        assert "no trial of study" in str(err.value) and "8 pruned" in str(err.value)
        study = hpo.load_study(settings.hpo.storage, settings.study_name)
        assert {max(t.intermediate_values) for t in trials(study)} == {2}
        return
    study, outcome = run(settings, tmp_path)
    stored = study.user_attrs[algorithms.PRUNER_ATTR]
    assert stored["name"] == pruner
    if pruner == "hyperband":  # the full trial is the HPO budget's epochs
        assert stored["max_resource"] == 6

    pruned = trials(study, "PRUNED")
    reported = [t for t in trials(study) if t.intermediate_values]
    assert len(reported) == 8, "every trial reported its epochs"
    epochs = sum(len(t.intermediate_values) for t in trials(study))
    if pruner == "none":
        assert not pruned and epochs == 8 * 6
        return
    if pruner == "patient":
        # patience 0: a trial stops at its first epoch worse than its best so far, and only then
        for t in trials(study):
            values = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
            worse = [i for i in range(1, len(values)) if values[i] > min(values[:i])]
            if t.state.name == "PRUNED":
                assert worse and worse[0] == len(values) - 1, values
            else:
                assert not worse, values
        if kind == "script":  # its loss improves every epoch: nothing to stop
            assert not pruned
        return
    assert pruned, f"{pruner} pruned no trial"
    # a pruned trial stopped before its budget: fewer epochs were spent than without pruning
    assert all(max(t.intermediate_values) < 6 for t in pruned)
    assert epochs < 8 * 6


def test_a_resumed_study_keeps_its_sampler_and_pruner_and_says_so(tmp_path):
    first = make_settings(
        "pde", tmp_path, {"sampler": "cmaes", "pruner": "hyperband", "n_trials": 3}
    )
    run(first, tmp_path)
    again = make_settings("pde", tmp_path, {"sampler": "tpe", "pruner": "median", "n_trials": 5})
    logs: list[str] = []
    study, outcome = run(again, tmp_path, logs)
    assert "CmaEsSampler" in type(study.sampler).__mro__[1].__name__
    assert type(study.pruner).__name__ == "HyperbandPruner"
    assert any("keeps the sampler it was created with (cmaes" in line for line in logs), logs
    assert any("keeps the pruner it was created with (hyperband" in line for line in logs)
    assert outcome.complete + outcome.pruned + outcome.failed == 5
    # a trial's pruner, built where the trial runs, is the study's too
    loaded = hpo.load_study(again.hpo.storage, again.study_name, "median")
    assert type(loaded.pruner).__name__ == "HyperbandPruner"


def test_several_objectives_give_a_pareto_front_and_a_chosen_trial(tmp_path):
    settings = make_settings(
        "script",
        tmp_path,
        {
            "sampler": {"name": "nsgaii", "nsgaii": {"population_size": 4}},
            "n_trials": 10,
            "pruner": {"name": "threshold", "threshold": {"upper": 50.0}},
            "select": "knee",
        },
        objectives=[{"metric": "val_loss", "direction": "minimize"}, "train_time_s"],
    )
    study, outcome = run(settings, tmp_path)
    assert study.metric_names == ["val_loss", "train_time_s"]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    front = outcome.pareto
    assert front and any(row["chosen"] for row in front)
    chosen = next(row for row in front if row["chosen"])
    assert chosen["trial"] == outcome.best_trial
    assert set(outcome.best_values) == {"val_loss", "train_time_s"}
    # nothing on the front is beaten on both objectives by another completed trial
    done = trials(study, "COMPLETE")
    for row in front:
        assert not any(
            t.values[0] < row["val_loss"] and t.values[1] < row["train_time_s"] for t in done
        )
    # pruning works on the first objective through the prune twin study
    twin = hpo.open_twin(study)
    assert len(trials(twin)) == 10
    assert all(t.intermediate_values for t in trials(twin))


def test_the_primary_rule_picks_the_best_first_objective_of_the_front():
    class T:
        def __init__(self, number, values):
            self.number, self.values = number, values

    front = [T(0, [1.0, 9.0]), T(1, [2.0, 2.0]), T(2, [9.0, 1.0])]
    assert hpo.choose(front, ["minimize", "minimize"], "primary").number == 0
    assert hpo.choose(front, ["minimize", "minimize"], "knee").number == 1
    assert hpo.choose(front, ["maximize", "minimize"], "primary").number == 2


def test_constraints_mark_infeasible_trials_and_they_are_never_chosen(tmp_path):
    # the baseline's size grows with its modes (n_params = 32 + 20 * modes at width 8):
    # a model of more than 4 modes is too big
    settings = make_settings(
        "pde",
        tmp_path,
        {"sampler": "tpe", "pruner": "none", "n_trials": 8, "constraints": ["n_params:lt:130"]},
    )
    study, outcome = run(settings, tmp_path)
    rows = {r["trial"]: r for r in outcome.trials}
    infeasible = [t for t in trials(study, "COMPLETE") if t.params["modes"] > 4]
    feasible = [t for t in trials(study, "COMPLETE") if t.params["modes"] <= 4]
    assert infeasible and feasible, "the seed should try both kinds"
    for t in infeasible:
        assert rows[t.number]["feasible"] is False
        assert "infeasible: n_params:lt:130 not met" in rows[t.number]["reason"]
    assert all(rows[t.number]["feasible"] is True for t in feasible)
    assert outcome.best_trial in {t.number for t in feasible}
    assert outcome.best_value == min(t.value for t in feasible)
    # TPE was told: Optuna's constraint values are on the trials it learns from
    assert all("constraints" in t.system_attrs for t in trials(study, "COMPLETE"))


def test_warm_starts_run_first_marked_by_source_and_only_once(tmp_path):
    earlier = make_settings("pde", tmp_path, {"sampler": "random", "pruner": "none", "n_trials": 4})
    earlier = earlier.model_copy(
        update={"hpo": earlier.hpo.model_copy(update={"study_name": "earlier"})}
    )
    first, _ = run(earlier, tmp_path / "a")
    best_two = sorted(trials(first, "COMPLETE"), key=lambda t: t.value)[:2]

    settings = make_settings(
        "pde",
        tmp_path,
        {
            "sampler": "tpe",
            "pruner": "none",
            "n_trials": 5,
            "warm_start": {
                "configs": [{"modes": 3, "lr": 0.02}, {"modes": 7}],
                "study": {"name": "earlier", "best": 2},
            },
        },
    )
    logs: list[str] = []
    study, outcome = run(settings, tmp_path / "b", logs)
    ordered = sorted(trials(study), key=lambda t: t.number)
    sources = [t.user_attrs.get(hpo.WARM_START_ATTR, "") for t in ordered]
    assert sources[:4] == ["config", "config", "study:earlier", "study:earlier"]
    assert sources[4] == ""
    assert ordered[0].params == {"modes": 3, "lr": 0.02}
    assert ordered[1].params["modes"] == 7  # lr was left to the sampler
    assert [t.params for t in ordered[2:4]] == [t.params for t in best_two]
    assert [r["source"] for r in sorted(outcome.trials, key=lambda r: r["trial"])][:4] == sources[
        :4
    ]
    assert any("4 warm-start configurations queued first" in line for line in logs)

    # a resumed study does not queue them again
    more = settings.model_copy(update={"hpo": settings.hpo.model_copy(update={"n_trials": 7})})
    study, _ = run(more, tmp_path / "b")
    assert sum(1 for t in trials(study) if t.user_attrs.get(hpo.WARM_START_ATTR)) == 4


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"hpo": {"sampler": "annealing"}}, "annealing"),
        ({"hpo": {"pruner": {"name": "threshold"}}}, "hpo.pruner.threshold.lower"),
        ({"hpo": {"pruner": {"name": "median", "median": {"n_warmup_steps": -1}}}}, "-1"),
        ({"hpo": {"select": "middle"}}, "middle"),
        ({"objectives": [{"metric": "nrmse", "direction": "up"}]}, "up"),
    ],
)
def test_bad_algorithm_settings_are_one_line(overrides, named):
    with pytest.raises(ExpflowError) as err:
        load_pipeline_settings(overrides=overrides)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("hpo_settings", "more", "named"),
    [
        ({"sampler": "bruteforce"}, {}, "'lr' is a float range without a step"),
        (
            {"sampler": "cmaes"},
            {"objectives": ["val_nrmse", "train_time_s"]},
            "'cmaes' optimises one objective",
        ),
        (
            {"warm_start": {"configs": [{"lr": 5.0}]}},
            {},
            "hpo.warm_start.configs[1]: lr=5.0 is outside its range",
        ),
        (
            {"warm_start": {"configs": [{"depth": 3}]}},
            {},
            "'depth' is not a searched parameter",
        ),
        ({"warm_start": {"study": {"name": "nowhere"}}}, {}, "no study named 'nowhere'"),
    ],
)
def test_a_study_that_cannot_start_says_why_before_any_trial(hpo_settings, more, named, tmp_path):
    settings = make_settings("pde", tmp_path, hpo_settings, **more)
    with pytest.raises(ExpflowError) as err:
        loop.open_settings_study(settings, settings.hpo.storage)
    assert named in str(err.value)
    if "study" not in hpo_settings.get("warm_start", {}):
        # the pipeline's preflight says it before a run folder or a study exists
        with pytest.raises(ExpflowError) as early:
            settings.check()
        assert named in str(early.value)
    assert not (tmp_path / "trials").exists()


def test_warm_starts_from_a_sweeps_best_rows(tmp_path, home):
    from expflow_flows.home import runs_root
    from expflow_flows.sweep.store import ResultStore

    rows = []
    for i, (modes, lr, nrmse) in enumerate(
        [(3, 0.01, 0.30), (5, 0.02, 0.10), (7, 0.05, 0.20), (4, 9.0, 0.05), (6, 0.03, None)]
    ):
        rows.append(
            {
                "key": f"k{i}",
                "combo_id": f"c{i}",
                "combo_index": i,
                "step": "",
                "params": {"modes": modes, "lr": lr, "seed": 0},
                "metrics": {} if nrmse is None else {"val_nrmse": nrmse},
                "status": "ok" if nrmse is not None else "failed",
                "reason": "",
                "wall_s": 1.0,
                "cpu_s": 1.0,
                "peak_rss_mb": 10.0,
                "attempts": 1,
                "worker": "w",
                "run_dir": f"/runs/{i}",
                "started_at": 1.0,
                "ended_at": 2.0,
                "recorded_at": 3.0,
            }
        )
    ResultStore.for_sweep_dir(runs_root() / "modes-sweep").record_many(rows)
    settings = make_settings(
        "pde",
        tmp_path,
        {
            "sampler": "random",
            "pruner": "none",
            "n_trials": 4,
            "warm_start": {"sweep": {"name": "modes-sweep", "metric": "val_nrmse", "best": 3}},
        },
    )
    study, _ = run(settings, tmp_path)
    ordered = sorted(trials(study), key=lambda t: t.number)
    # best first: lr=9.0 is outside this study's range, so the sampler picks that one's lr
    assert [t.user_attrs.get(hpo.WARM_START_ATTR) for t in ordered] == ["sweep:modes-sweep"] * 3 + [
        None
    ]
    assert ordered[0].params["modes"] == 4 and ordered[0].params["lr"] != 9.0
    assert ordered[1].params == {"modes": 5, "lr": 0.02}
    assert ordered[2].params == {"modes": 7, "lr": 0.05}

    missing = make_settings(
        "pde", tmp_path / "x", {"warm_start": {"sweep": {"name": "nope", "metric": "val_nrmse"}}}
    )
    with pytest.raises(ExpflowError, match="no sweep named 'nope'"):
        loop.open_settings_study(missing, missing.hpo.storage)
