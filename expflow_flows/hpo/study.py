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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expflow_flows.errors import ExpflowError
from expflow_flows.home import default_optuna_storage
from expflow_flows.runs.trainable import ReportHook, RunResult

if TYPE_CHECKING:
    import optuna

URL_RE = re.compile(r"^[a-z][a-z0-9+]*://", re.IGNORECASE)

# Trials finished in any of these states count towards ``n_trials``.
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")


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
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_pruner(name: str) -> Any:
    """An Optuna pruner by name: ``median`` (after 5 trials and 5 steps) or ``none``."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ExpflowError(f"pruner {name!r} is not known; expected median or none")


def open_study(
    storage: str | None,
    study_name: str,
    *,
    direction: str = "minimize",
    pruner: str = "median",
    seed: int | None = None,
) -> optuna.Study:
    """Create the study, or load it when it exists so that a second run resumes it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=5)
    store = open_storage(storage)
    for attempt in range(3):
        try:
            study = optuna.create_study(
                storage=store,
                study_name=study_name,
                direction=direction,
                sampler=sampler,
                pruner=make_pruner(pruner),
                load_if_exists=True,
            )
            break
        except Exception:  # noqa: BLE001 - two runs creating one study at once: load the winner's
            if attempt == 2:
                raise
            time.sleep(0.5 * (attempt + 1))
    existing = study.direction.name.lower()
    if existing != direction:
        raise ExpflowError(
            f"study {study_name!r} already exists with direction {existing}; "
            f"asked for {direction} (use another study_name)"
        )
    return study


def load_study(storage: str | None, study_name: str, pruner: str = "median") -> optuna.Study:
    """Load an existing study (in another process, e.g. a Dask worker)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(
        study_name=study_name, storage=open_storage(storage), pruner=make_pruner(pruner)
    )


def finished_count(study: optuna.Study) -> int:
    """Trials that ended (complete, pruned or failed): they count towards ``n_trials``."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in FINISHED_STATES)


def running_trials_by_run(study: optuna.Study) -> dict[str, list[int]]:
    """Trials still marked running, by the flow-run id that started them."""
    out: dict[str, list[int]] = {}
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get("flow_run_id")
        if t.state.name == "RUNNING" and run_id:
            out.setdefault(run_id, []).append(t.number)
    return out


def fail_abandoned(study: optuna.Study, numbers: list[int], reason: str) -> None:
    """Mark trials whose run is gone as failed, so they stop looking alive."""
    import optuna

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in numbers:
        trial = by_number[number]
        study._storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        study.tell(number, state=optuna.trial.TrialState.FAIL)


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


def tell_result(
    study: optuna.Study,
    trial: optuna.trial.Trial,
    result: RunResult | None,
    objective: str,
    *,
    error: str = "",
) -> str:
    """Tell the study how a trial ended; returns its state (complete, pruned, fail)."""
    import optuna

    TrialState = optuna.trial.TrialState
    if result is not None:
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("status", result.status)
        for key, value in result.metrics.items():
            if math.isfinite(value):
                trial.set_user_attr(f"metric:{key}", value)
    if result is None:
        reason = error or "the trial's task did not return"
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        return "fail"
    if result.status == "pruned":
        trial.set_user_attr("reason", result.reason)
        study.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    if not result.ok:
        trial.set_user_attr("reason", result.reason)
        study.tell(trial, state=TrialState.FAIL)
        return "fail"
    value = result.metrics.get(objective)
    if value is None or not math.isfinite(value):
        known = ", ".join(sorted(result.metrics)) or "none"
        reason = f"objective metric {objective!r} " + (
            "is not finite" if value is not None else f"was not reported (reported: {known})"
        )
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        return "fail"
    study.tell(trial, value)
    return "complete"


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, params, run folder and failure reason."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                **{f"param:{k}": v for k, v in t.params.items()},
                "reason": t.user_attrs.get("reason", ""),
                "run_dir": t.user_attrs.get("run_dir", ""),
            }
        )
    return rows


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best completed trial, or None when no trial completed."""
    completed = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not completed:
        return None
    return study.best_trial
