"""The pipeline's studies are ordinary Optuna storages: Optuna's own API and CLI read
them back (and so does optuna-dashboard, which opens the same storages)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from test_pipeline import run_pipeline

OPTUNA = str(Path(sys.executable).with_name("optuna"))


def optuna_cli(*args: str) -> object:
    out = subprocess.run([OPTUNA, *args, "-f", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_journal_study_reads_back_with_optunas_api_and_cli(prefect_harness, home, tmp_path):
    summary = run_pipeline(tmp_path, hpo={"n_trials": 5}, submit={"enabled": False})
    journal = str(tmp_path / "journal.log")

    study = optuna.load_study(
        study_name="quad", storage=JournalStorage(JournalFileBackend(journal))
    )
    assert len(study.trials) == 5
    assert study.best_value == pytest.approx(summary["best_value"])
    assert study.best_trial.number == summary["best_trial"]
    # What the pipeline added stays readable: each trial's run folder and flow run.
    assert all(Path(t.user_attrs["run_dir"]).is_dir() for t in study.trials)
    assert all(t.user_attrs["flow_run_id"] for t in study.trials)

    storage = ["--storage", journal, "--storage-class", "JournalFileBackend"]
    studies = optuna_cli("studies", *storage)
    assert [(s["name"], s["n_trials"]) for s in studies] == [("quad", 5)]
    best = optuna_cli("best-trial", "--study-name", "quad", *storage)
    assert best["number"] == summary["best_trial"]
    # the study names its metric, so Optuna's CLI labels the value with it
    assert best["value"] == {"loss": pytest.approx(summary["best_value"])}


def test_sqlite_study_reads_back_with_optunas_cli(prefect_harness, home, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    summary = run_pipeline(
        tmp_path,
        hpo={"n_trials": 3, "storage": url},
        submit={"enabled": False},
        gates=["test_loss:lt:100"],  # three trials need not find a good x; this is about storage
    )
    studies = optuna_cli("studies", "--storage", url)
    assert [(s["name"], s["n_trials"]) for s in studies] == [("quad", 3)]
    trials = optuna_cli("trials", "--study-name", "quad", "--storage", url)
    assert sorted(t["number"] for t in trials) == [0, 1, 2]
    assert min(t["value"]["loss"] for t in trials) == pytest.approx(summary["best_value"])
