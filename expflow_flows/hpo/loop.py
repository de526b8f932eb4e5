"""The HPO ask/tell loop, as plain Python: it asks Optuna, starts trials, tells results.

How a trial runs is not its business: the caller gives a :class:`TrialLauncher`
(a Prefect task on Dask, threads, or anything with the same three methods). The
loop keeps ``cluster.workers`` trials in flight until the study holds
``hpo.n_trials`` finished trials, records every outcome (a lost worker fails one
trial, not the study), publishes progress, and on the way out asks trials that run
in this process's threads to stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from expflow_flows.errors import ExpflowError, JobEnding
from expflow_flows.hpo import progress
from expflow_flows.hpo import study as hpo
from expflow_flows.hpo.report import write_study_report
from expflow_flows.hpo.space import SearchSpace
from expflow_flows.runs import trainable as trainable_mod
from expflow_flows.runs.rundir import new_run_id
from expflow_flows.runs.ticker import Ticker
from expflow_flows.runs.trainable import RunResult

if TYPE_CHECKING:
    from expflow_flows.settings.pipeline import PipelineSettings


@dataclass(frozen=True)
class TrialSpec:
    """One trial to run: what the launcher needs, nothing of Optuna's objects."""

    number: int
    trial_id: int
    params: dict[str, Any]
    run_dir: str
    checkpoint_dir: str = ""  # kept by the trial's retries, so they resume from it
    stop_file: str = ""  # appears when the job is about to end (see runs.slurmjob)
    retry_of: int | None = None
    # Where intermediate values go: the trial itself, or in a multi-objective study its
    # twin in the prune twin study (Optuna prunes single-objective studies only).
    report_study: str = ""
    report_trial_id: int | None = None


class TrialLauncher(Protocol):
    """Runs trials somewhere: start one, wait for any, read a finished one's result."""

    def start(self, spec: TrialSpec) -> Any:
        """Start the trial; returns a handle."""

    def next_finished(self, handles: list[Any]) -> Any:
        """Block until one of ``handles`` has finished; return it."""

    def result(self, handle: Any) -> RunResult:
        """The finished trial's result (raises when its worker was lost)."""


# Called after each tell: (trial spec, its result or None when lost, outcome).
Told = Callable[[TrialSpec, RunResult | None, str], None]


@dataclass
class StudyOutcome:
    """What the HPO stage hands on: the best trial and where everything is."""

    study: str
    storage: str
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    complete: int
    pruned: int
    failed: int
    trials: list[dict[str, Any]]
    report: str
    trial_dirs: list[str] = field(default_factory=list)
    # Every objective's value of the chosen trial, by metric (one entry for one objective).
    best_values: dict[str, float] = field(default_factory=dict)
    # Several objectives: the Pareto front (trial, values by metric, params, chosen).
    pareto: list[dict[str, Any]] = field(default_factory=list)
    select: str = "primary"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (the flow's return value)."""
        return dict(self.__dict__)


def open_settings_study(
    settings: PipelineSettings, storage: str, log: Callable[[str], None] = lambda line: None
) -> Any:
    """The pipeline's study as its settings say: objectives, sampler, pruner (a resumed
    study keeps its own), constraints, metric names, and its warm starts queued first."""
    from expflow_flows.hpo import warmstart

    space = SearchSpace.load(settings.space)
    study = hpo.open_study(
        storage,
        settings.study_name,
        directions=[direction for _, direction in settings.objective_list],
        sampler=settings.hpo.sampler.chosen(),
        pruner=settings.hpo.pruner.chosen(settings.hpo.budget.as_dict()),
        seed=settings.hpo.seed,
        space=space,
        metric_names=[metric for metric, _ in settings.objective_list],
        constraints=settings.hpo.constraints,
        log=log,
    )
    warmstart.enqueue(study, warmstart.configurations(settings.hpo.warm_start, space, storage), log)
    return study


def trial_dir(experiment_dir: Path, number: int) -> Path:
    """A trial's run folder: ``hpo-t<number>-<time>`` under the experiment."""
    return experiment_dir / f"hpo-t{number:04d}-{new_run_id('')[1:]}"


def run_study(
    settings: PipelineSettings,
    study: Any,
    launcher: TrialLauncher,
    experiment_dir: Path,
    *,
    flow_run_id: str = "",
    on_told: Told | None = None,
    log: Callable[[str], None] = lambda line: None,
    stop_file: str = "",
) -> tuple[progress.TrialProgress, list[str]]:
    """Run trials until the study holds ``hpo.n_trials`` finished ones.

    A trial the machine failed (its process killed, its worker lost) is retried as a new
    trial with the same parameters and checkpoint folder (``hpo.retries``). When this
    process is told its job ends soon (``trainables.request_checkpoint``, or ``stop_file``
    appearing), no more trials start, the running ones checkpoint and stop, and
    :class:`~expflow_flows.errors.JobEnding` is raised once they have: their retries resume
    them when the flow run is requeued or run again.

    Returns the progress counts and this call's trial folders.
    """
    space = SearchSpace.load(settings.space)
    target = settings.hpo.n_trials
    from expflow_flows.hpo import algorithms

    stored_sampler = study.user_attrs.get(algorithms.SAMPLER_ATTR) or {}
    points = algorithms.grid_size(stored_sampler, space)
    if points is not None and points < target:
        log(
            f"the {stored_sampler['name']} sampler has {points} configurations to try: the "
            f"study ends after them, not after hpo.n_trials={target}"
        )
        target = points
    objectives = [metric for metric, _ in settings.objective_list]
    twin = hpo.open_twin(study)
    stale = hpo.fail_stale_trials(study, now=time.time(), stale_after=hpo.STALE_AFTER_S)
    if stale:
        log(f"trials {stale} had stopped sending heartbeats (killed?): marked failed")
    for failed, attempt in hpo.enqueue_retries(study, settings.hpo.retries):
        log(f"trial {failed} was cut short by the machine: retried (attempt {attempt})")
    already = hpo.finished_count(study)
    if already:
        log(
            f"study {study.study_name!r} resumed with {already} finished trials; "
            f"{max(target - already, 0)} to run"
        )
    counts = progress.TrialProgress(study=study.study_name, target=target)
    for t in study.get_trials(deepcopy=False):
        state = t.state.name
        counts.complete += state == "COMPLETE"
        counts.pruned += state == "PRUNED"
        counts.failed += state == "FAIL"

    def refresh() -> None:
        best = hpo.best_trial(study, settings.hpo.select)
        if best is not None:
            counts.best_value, counts.best_params = best.values[0], dict(best.params)
        progress.publish(counts)

    def room() -> bool:
        # Re-read before each ask: another run may share the study.
        if getattr(study.sampler, "exhausted", False):
            return False  # grid or bruteforce: every configuration was tried
        return hpo.taken_count(study) < target

    refresh()
    in_flight: dict[Any, tuple[Any, TrialSpec]] = {}
    trial_dirs: list[str] = []
    trainable_mod.clear_stop()

    def stopping() -> str | None:
        why = trainable_mod.checkpoint_requested()
        if why is None and stop_file and Path(stop_file).exists():
            why = Path(stop_file).read_text(encoding="utf-8").strip() or "its job ends soon"
            trainable_mod.request_checkpoint(why)
        return why

    beats = _heartbeats(study, in_flight).start()
    try:
        while in_flight or (room() and not stopping()):
            while len(in_flight) < settings.cluster.workers and room() and not stopping():
                trial = study.ask()
                trial.set_user_attr("flow_run_id", flow_run_id)
                trial.set_user_attr(hpo.HEARTBEAT_ATTR, time.time())
                if _surplus(study, trial.number, target):
                    # Two runs asked at once and the study is full: this trial never runs.
                    trial.set_user_attr("reason", f"surplus: the study already has {target}")
                    trial.set_user_attr(hpo.INFRA_ATTR, True)
                    trial.set_user_attr(hpo.SURPLUS_ATTR, True)
                    study.tell(trial, state=_fail_state())
                    break
                attrs = trial.user_attrs
                checkpoint = attrs.get(hpo.CHECKPOINT_ATTR) or str(
                    hpo.checkpoint_folder(experiment_dir, study.study_name, trial.number)
                )
                trial.set_user_attr(hpo.CHECKPOINT_ATTR, checkpoint)
                report_study, report_trial_id = study.study_name, trial._trial_id
                if twin is not None:
                    twin_trial = twin.ask()
                    trial.set_user_attr(hpo.TWIN_ATTR, twin_trial.number)
                    report_study, report_trial_id = twin.study_name, twin_trial._trial_id
                spec = TrialSpec(
                    number=trial.number,
                    trial_id=trial._trial_id,
                    params={**settings.params, **space.suggest(trial)},
                    run_dir=str(trial_dir(experiment_dir, trial.number)),
                    checkpoint_dir=checkpoint,
                    stop_file=stop_file,
                    retry_of=attrs.get(hpo.RETRY_OF_ATTR),
                    report_study=report_study,
                    report_trial_id=report_trial_id,
                )
                if spec.retry_of is not None:
                    log(f"trial {spec.number} resumes trial {spec.retry_of} from {checkpoint}")
                trial_dirs.append(spec.run_dir)
                in_flight[launcher.start(spec)] = (trial, spec)
                counts.running = len(in_flight)
                refresh()
            if not in_flight:
                break
            handle = launcher.next_finished(list(in_flight))
            trial, spec = in_flight.pop(handle)
            result: RunResult | None = None
            constraints = settings.hpo.constraints
            try:
                result = launcher.result(handle)
            except Exception as exc:  # noqa: BLE001 - a lost worker fails one trial, not the study
                outcome = hpo.tell_result(study, trial, None, objectives, error=str(exc))
            else:
                outcome = hpo.tell_result(study, trial, result, objectives, constraints=constraints)
            if twin is not None:
                primary = hpo.trial_metrics(result).get(objectives[0]) if result else None
                hpo.tell_twin(twin, trial.user_attrs[hpo.TWIN_ATTR], outcome, primary)
            if on_told is not None:
                on_told(spec, result, outcome)
            if outcome == "fail":
                told = study._storage.get_trial(trial._trial_id)
                for failed, attempt in hpo.enqueue_retries(study, settings.hpo.retries, [told]):
                    log(
                        f"trial {failed} was cut short by the machine "
                        f"({told.user_attrs.get('reason', '')}): retried (attempt {attempt})"
                    )
            counts.complete += outcome == "complete"
            counts.pruned += outcome == "pruned"
            counts.failed += outcome == "fail"
            counts.running = len(in_flight)
            refresh()
            log(counts.line())
    except BaseException:
        # The run is ending (cancelled, crashed, interrupted): trials running in threads
        # stop at their next report instead of holding the process open.
        trainable_mod.request_stop()
        raise
    finally:
        beats.stop()
    why = stopping()
    if why is not None and room():
        raise JobEnding(
            f"the HPO stage stopped early ({why}): {counts.line()}; the trials it cut saved "
            "checkpoints and resume when the flow run is requeued or run again"
        )
    return counts, trial_dirs


def _fail_state() -> Any:
    import optuna

    return optuna.trial.TrialState.FAIL


def _surplus(study: Any, number: int, target: int) -> bool:
    """Whether trials numbered before ``number`` already fill the study (counting those
    finished and those running), so that this one would overshoot ``n_trials``."""
    taken = 0
    for t in study.get_trials(deepcopy=False):
        if t.number >= number or t.user_attrs.get(hpo.INFRA_ATTR):
            continue
        if t.state.name == "RUNNING" or t.state.name in hpo.FINISHED_STATES:
            taken += 1
    return taken >= target


def _heartbeats(study: Any, in_flight: dict[Any, tuple[Any, TrialSpec]]) -> Ticker:
    """Renews the heartbeat of this run's running trials, and fails other runs' trials
    whose heartbeat stopped, every ``HEARTBEAT_S`` seconds."""

    def tick() -> None:
        now = time.time()
        for trial, _ in list(in_flight.values()):
            trial.set_user_attr(hpo.HEARTBEAT_ATTR, now)
        hpo.fail_stale_trials(study, now=now, stale_after=hpo.STALE_AFTER_S)

    return Ticker(hpo.HEARTBEAT_S, tick, "expflow-heartbeat")


def conclude(
    settings: PipelineSettings,
    study: Any,
    storage: str,
    counts: progress.TrialProgress,
    trial_dirs: list[str],
    report_dir: Path,
) -> StudyOutcome:
    """The study's trials table, its HTML report and its best trial; no success is an error."""
    rows = hpo.trials_table(study)
    best = hpo.best_trial(study, settings.hpo.select)
    names = [metric for metric, _ in settings.objective_list]
    several = len(names) > 1
    extra = {
        "objective" + ("s" if several else ""): ", ".join(
            f"{m} ({d})" for m, d in settings.objective_list
        ),
        "sampler": _algorithm(study, "sampler"),
        "pruner": _algorithm(study, "pruner"),
        "storage": storage,
    }
    if several:
        extra["chosen by"] = settings.hpo.select
    if settings.hpo.constraints:
        extra["constraints"] = ", ".join(settings.hpo.constraints)
    report = write_study_report(
        study,
        report_dir / f"report-{study.study_name}.html",
        title=f"HPO report: {study.study_name}",
        extra=extra,
        chosen=best.number if best is not None else None,
        feasible=hpo.is_feasible,
    )
    if best is None:
        infeasible = sum(1 for t in study.get_trials(deepcopy=False) if not hpo.is_feasible(t))
        raise ExpflowError(
            f"no trial of study {study.study_name!r} succeeded ({counts.failed} failed, "
            f"{counts.pruned} pruned"
            + (f", {infeasible} infeasible" if infeasible else "")
            + "); see the trials table and each trial's output.log"
        )
    pareto = []
    if several:
        for t in hpo.pareto_front(study):
            pareto.append(
                {
                    "trial": t.number,
                    **dict(zip(names, t.values, strict=True)),
                    **{f"param:{k}": v for k, v in t.params.items()},
                    "chosen": t.number == best.number,
                }
            )
    return StudyOutcome(
        study=study.study_name,
        storage=storage,
        best_trial=best.number,
        best_value=best.values[0],
        best_params=dict(best.params),
        best_values=dict(zip(names, best.values, strict=True)),
        pareto=pareto,
        select=settings.hpo.select,
        complete=counts.complete,
        pruned=counts.pruned,
        failed=counts.failed,
        trials=rows,
        report=str(report),
        trial_dirs=trial_dirs,
    )


def _algorithm(study: Any, what: str) -> str:
    spec = study.user_attrs.get(f"expflow:{what}") or {}
    options = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec.get('name', '?')}" + (f" ({options})" if options else "")


def fail_abandoned_trials(
    study: Any, current_run: str, ended: Callable[[str], str | None]
) -> dict[str, list[int]]:
    """Fail trials left running by another run that has ended (killed, crashed).

    ``ended(run_id)`` names the final state of that run, or None while it still runs
    (or when it is not known). Returns the trials failed, by run.
    """
    failed: dict[str, list[int]] = {}
    for run_id, numbers in hpo.running_trials_by_run(study).items():
        if run_id == current_run:
            # This run starts again (its job was requeued, or it was retried): what it had
            # running belonged to the attempt that ended.
            hpo.fail_abandoned(
                study, numbers, f"abandoned: an earlier attempt of flow run {run_id} ended"
            )
            failed[run_id] = numbers
            continue
        state = ended(run_id)
        if state:
            hpo.fail_abandoned(study, numbers, f"abandoned: flow run {run_id} ended {state}")
            failed[run_id] = numbers
    return failed
