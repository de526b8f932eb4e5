"""Hyperparameter search with Optuna's ask/tell: studies, pruning hooks and the trial table.

Studies live in persistent storage so a second run resumes the first: a plain
path is an Optuna journal file (safe for several processes, and for NFS), and
anything with a URL scheme (``sqlite:///…``, ``postgresql://…``) is handed to
Optuna as an RDB storage URL.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expflow_flows.errors import ExpflowError
from expflow_flows.home import default_optuna_storage
from expflow_flows.runs.trainable import ReportHook, RunResult, is_machine_failure

if TYPE_CHECKING:
    import optuna

    from expflow_flows.hpo.space import SearchSpace

URL_RE = re.compile(r"^[a-z][a-z0-9+]*://", re.IGNORECASE)

# Trials finished in any of these states count towards ``n_trials`` (but see INFRA_ATTR).
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
# A trial failed by the machine, not by its parameters (a full disk, a lost worker, a killed
# process, a surplus trial of two runs sharing the study) carries this user attribute and does
# not use up ``n_trials``: a re-run finishes the study.
INFRA_ATTR = "infrastructure_failure"
# Every running trial's heartbeat (a Unix time user attribute), renewed by the run that owns it.
HEARTBEAT_ATTR = "heartbeat"
HEARTBEAT_S = 15.0
# A running trial whose heartbeat is older than this is dead (its process was killed).
STALE_AFTER_S = 90.0
# A trial's checkpoint folder (user attribute), kept by its retries so they resume from it.
CHECKPOINT_ATTR = "checkpoint_dir"
RETRY_OF_ATTR = "retry_of"  # the number of the trial a retry continues
ATTEMPT_ATTR = "attempt"  # retries used so far by the trial's line (0: the first try)
SURPLUS_ATTR = "surplus"  # never ran: two runs asked at once and the study was full
WARM_START_ATTR = "warm_start"  # where a warm-start trial's configuration came from


def is_infrastructure_failure(reason: str) -> bool:
    """Whether a failure's reason says the machine failed (disk, lost worker, killed)."""
    return is_machine_failure(reason)


def resolve_storage(storage: str | None) -> str:
    """The storage to use: given, else the journal file under the expflow home."""
    return storage or default_optuna_storage()


def open_storage(storage: str | None) -> Any:
    """An Optuna storage object (journal file for a path, RDB for a URL)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    target = resolve_storage(storage)
    if URL_RE.match(target):
        try:
            return optuna.storages.RDBStorage(target)
        except Exception as exc:  # noqa: BLE001 - any driver error is the user's URL
            raise ExpflowError(f"Optuna storage {target!r} cannot be opened: {exc}") from None
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(path)
    repair_journal(path)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def repair_journal(journal: Path) -> int:
    """Cut a journal's unfinished last line (a write cut short by a full disk or a kill),
    which Optuna cannot parse, so the study opens again; returns the bytes cut.

    Skipped while another process holds the journal's lock (it may be mid-append)."""
    if Path(str(journal) + ".lock").is_symlink() or Path(str(journal) + ".lock").exists():
        return 0
    try:
        with open(journal, "rb+") as f:
            size = f.seek(0, 2)
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            keep = 0
            chunk = 1 << 16
            pos = size
            while pos > 0 and not keep:
                start = max(0, pos - chunk)
                f.seek(start)
                block = f.read(pos - start)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                pos = start
            f.truncate(keep)
            return size - keep
    except FileNotFoundError:
        return 0


# The journal's lock is held for the milliseconds one append takes; one older than this
# was left by a process killed while holding it (Optuna itself waits 30 s before breaking it).
STALE_LOCK_S = 3.0


def clear_stale_lock(journal: Path, *, now: float | None = None) -> bool:
    """Remove the journal's lock file when a killed process left it; True when removed."""
    lock = Path(str(journal) + ".lock")
    try:
        age = (time.time() if now is None else now) - lock.lstat().st_mtime
    except FileNotFoundError:
        return False
    if age <= STALE_LOCK_S:
        return False
    try:
        lock.unlink()
    except FileNotFoundError:
        return False  # its holder released it meanwhile
    return True


def make_pruner(spec: dict[str, Any] | str | None) -> Any:
    """An Optuna pruner from its stored mapping or name (see :mod:`.algorithms`)."""
    from expflow_flows.hpo.algorithms import make_pruner as build

    return build(spec)


def open_study(
    storage: str | None,
    study_name: str,
    *,
    direction: str = "minimize",
    directions: list[str] | None = None,
    pruner: dict[str, Any] | str | None = "median",
    sampler: dict[str, Any] | str | None = None,
    seed: int | None = None,
    space: SearchSpace | None = None,
    metric_names: list[str] | None = None,
    constraints: list[str] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> optuna.Study:
    """Create the study, or load it when it exists so that a second run resumes it.

    A new study stores its sampler and pruner; a resumed one keeps those it was created
    with (a different choice now is named in ``log``). ``directions`` (two or more) make
    it multi-objective; its metric names label plots and optuna-dashboard's axes.
    """
    import optuna

    from expflow_flows.hpo import algorithms

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = list(directions or [direction])
    store = open_storage(storage)
    asked = {
        algorithms.SAMPLER_ATTR: _as_spec(sampler, algorithms.DEFAULT_SAMPLER),
        algorithms.PRUNER_ATTR: _as_spec(pruner, algorithms.DEFAULT_PRUNER),
    }
    for attempt in range(3):
        try:
            study = optuna.create_study(
                storage=store,
                study_name=study_name,
                directions=directions,
                load_if_exists=True,
            )
            break
        except Exception:  # noqa: BLE001 - two runs creating one study at once: load the winner's
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    existing = [d.name.lower() for d in study.directions]
    if existing != directions:
        raise ExpflowError(
            f"study {study_name!r} already exists with direction{'s' if len(existing) > 1 else ''}"
            f" {', '.join(existing)}; asked for {', '.join(directions)} (use another study_name)"
        )
    kept = _keep_or_store(study, asked, log)
    if metric_names and study.metric_names != list(metric_names):
        study.set_metric_names(list(metric_names))
    study.sampler = algorithms.make_sampler(
        kept[algorithms.SAMPLER_ATTR],
        seed=seed,
        space=space,
        constraints=constraints_func(constraints) if constraints else None,
        objectives=len(directions),
    )
    study.pruner = algorithms.make_pruner(kept[algorithms.PRUNER_ATTR])
    study.sampler.opened_with = len(study.get_trials(deepcopy=False))
    if len(directions) > 1:
        _prune_twin(store, study_name, directions[0], kept[algorithms.PRUNER_ATTR])
    return study


def _as_spec(value: dict[str, Any] | str | None, default: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return dict(default)
    return {"name": value} if isinstance(value, str) else dict(value)


def _keep_or_store(
    study: optuna.Study, asked: dict[str, dict[str, Any]], log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """The study's stored sampler and pruner; a study without them stores those asked."""
    attrs = study.user_attrs
    kept: dict[str, dict[str, Any]] = {}
    for key, spec in asked.items():
        stored = attrs.get(key)
        if stored is None:
            study.set_user_attr(key, spec)
            kept[key] = spec
            continue
        kept[key] = dict(stored)
        if stored != spec:
            what = key.split(":", 1)[1]
            log(
                f"study {study.study_name!r} keeps the {what} it was created with "
                f"({_describe(stored)}), not {_describe(spec)}; use another study_name "
                f"to change it"
            )
    return kept


def _describe(spec: dict[str, Any]) -> str:
    return spec.get("name", "?") + (" with other options" if len(spec) > 1 else "")


PRUNE_TWIN_SUFFIX = ":prune"


def prune_twin_name(study_name: str) -> str:
    """Optuna prunes single-objective studies only: a multi-objective study's trials
    report their first objective to twin trials in this study, whose pruner decides."""
    return study_name + PRUNE_TWIN_SUFFIX


def _prune_twin(store: Any, study_name: str, direction: str, pruner: dict[str, Any]) -> Any:
    import optuna

    from expflow_flows.hpo import algorithms

    twin = optuna.create_study(
        storage=store,
        study_name=prune_twin_name(study_name),
        direction=direction,
        load_if_exists=True,
    )
    if twin.user_attrs.get(algorithms.PRUNER_ATTR) is None:
        twin.set_user_attr(algorithms.PRUNER_ATTR, pruner)
    return twin


def load_study(
    storage: str | None, study_name: str, pruner: dict[str, Any] | str | None = None
) -> optuna.Study:
    """Load an existing study (in another process, e.g. a Dask worker) with the pruner it
    stores (``pruner`` only for a study that stores none)."""
    import optuna

    from expflow_flows.hpo import algorithms

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    stored = study.user_attrs.get(algorithms.PRUNER_ATTR)
    study.pruner = algorithms.make_pruner(stored if stored is not None else pruner)
    return study


# --- constraints: 'metric:op:value', like gates, as Optuna's constraint values -------------

CONSTRAINTS_ATTR = "expflow:constraints"  # the trial's constraint values (<= 0: met)
FEASIBLE_ATTR = "feasible"
# A metric a constraint needs and the trial did not report: the constraint is not met.
UNMET = 1.0e30


def constraint_values(constraints: list[str], metrics: dict[str, float]) -> list[float]:
    """One value per constraint, Optuna's way: zero or less when the constraint is met."""
    from expflow_flows.metrics.gates import parse_gates

    values = []
    for gate in parse_gates(constraints):
        value = metrics.get(gate.metric)
        if value is None or not math.isfinite(value):
            values.append(UNMET)
            continue
        t = gate.threshold
        gap = {
            "lt": value - t if value < t else max(value - t, 1e-12),
            "le": value - t,
            "gt": t - value if value > t else max(t - value, 1e-12),
            "ge": t - value,
            "eq": abs(value - t),
            "ne": 0.0 if value != t else 1.0,
        }[gate.op]
        values.append(float(gap))
    return values


def constraints_func(constraints: list[str]) -> Callable[[Any], list[float]]:
    """Optuna's ``constraints_func``: the values the trial's tell recorded."""
    count = len(constraints)

    def func(trial: Any) -> list[float]:
        return list(trial.user_attrs.get(CONSTRAINTS_ATTR) or [UNMET] * count)

    return func


def is_feasible(trial: Any) -> bool:
    """A trial without constraints, or whose constraints were all met."""
    return bool(trial.user_attrs.get(FEASIBLE_ATTR, True))


def finished_count(study: optuna.Study) -> int:
    """Trials that ended (complete, pruned or failed by their parameters): they count
    towards ``n_trials``; a trial the machine failed (INFRA_ATTR) does not."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state.name in FINISHED_STATES and not t.user_attrs.get(INFRA_ATTR)
    )


def taken_count(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials`` now: finished ones and running ones."""
    return finished_count(study) + sum(
        1 for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
    )


def fail_stale_trials(study: optuna.Study, *, now: float, stale_after: float) -> list[int]:
    """Fail running trials whose heartbeat stopped (their process was killed); they are
    infrastructure failures and do not use up ``n_trials``. Returns their numbers."""
    stale = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "RUNNING":
            continue
        beat = t.user_attrs.get(HEARTBEAT_ATTR)
        if beat is None and t.datetime_start is not None:
            beat = t.datetime_start.timestamp()
        if beat is not None and now - float(beat) > stale_after:
            stale.append(t.number)
    if stale:
        fail_abandoned(
            study,
            stale,
            f"its process stopped: no heartbeat for over {stale_after:g} s",
            infrastructure=True,
        )
    return stale


def running_trials_by_run(study: optuna.Study) -> dict[str, list[int]]:
    """Trials still marked running, by the flow-run id that started them."""
    out: dict[str, list[int]] = {}
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get("flow_run_id")
        if t.state.name == "RUNNING" and run_id:
            out.setdefault(run_id, []).append(t.number)
    return out


def fail_abandoned(
    study: optuna.Study, numbers: list[int], reason: str, *, infrastructure: bool = True
) -> None:
    """Mark trials whose run is gone as failed, so they stop looking alive; a run that
    died is the machine's failure, so by default they do not use up ``n_trials``."""
    import optuna

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in numbers:
        trial = by_number[number]
        study._storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        if infrastructure:
            study._storage.set_trial_user_attr(trial._trial_id, INFRA_ATTR, True)
        try:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        except (RuntimeError, ValueError):
            pass  # another run told it first


def report_hook(
    storage: str | None, study_name: str, trial_id: int, objective: str, pruner: str
) -> ReportHook:
    """A hook that reports the objective's intermediate values to the study and asks the pruner."""
    import optuna

    state: dict[str, Any] = {}

    def hook(step: int, values: dict[str, float]) -> bool:
        if objective not in values or not math.isfinite(values[objective]):
            return False
        if "trial" not in state:
            study = load_study(storage, study_name, pruner)
            state["trial"] = optuna.trial.Trial(study, trial_id)
        trial = state["trial"]
        trial.report(values[objective], step)
        return bool(trial.should_prune())

    return hook


# Metrics every trial has, whether or not its trainable reports them.
DERIVED_METRICS = {"train_time_s": "the trial's wall time in seconds"}


def trial_metrics(result: RunResult) -> dict[str, float]:
    """The trial's metrics, with ``train_time_s`` (its wall time) unless it reports one."""
    return {"train_time_s": float(result.wall_s), **result.metrics}


def tell_result(
    study: optuna.Study,
    trial: optuna.trial.Trial,
    result: RunResult | None,
    objective: str | list[str],
    *,
    error: str = "",
    constraints: list[str] | None = None,
) -> str:
    """Tell the study how a trial ended; returns its state (complete, pruned, fail).

    ``objective`` names the metric, or one per objective of a multi-objective study.
    With ``constraints`` the trial records their values and whether it is feasible.
    """
    import optuna

    TrialState = optuna.trial.TrialState
    objectives = [objective] if isinstance(objective, str) else list(objective)
    if result is not None:
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("status", result.status)
        for key, value in result.metrics.items():
            if math.isfinite(value):
                trial.set_user_attr(f"metric:{key}", value)
    if result is None:
        reason = error or "the trial's task did not return"
        trial.set_user_attr("reason", reason)
        trial.set_user_attr(INFRA_ATTR, True)  # a lost worker, not the parameters
        study.tell(trial, state=TrialState.FAIL)
        return "fail"
    if result.status == "pruned":
        trial.set_user_attr("reason", result.reason)
        study.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    if not result.ok:
        trial.set_user_attr("reason", result.reason)
        if is_infrastructure_failure(result.reason):
            trial.set_user_attr(INFRA_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
        return "fail"
    metrics = trial_metrics(result)
    values = []
    for name in objectives:
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            known = ", ".join(sorted(result.metrics)) or "none"
            reason = f"objective metric {name!r} " + (
                "is not finite" if value is not None else f"was not reported (reported: {known})"
            )
            trial.set_user_attr("reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            return "fail"
        values.append(value)
    if constraints:
        gaps = constraint_values(constraints, metrics)
        trial.set_user_attr(CONSTRAINTS_ATTR, gaps)
        trial.set_user_attr(FEASIBLE_ATTR, all(g <= 0 for g in gaps))
        if not all(g <= 0 for g in gaps):
            unmet = [c for c, g in zip(constraints, gaps, strict=True) if g > 0]
            trial.set_user_attr("reason", "infeasible: " + ", ".join(unmet) + " not met")
    study.tell(trial, values if len(values) > 1 else values[0])
    return "complete"


TWIN_ATTR = "expflow:prune_twin"  # the twin trial's number in the prune twin study


def open_twin(study: optuna.Study) -> optuna.Study | None:
    """The prune twin of a multi-objective study (None for one objective)."""
    if len(study.directions) < 2:
        return None
    import optuna

    return optuna.load_study(study_name=prune_twin_name(study.study_name), storage=study._storage)


def tell_twin(twin: optuna.Study, number: int, outcome: str, value: float | None) -> None:
    """End the twin trial as its multi-objective trial ended, so the pruner compares
    later trials with it."""
    import optuna

    TrialState = optuna.trial.TrialState
    try:
        if outcome == "complete" and value is not None:
            twin.tell(number, value)
        else:
            twin.tell(number, state=TrialState.PRUNED if outcome == "pruned" else TrialState.FAIL)
    except (RuntimeError, ValueError):
        pass  # told already (a retry, another run)


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, params, run folder and failure reason."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if len(study.directions) > 1:
            names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
            values = {
                f"value:{n}": (t.values[i] if t.values else None) for i, n in enumerate(names)
            }
        else:
            values = {"value": t.value}
        extra = {}
        if any(CONSTRAINTS_ATTR in u.user_attrs for u in trials):
            extra["feasible"] = is_feasible(t) if CONSTRAINTS_ATTR in t.user_attrs else ""
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                **values,
                **extra,
                "source": t.user_attrs.get(WARM_START_ATTR, ""),
                **{f"param:{k}": v for k, v in t.params.items()},
                "reason": t.user_attrs.get("reason", ""),
                "retry_of": t.user_attrs.get(RETRY_OF_ATTR, ""),
                "run_dir": t.user_attrs.get("run_dir", ""),
            }
        )
    return rows


def best_trial(study: optuna.Study, select: str = "primary") -> optuna.trial.FrozenTrial | None:
    """The trial the study chose, or None when no feasible trial completed.

    One objective: the best feasible completed trial. Several: a trial of the Pareto
    front of feasible trials, by ``select`` (see :func:`choose`).
    """
    front = pareto_front(study)
    if not front:
        return None
    return choose(front, [d.name.lower() for d in study.directions], select)


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed feasible trials that no other one beats on every objective (one objective:
    the best, ties included), by trial number."""
    directions = [d.name.lower() for d in study.directions]
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and t.values and is_feasible(t)
    ]
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    if len(directions) == 1:  # linear: the loop asks for the best after every trial
        best = min((signs[0] * t.values[0] for t in done), default=None)
        return [t for t in done if signs[0] * t.values[0] == best]
    keyed = [(t, [s * v for s, v in zip(signs, t.values, strict=True)]) for t in done]
    front = []
    for t, a in keyed:
        dominated = any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for _, b in keyed)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.number)


def choose(front: list[Any], directions: list[str], select: str) -> Any:
    """The trial of a Pareto front that is trained: ``primary`` (best first objective,
    then the next ones) or ``knee`` (closest to the ideal point once each objective is
    scaled to the front's range; ties go to the lower trial number)."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]

    def scaled(t: Any) -> list[float]:
        return [s * v for s, v in zip(signs, t.values, strict=True)]

    if select == "knee" and len(directions) > 1:
        points = [scaled(t) for t in front]
        lows = [min(p[i] for p in points) for i in range(len(directions))]
        highs = [max(p[i] for p in points) for i in range(len(directions))]

        def distance(t: Any) -> tuple[float, int]:
            p = scaled(t)
            norm = [
                (p[i] - lows[i]) / (highs[i] - lows[i]) if highs[i] > lows[i] else 0.0
                for i in range(len(p))
            ]
            return math.sqrt(sum(x * x for x in norm)), t.number

        return min(front, key=distance)
    return min(front, key=lambda t: (*scaled(t), t.number))


def checkpoint_folder(experiment_dir: Path, study_name: str, number: int) -> Path:
    """Where trial ``number`` of a study (and every retry of it) keeps its checkpoints."""
    return experiment_dir / "checkpoints" / f"{study_name}-t{number:04d}"


def enqueue_retries(
    study: optuna.Study, max_retries: int, trials: list[Any] | None = None
) -> list[tuple[int, int]]:
    """Enqueue a retry of each trial the machine failed (killed, lost worker, stopped for a
    time limit) that has none yet: same parameters, same checkpoint folder, so it resumes.

    A trial stopped for a time limit or a preemption does not use up a retry; any other
    machine failure does, up to ``max_retries``. ``trials`` limits the look to those
    (default: every trial). Returns (failed trial, its retry's attempt) pairs.
    """
    import optuna

    everything = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF_ATTR) for t in everything}
    queued: list[tuple[int, int]] = []
    for t in trials if trials is not None else everything:
        if t.state != optuna.trial.TrialState.FAIL or t.number in retried:
            continue
        attrs = t.user_attrs
        if not attrs.get(INFRA_ATTR) or attrs.get(SURPLUS_ATTR):
            continue
        planned = "stopped to be resumed" in str(attrs.get("reason", "")).lower()
        attempt = int(attrs.get(ATTEMPT_ATTR, 0)) + (0 if planned else 1)
        if attempt > max_retries:
            continue
        user_attrs = {RETRY_OF_ATTR: t.number, ATTEMPT_ATTR: attempt}
        if attrs.get(CHECKPOINT_ATTR):
            user_attrs[CHECKPOINT_ATTR] = attrs[CHECKPOINT_ATTR]
        study.enqueue_trial(dict(t.params), user_attrs=user_attrs)
        queued.append((t.number, attempt))
    return queued
