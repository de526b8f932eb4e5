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
from expflow_flows.runs.trainable import ReportHook, RunResult, is_machine_failure

if TYPE_CHECKING:
    import optuna

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
    sampler = _sampler(seed)
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
    study.sampler.opened_with = len(study.get_trials(deepcopy=False))
    existing = study.direction.name.lower()
    if existing != direction:
        raise ExpflowError(
            f"study {study_name!r} already exists with direction {existing}; "
            f"asked for {direction} (use another study_name)"
        )
    return study


def _sampler(seed: int | None) -> Any:
    """TPE seeded once, whose random stream is re-seeded per trial where replaying it would
    repeat trials: in a resumed study, and when another run shares the study.

    A sampler seeded once replays the same stream in every process: a resumed study asked
    its first trials' parameters again, and two runs sharing a study asked the same ones.
    A fresh study asked by one run keeps the plain seeded stream (the same trials for the
    same seed as ever); any other trial gets a stream seeded from the seed and its number,
    which is unique in the study.
    """
    import optuna

    class TrialSeededTPESampler(optuna.samplers.TPESampler):
        opened_with = 0  # trials the study held when this run opened it
        asked = 0  # trials this sampler was asked for

        def before_trial(self, study: optuna.Study, trial: Any) -> None:
            in_sequence = self.opened_with == 0 and trial.number == self.asked
            self.asked += 1
            if seed is not None and not in_sequence:
                derived = (int(seed) * 1_000_003 + int(trial.number) * 7_919 + 1) % (2**32)
                for owner in (self, getattr(self, "_random_sampler", None)):
                    rng = getattr(owner, "_rng", None)
                    if rng is not None and hasattr(rng, "rng"):
                        rng.rng.seed(derived)
            super().before_trial(study, trial)

    return TrialSeededTPESampler(seed=seed, constant_liar=True, n_startup_trials=5)


def load_study(storage: str | None, study_name: str, pruner: str = "median") -> optuna.Study:
    """Load an existing study (in another process, e.g. a Dask worker)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(
        study_name=study_name, storage=open_storage(storage), pruner=make_pruner(pruner)
    )


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
                "retry_of": t.user_attrs.get(RETRY_OF_ATTR, ""),
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
