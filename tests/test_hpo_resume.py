"""HPO under resume, sharing and crashes: a resumed or shared study never repeats a
configuration because of its seed, never overshoots n_trials, fails the trials of a killed
run by their stopped heartbeat, and does not count the machine's failures as trials."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from expflow_flows.hpo import loop
from expflow_flows.hpo import study as hpo
from expflow_flows.hpo.space import SearchSpace
from expflow_flows.runs.trainable import RunResult
from expflow_flows.settings.pipeline import load_pipeline_settings

SPACE = {
    "x": {"type": "float", "low": 0.0, "high": 4.0},
    "n": {"type": "int", "low": 1, "high": 50},
}


def settings(n_trials: int, workers: int = 2):
    return load_pipeline_settings(
        overrides={
            "experiment": "resume",
            "train": {"target": "sample_trainables:quadratic"},
            "space": SPACE,
            "objective": "loss",
            "hpo": {"n_trials": n_trials, "seed": 0, "pruner": "none"},
            "cluster": {"kind": "threads", "workers": workers},
        }
    )


class Launcher:
    """Trials in a thread pool; ``fail_first`` results say the disk was full."""

    def __init__(self, fail_first: int = 0) -> None:
        self.pool = ThreadPoolExecutor(4)
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def _run(self, spec: loop.TrialSpec) -> RunResult:
        time.sleep(0.05)
        with self.lock:
            full = self.fail_first > 0
            self.fail_first -= 1
        if full:
            reason = "callable raised OSError: [Errno 28] No space left on device"
            return RunResult(Path(spec.run_dir), "failed", {}, reason)
        loss = (spec.params["x"] - 2.0) ** 2
        return RunResult(Path(spec.run_dir), "ok", {"loss": loss})

    def start(self, spec):
        return self.pool.submit(self._run, spec)

    def next_finished(self, handles):
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return next(iter(done))

    def result(self, handle):
        return handle.result()


def ask_params(study, n: int) -> list[dict]:
    space = SearchSpace.load(SPACE)
    out = []
    for _ in range(n):
        trial = study.ask()
        params = space.suggest(trial)
        study.tell(trial, (params["x"] - 2.0) ** 2)
        out.append(params)
    return out


def test_a_resumed_study_asks_new_parameters_and_a_fresh_one_the_same(tmp_path):
    journal = str(tmp_path / "journal.log")
    first = ask_params(hpo.open_study(journal, "s", seed=0), 2)
    resumed = ask_params(hpo.open_study(journal, "s", seed=0), 2)  # a second run resumes it
    assert not any(p in first for p in resumed), (first, resumed)
    # Seeds still reproduce: a fresh study with the same seed asks the same first trials.
    again = ask_params(hpo.open_study(str(tmp_path / "other.log"), "s", seed=0), 2)
    assert again == first


def test_two_runs_sharing_a_study_stop_at_n_trials_without_repeats(tmp_path):
    journal = str(tmp_path / "journal.log")
    cfg = settings(n_trials=4)
    errors: list[BaseException] = []
    both_open = threading.Barrier(2)  # the two runs start together, as two processes can

    def one_run(i: int) -> None:
        try:
            study = hpo.open_study(journal, "shared", seed=0, pruner="none")
            both_open.wait(timeout=30)
            loop.run_study(cfg, study, Launcher(), tmp_path / f"run{i}", flow_run_id=f"r{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    runs = [threading.Thread(target=one_run, args=(i,)) for i in range(2)]
    for r in runs:
        r.start()
    for r in runs:
        r.join()
    assert errors == []
    study = hpo.open_study(journal, "shared", seed=0)
    counted = [
        t
        for t in study.trials
        if t.state.name == "COMPLETE" and not t.user_attrs.get(hpo.INFRA_ATTR)
    ]
    assert len(counted) == 4
    params = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(params)) == 4, params


def test_a_killed_runs_trial_is_failed_by_its_heartbeat_and_does_not_count(tmp_path):
    journal = str(tmp_path / "journal.log")
    study = hpo.open_study(journal, "killed", seed=0, pruner="none")
    # A run was killed with one trial running: its last heartbeat is long gone.
    orphan = study.ask()
    orphan.set_user_attr("flow_run_id", "killed-run")
    orphan.set_user_attr(hpo.HEARTBEAT_ATTR, time.time() - 10 * hpo.STALE_AFTER_S)
    counts, _ = loop.run_study(settings(n_trials=3), study, Launcher(), tmp_path, flow_run_id="new")
    trials = {t.number: t for t in hpo.open_study(journal, "killed", seed=0).trials}
    assert trials[orphan.number].state.name == "FAIL"
    assert "no heartbeat" in trials[orphan.number].user_attrs["reason"]
    assert counts.complete == 3  # the orphan did not use up one of the 3
    assert sum(t.state.name == "RUNNING" for t in trials.values()) == 0


def test_trials_failed_by_a_full_disk_do_not_use_up_n_trials(tmp_path):
    journal = str(tmp_path / "journal.log")
    study = hpo.open_study(journal, "disk", seed=0, pruner="none")
    counts, dirs = loop.run_study(
        settings(n_trials=3, workers=1), study, Launcher(fail_first=2), tmp_path, flow_run_id="r"
    )
    assert counts.complete == 3 and counts.failed == 2 and len(dirs) == 5
    assert hpo.finished_count(study) == 3
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert all(t.user_attrs[hpo.INFRA_ATTR] for t in failed)


def test_a_stale_journal_lock_left_by_a_killed_run_is_cleared_at_once(tmp_path):
    journal = tmp_path / "journal.log"
    ask_params(hpo.open_study(str(journal), "s", seed=0), 1)
    # A run killed while appending leaves the lock behind (Optuna's lock is a symlink).
    lock = tmp_path / "journal.log.lock"
    lock.symlink_to(journal)
    old = time.time() - 60
    os.utime(lock, (old, old), follow_symlinks=False)
    started = time.monotonic()
    study = hpo.open_study(str(journal), "s", seed=0)
    ask_params(study, 1)
    assert not lock.exists() and not lock.is_symlink()
    assert len(study.trials) == 2
    # without clearing, Optuna waits its 30 s grace period before breaking the lock
    assert time.monotonic() - started < 25


def test_a_journal_cut_short_by_a_full_disk_opens_again(tmp_path):
    journal = tmp_path / "journal.log"
    first = ask_params(hpo.open_study(str(journal), "s", seed=0), 2)
    with open(journal, "ab") as f:  # the write a full disk cut off
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 2, "par')
    study = hpo.open_study(str(journal), "s", seed=0)
    assert [t.params for t in study.trials] == first
    assert journal.read_bytes().endswith(b"\n")
