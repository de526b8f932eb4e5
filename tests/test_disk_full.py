"""A full disk is a clear stop: one line saying the disk is full and where, no traceback,
trials it failed do not use up n_trials, and a re-run with space finishes the study. The
disk is a real, small tmpfs mounted for the test (and grown with a remount)."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from expflow_flows.hpo import study as hpo


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk, leave: int) -> None:
    """Fill the disk until only about ``leave`` bytes are free."""
    import shutil

    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


def test_a_full_disk_stops_with_one_line_and_a_rerun_with_space_finishes(
    prefect_harness, small_disk, tmp_path, monkeypatch
):
    from expflow_flows.cli.app import app

    monkeypatch.setenv("EXPFLOW_HOME", str(small_disk))
    monkeypatch.delenv("EXPFLOW_RUNS_ROOT", raising=False)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": "full-disk",
                "train": {"target": "sample_trainables:quadratic"},
                "evaluate": {"target": "sample_trainables:evaluate_with_pred"},
                "space": {"x": {"type": "float", "low": 0.0, "high": 4.0}},
                "objective": "loss",
                "hpo": {"n_trials": 3, "budget": {"epochs": 2}, "pruner": "none"},
                "cluster": {"kind": "threads", "workers": 1},
                "gates": ["test_loss:lt:100"],
                "submit": {"enabled": False},
            }
        )
    )
    (small_disk / "optuna").mkdir()
    _fill(small_disk, leave=48 * 1024)
    first = CliRunner().invoke(app, ["pipeline", "run", "--config", str(config)])
    assert first.exit_code != 0
    errors = [line for line in first.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0], first.output
    assert str(small_disk) in errors[0]
    assert "Traceback" not in first.output

    # Space again: the same command finishes the study, the disk's failures not counted.
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    (small_disk / "filler").unlink()
    second = CliRunner().invoke(app, ["pipeline", "run", "--config", str(config)])
    assert second.exit_code == 0, second.output[-3000:]
    journal = str(small_disk / "optuna" / "journal.log")
    study = hpo.open_study(journal, "full-disk", pruner="none")
    assert hpo.finished_count(study) == 3
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
